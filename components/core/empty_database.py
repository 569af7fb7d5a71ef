"""A new SQLite database that starts as a copy of the empty one this tool's version made before.

Prefect's API and MLflow's tracking store each create their SQLite schema the first time they open a new
database: dozens of schema migrations (on 2 cores, 7 s of the embedded Prefect API's start, and 1.0-1.3 s of
opening MLflow's store), with the same result for every new database of one version. The first empty
database made is kept in the user's cache (`components.core.files.user_cache_dir`), and later new
databases start from a copy of it, which opens at once.

A database is kept as the template only when it holds nothing of a project (the tables named must be
empty), after the statements in `scrub` removed what a store writes about its own location. A copy is
put in place only where no database exists yet, and never over one another process made meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class EmptyDatabaseTemplate:
    """The empty database of one tool version, kept at `template`.

    Args:
        template: where the template lives (one self-contained SQLite file).
        empty_tables: tables that must hold no row in a database kept as the template; None: every table
            except `nonempty_tables`.
        nonempty_tables: with `empty_tables` None, the tables the tool fills itself when it creates its schema.
        scrub: SQL statements run on the copy that becomes the template, before the check (e.g. deleting a
            row that records the first database's own location, which the tool then writes afresh).
    """

    def __init__(self, template: Path, empty_tables: Sequence[str] | None = None, nonempty_tables: Sequence[str] = (),
                 scrub: Sequence[str] = ()) -> None:
        self.template = template
        self.empty_tables, self.nonempty_tables, self.scrub = empty_tables, tuple(nonempty_tables), tuple(scrub)

    def seed(self, database: Path) -> bool:
        """Copy the template to `database`, when there is a template and no database yet; True when copied."""
        if not self.template.is_file() or database.exists():
            return False
        partial = database.with_name(f".{database.name}.{os.getpid()}.tmp")
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.template, partial)  # one file, replaced only whole: a plain copy is consistent
            problem = _unusable(partial)
            if problem:
                log.warning("%s is not a usable empty database (%s); deleting it: %s starts as a new database",
                            self.template, problem, database)
                self.template.unlink(missing_ok=True)
                return False
            os.link(partial, database)  # fails if another process's database appeared meanwhile: that one is used
            return True
        except OSError as exc:
            log.debug("%s: not seeded from %s (%s)", database, self.template, exc)
            return False
        finally:
            partial.unlink(missing_ok=True)

    def keep(self, database: Path) -> bool:
        """Keep a copy of `database` (which the tool just made itself) as the template, unless one exists or
        it holds anything of a project; best effort. True when kept."""
        if self.template.exists():
            return False
        partial = self.template.with_name(f".{self.template.name}.{os.getpid()}.tmp")
        try:
            self.template.parent.mkdir(parents=True, exist_ok=True)
            _backup(database, partial)
            with contextlib.closing(sqlite3.connect(partial)) as db:
                for statement in self.scrub:
                    db.execute(statement)
                db.commit()
                tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
                wanted = self.empty_tables if self.empty_tables is not None else sorted(
                    tables - set(self.nonempty_tables) - {"sqlite_sequence"})
                used = [t for t in wanted if t in tables and db.execute(f'select 1 from "{t}" limit 1').fetchone()]
                if used or "alembic_version" not in tables:
                    log.debug("not keeping %s as the template %s: %s", database, self.template,
                              f"rows in {', '.join(used)}" if used else "no schema")
                    return False
                db.execute("PRAGMA journal_mode = DELETE")  # one self-contained file (a WAL database has two more)
            os.replace(partial, self.template)
            log.debug("kept the empty database %s as %s", database, self.template)
            return True
        except (OSError, sqlite3.Error) as exc:
            log.debug("could not keep %s as the template %s (%s)", database, self.template, exc)
            return False
        finally:
            partial.unlink(missing_ok=True)

    def discard(self, database: Path) -> None:
        """A seeded copy did not open: delete it (with its journal files) and the template."""
        for path in (database, self.template, *database.parent.glob(f"{database.name}-*")):
            path.unlink(missing_ok=True)


def _unusable(database: Path) -> str | None:
    """Why `database` is no usable template (a truncated copy, a file that is not SQLite, no schema), or None."""
    try:
        with contextlib.closing(sqlite3.connect(database)) as db:  # a private copy: no URI (a '#' in a path would end it)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                return f"SQLite's check says: {check}"
            if db.execute("select version_num from alembic_version").fetchone() is None:
                return "its schema version is missing"
    except sqlite3.Error as exc:
        return str(exc)
    return None


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of SQLite database `source` (also while a server has it open) at `target`."""
    target.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
