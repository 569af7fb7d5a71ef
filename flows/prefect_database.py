"""A new Prefect home starts from an empty database this Prefect version already made.

The first start of Prefect's API in a new Prefect home creates its SQLite database: about 50 schema
migrations, then Prefect registers its block types. On 2 cores that is 7 of the 13 seconds the embedded API
takes to start, in every new project (and every new test folder). The result is the same for every home of one
Prefect version, so the first one made is kept in the user's cache and later new homes start from a copy:

    $XDG_CACHE_HOME/graft/prefect-db/prefect-<version>.db    (~/.cache/graft/... by default; safe to delete)

Only Prefect's default database (`prefect.db` in PREFECT_HOME) is seeded; a PREFECT_API_DATABASE_CONNECTION_URL
of your own is left alone. A copy is taken only from a database that holds no run of any kind yet, and a copy
the server then fails to start on is deleted, and the home starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from pathlib import Path

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
        if not self.template.is_file():
            return
        partial = self.database.with_name(f".{self.database.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(self.template, partial)  # one file, replaced only whole: a plain copy is consistent
            os.link(partial, self.database)  # fails if another run's database appeared meanwhile: that one is used
            self.seeded = True
            log.info("new Prefect home: its database starts from %s (no migrations)", self.template)
        except (OSError, sqlite3.Error) as exc:
            log.debug("new Prefect home: not seeded from %s (%s)", self.template, exc)
        finally:
            partial.unlink(missing_ok=True)

    def keep(self) -> None:
        """After the server answered on a database it made itself: keep a copy as the template (best effort)."""
        if self.seeded or self.template.exists():
            return
        partial = self.template.with_name(f".{self.template.name}.{os.getpid()}.tmp")
        try:
            self.template.parent.mkdir(parents=True, exist_ok=True)
            _backup(self.database, partial)
            with contextlib.closing(sqlite3.connect(partial)) as db:
                tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
                used = [t for t in RUN_TABLES if t in tables and db.execute(f'select 1 from "{t}" limit 1').fetchone()]
                if used or "alembic_version" not in tables:
                    log.debug("not keeping %s as the Prefect database template: %s", self.database, used or "no schema")
                    return
                db.execute("PRAGMA journal_mode = DELETE")  # one self-contained file (Prefect turns WAL on again)
            os.replace(partial, self.template)
            log.debug("kept the empty Prefect database as %s", self.template)
        except (OSError, sqlite3.Error) as exc:
            log.debug("could not keep the Prefect database template %s (%s)", self.template, exc)
        finally:
            partial.unlink(missing_ok=True)

    def discard(self) -> bool:
        """The server failed to start on a seeded copy: delete the copy and the template; True when there was one."""
        if not self.seeded:
            return False
        log.warning("the embedded Prefect API did not start on the database copied from %s; deleting that copy and "
                    "starting with a new database", self.template)
        for path in (self.database, self.template, *self.database.parent.glob(f"{self.database.name}-*")):
            path.unlink(missing_ok=True)
        self.seeded = False
        return True


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of SQLite database `source` (while its server has it open) at `target`."""
    target.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
