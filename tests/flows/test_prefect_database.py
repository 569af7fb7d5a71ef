"""A new Prefect home starts from the empty database the first one made (flows/prefect_database.py), through the
embedded API `graft run` starts; a template the server cannot start on is replaced, never in the way."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.prefect_database import NewHomeDatabase, template_path
from tests import services
from tests.conftest import REPO

pytestmark = pytest.mark.slow

START = """
import json, logging, sqlite3, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from flows.interrupts import _DetachedPrefectAPI
api = _DetachedPrefectAPI()
api.launch(); api.wait()
seeded = bool(api.new_home and api.new_home.seeded)
api.stop()
print(json.dumps({"seeded": seeded, "relaunches": api.relaunches}))
"""


def _start(home: Path, cache: Path, cwd: Path | None = None) -> tuple[dict, str]:
    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(home), "XDG_CACHE_HOME": str(cache)}
    # -P: the current folder is not on this process's sys.path, as it is not on the `graft` command's
    done = subprocess.run([sys.executable, "-P", "-c", START], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _schema(database: Path) -> tuple[str, list[str]]:
    with sqlite3.connect(database) as db:
        version = db.execute("select version_num from alembic_version").fetchone()[0]
        tables = sorted(name for (name,) in db.execute("select name from sqlite_master where type = 'table'"))
    return version, tables


def test_a_broken_template_is_replaced_and_the_next_new_prefect_home_starts_from_the_new_one(tmp_path, monkeypatch):
    import prefect

    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    template = template_path(prefect.__version__)
    assert template.is_relative_to(cache)

    # a template the server cannot start on (a truncated download, a disk that filled): the new home's copy and
    # the template are deleted, the home starts afresh (Prefect's migrations), and an empty copy of that is kept
    template.parent.mkdir(parents=True)
    template.write_bytes(b"this is not a SQLite database" * 100)
    first, log = _start(tmp_path / "first", cache)
    assert not first["seeded"] and "is not a usable empty database" in log
    assert _schema(template) == _schema(tmp_path / "first" / "prefect.db")
    assert sorted(p.name for p in template.parent.iterdir()) == [template.name]  # one self-contained file

    # the next new home starts from that copy, and its API answers
    second, log = _start(tmp_path / "second", cache)
    assert second["seeded"] and "its database starts from" in log
    assert _schema(tmp_path / "second" / "prefect.db") == _schema(template)


def test_only_prefects_own_new_database_is_seeded_and_only_an_empty_one_is_kept(tmp_path, monkeypatch):
    class Url:
        def __init__(self, value: str) -> None:
            self.value = value

        def get_secret_value(self) -> str:
            return self.value

    class Settings:
        def __init__(self, home: Path, url: str | None) -> None:
            self.home = home
            self.server = type("S", (), {"database": type("D", (), {"connection_url": Url(url) if url else None})()})()

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert NewHomeDatabase.of(Settings(home, f"sqlite+aiosqlite:///{home / 'prefect.db'}"), "9.9").database == home / "prefect.db"
    assert NewHomeDatabase.of(Settings(home, "postgresql+asyncpg://db/prefect"), "9.9") is None
    (home / "prefect.db").write_bytes(b"")
    assert NewHomeDatabase.of(Settings(home, None), "9.9") is None  # it exists: not new

    # a database that already holds a run is never kept as the template
    database = tmp_path / "used.db"
    with sqlite3.connect(database) as db:
        db.execute("create table alembic_version (version_num text)")
        db.execute("insert into alembic_version values ('x')")
        db.execute("create table flow_run (id text)")
        db.execute("insert into flow_run values ('a run')")
    used = NewHomeDatabase(database, template_path("9.9"))
    used.keep()
    assert not used.template.exists()
    with sqlite3.connect(database) as db:
        db.execute("delete from flow_run")
    used.keep()
    assert used.template.is_file() and os.path.getsize(used.template) > 0


def test_a_project_file_named_like_a_library_does_not_stand_in_for_it_in_the_embedded_api(tmp_path):
    """`graft run` in a folder holding its own click.py (or typing.py, ...): the embedded API's `python -c` would
    import that file instead of the library, and the server would not start."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "click.py").write_text("raise ImportError('the project folder click.py was imported')\n")
    started, log = _start(tmp_path / "home", tmp_path / "cache", cwd=project)
    assert started["relaunches"] == 0 and "the project folder click.py" not in log
