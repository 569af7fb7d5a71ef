"""A new Prefect home starts from an empty database this Prefect version already made.

The first start of Prefect's API in a new Prefect home creates its SQLite database: about 50 schema
migrations, then Prefect registers its block types. On 2 cores that is 7 of the 13 seconds the embedded API
takes to start, in every new project (and every new test folder). The result is the same for every home of one
Prefect version, so the first one made is kept in the user's cache and later new homes start from a copy
(`components.core.empty_database`, which MLflow's store uses too):

    $XDG_CACHE_HOME/graft/prefect-db/prefect-<version>.db    (~/.cache/graft/... by default; safe to delete)

Only Prefect's default database (`prefect.db` in PREFECT_HOME) is seeded; a PREFECT_API_DATABASE_CONNECTION_URL
of your own is left alone. A copy is taken only from a database that holds no run of any kind yet, and a copy
the server then fails to start on is deleted, and the home starts afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.core.empty_database import EmptyDatabaseTemplate
from components.core.files import user_cache_dir

log = logging.getLogger(__name__)

RUN_TABLES = ("flow_run", "task_run", "log", "artifact", "deployment", "flow")
"""Tables that must be empty in a database kept as the template: it holds Prefect's own set-up and nothing else."""


def template_path(version: str) -> Path:
    """Where the empty database of Prefect `version` is kept."""
    return user_cache_dir() / "prefect-db" / f"prefect-{version}.db"


class NewHomeDatabase:
    """The database of a Prefect home that has none yet: `seed` it before the server starts, `keep` it as the
    template once a server made it, `discard` a seeded copy the server failed to start on."""

    def __init__(self, database: Path, template: Path) -> None:
        self.database, self.template = database, template
        self._empty = EmptyDatabaseTemplate(template, empty_tables=RUN_TABLES)
        self.seeded = False

    @classmethod
    def of(cls, settings, version: str) -> NewHomeDatabase | None:  # noqa: ANN001 - prefect Settings
        """The home's database when it is Prefect's default SQLite file and does not exist yet; else None."""
        database = Path(settings.home).expanduser() / "prefect.db"
        url = settings.server.database.connection_url
        if url is not None and url.get_secret_value() != f"sqlite+aiosqlite:///{database}":
            return None
        return None if database.exists() else cls(database, template_path(version))

    def seed(self) -> None:
        """Copy the template into place, when there is one (never over a database another run made meanwhile)."""
        self.seeded = self._empty.seed(self.database)
        if self.seeded:
            log.info("new Prefect home: its database starts from %s (no migrations)", self.template)

    def keep(self) -> None:
        """After the server answered on a database it made itself: keep a copy as the template (best effort)."""
        if not self.seeded:
            self._empty.keep(self.database)

    def discard(self) -> bool:
        """The server failed to start on a seeded copy: delete the copy and the template; True when there was one."""
        if not self.seeded:
            return False
        log.warning("the embedded Prefect API did not start on the database copied from %s; deleting that copy and "
                    "starting with a new database", self.template)
        self._empty.discard(self.database)
        self.seeded = False
        return True
