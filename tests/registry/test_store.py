"""Which MLflow store Graft and its consumers use, and that nothing creates one by accident.

`MLFLOW_TRACKING_URI` wins; inside a Graft project its own store is used; anywhere else a consumer gets one
line naming the variable. MLflow's own default would create `./mlflow.db` wherever a consumer happens to run
and then fail with "no alias 'champion'"; these tests run the README's consumer snippet in fresh folders and
check that no store appears. Two runs creating a fresh embedded store at once both finish.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.core.errors import TrackingStoreError
from components.registry.history import move_alias
from tests import services
from tests.conftest import REPO
from tests.runtime.fixtures import NAME, image, store  # noqa: F401

SNIPPET = (
    "from components.runtime.model import OnnxClassifier\n"
    f"model = OnnxClassifier.load('models:/{NAME}@champion')\n"
    "print(model.source.version)\n"
)


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**services.clean_env(), "PYTHONPATH": str(REPO), **env})


def _graft(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return _python(f"import sys; from flows.cli import main; sys.exit(main({list(args)!r}))", cwd, **env)


@pytest.fixture
def champion(store):  # noqa: F811
    """The store with a registered champion: (store, its version)."""
    version = store.register("v1")
    move_alias(store.client, NAME, version, "gate", "test", "first model")
    return store, version


def test_the_consumer_snippet_works_from_any_folder_with_mlflow_tracking_uri_and_creates_no_store(champion, tmp_path):
    store, version = champion
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _python(SNIPPET, elsewhere, MLFLOW_TRACKING_URI=store.uri)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == version
    assert list(elsewhere.iterdir()) == []  # MLflow's default ./mlflow.db did not appear


def test_outside_the_project_without_mlflow_tracking_uri_a_consumer_is_told_which_variable_to_set(tmp_path, image):  # noqa: F811
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _python(SNIPPET, elsewhere)
    assert done.returncode == 1 and "TrackingStoreError" in done.stderr
    assert "set MLFLOW_TRACKING_URI" in done.stderr.strip().splitlines()[-1]

    cli = _graft("predict", "--model", f"models:/{NAME}@champion", str(image), cwd=elsewhere)
    assert cli.returncode == 2
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no MLflow registry") and "MLFLOW_TRACKING_URI" in lines[0], cli.stderr
    assert list(elsewhere.iterdir()) == []


def test_inside_a_project_its_own_store_is_read_and_a_missing_one_is_not_created(champion, tmp_path):
    store, version = champion
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(f"tracking:\n  store_dir: {store.params.tracking.store_dir}\n")
    done = _python(SNIPPET, project)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == version

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "params.yaml").write_text("tracking:\n  store_dir: mlflow\n")
    cli = _graft("history", "--name", NAME, cwd=fresh)
    assert cli.returncode == 2
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and f"there is no MLflow store at {fresh / 'mlflow' / 'mlflow.db'}" in lines[0], cli.stderr
    assert "`graft run` creates it" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
    assert sorted(p.name for p in fresh.iterdir()) == ["params.yaml"]


def test_a_store_that_will_not_open_is_one_line_not_a_traceback(tmp_path):
    from components.core.config import load_params
    from components.registry.tracking import open_tracking_store

    project = tmp_path / "project"
    (project / "mlflow").mkdir(parents=True)
    (project / "mlflow" / "mlflow.db").write_bytes(b"not a database, " * 64)
    (project / "params.yaml").write_text("tracking:\n  store_dir: mlflow\n")
    with pytest.raises(TrackingStoreError, match=r"cannot open the MLflow store sqlite:///.*mlflow.db \(.*\); check that"):
        open_tracking_store(load_params(project / "params.yaml"))
    cli = _graft("history", "--name", NAME, cwd=project)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and cli.stderr.startswith("error: "), cli.stderr


_WITHOUT_SQLALCHEMY = """
import sys
sys.modules["sqlalchemy"] = None  # as mlflow-skinny (the serving image's MLflow) has it: no SQLAlchemy at all
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_mlflow_without_database_stores_is_told_to_use_the_server_not_to_migrate(champion, tmp_path):
    """The serving image's mlflow-skinny has no SQLAlchemy: a `sqlite:` URI there is named for what it is."""
    store, _ = champion
    done = subprocess.run([sys.executable, "-c", _WITHOUT_SQLALCHEMY, "predict", "--model", f"models:/{NAME}@champion", "x.png"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**services.clean_env(), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store.uri})
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: this environment's MLflow cannot open a database store") and "mlflow-skinny" in last
    assert "MLFLOW_TRACKING_URI to your MLflow server" in last and "mlflow db upgrade" not in last


_REGISTER_AT_ONCE = r"""
import sys, time
from pathlib import Path
from components.core.config import load_params
from components.registry.tracking import open_tracking_store
from components.registry.history import move_alias
from tests.runtime.fixtures import NAME, Store

work, go = Path(sys.argv[1]), Path(sys.argv[2])
params = load_params(None, [f"tracking.store_dir={sys.argv[3]}", f"deploy.model_name={NAME}"])
while not go.exists():
    time.sleep(0.005)
uri = open_tracking_store(params)  # both processes open the fresh store at the same moment
store = Store(params, uri, work)
version = store.register("model")
move_alias(store.client, NAME, version, "gate", f"process {work.name}", "registered at once")
print(version)
"""


def test_two_runs_creating_a_fresh_embedded_store_at_once_both_register(tmp_path):
    """Before: one of two runs on a new checkout died with `table logged_models already exists` (four tracebacks)."""
    from components.registry.versions import alias_version
    from mlflow import MlflowClient

    store_dir, go = tmp_path / "mlflow", tmp_path / "go"
    children = [
        subprocess.Popen([sys.executable, "-c", _REGISTER_AT_ONCE, str(tmp_path / f"p{n}"), str(go), str(store_dir)],
                         cwd=REPO, env={**services.clean_env(), "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (0, 1)
    ]
    time.sleep(8)  # both have imported MLflow and wait for the same signal
    go.touch()
    versions = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        versions.append(out.strip().splitlines()[-1])
    assert sorted(versions) == ["1", "2"]
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    assert alias_version(MlflowClient(uri, uri), NAME) in versions


def test_a_new_projects_store_starts_from_the_empty_store_the_first_one_made(tmp_path, monkeypatch, caplog):
    """Creating MLflow's schema took 1.0-1.3 s of every new project's first run; a copy of the first empty store
    opens at once. The copy holds nothing of the first project: MLflow writes its Default experiment afresh,
    with the artifact location of the process that opened the copy."""
    import sqlite3

    import mlflow
    from components.core.config import load_params
    from components.registry.tracking import empty_store_template, open_tracking_store
    from mlflow import MlflowClient

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = empty_store_template().template
    assert template == tmp_path / "cache" / "graft" / "mlflow-db" / f"mlflow-{mlflow.__version__}.db"

    def project(name: str) -> tuple[str, Path]:
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)  # where MLflow puts the Default experiment's artifacts
        params = load_params(None, [f"tracking.store_dir={folder / 'mlflow'}", f"deploy.model_name={NAME}"])
        return open_tracking_store(params), folder

    first_uri, first = project("first")
    assert template.is_file()
    with sqlite3.connect(template) as db:
        assert db.execute("select count(*) from experiments").fetchone() == (0,)  # not the first project's
        assert db.execute("select version_num from alembic_version").fetchone()

    caplog.set_level("INFO", logger="components.registry.tracking")
    uri, second = project("second")
    assert "it starts from" in caplog.text
    client = MlflowClient(uri, uri)
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location.startswith(str(second)), default.artifact_location
    graft = client.get_experiment_by_name(load_params(None, []).tracking.experiment)
    assert graft.artifact_location == (second / "mlflow" / "artifacts").as_uri()
    assert [e.name for e in MlflowClient(first_uri, first_uri).search_experiments()] == [e.name for e in client.search_experiments()]
    run = client.create_run(graft.experiment_id)  # a working store: runs and the registry
    client.create_registered_model(NAME)
    assert client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id).version in (1, "1")

    # a template that is not a database (a disk that filled while it was written) is replaced, never in the way
    template.write_bytes(b"not a database, " * 64)
    caplog.clear()
    project("third")
    assert "is not a usable empty database" in caplog.text and "it starts from" not in caplog.text
    with sqlite3.connect(template) as db:
        assert db.execute("select count(*) from experiments").fetchone() == (0,)
    project("fourth")
    assert "it starts from" in caplog.text


def test_a_database_store_keeps_new_experiments_artifacts_in_the_project_not_in_the_folder_the_run_starts_in(tmp_path, monkeypatch):
    """MLflow's default for an experiment of a database store is `./mlruns` of the current folder; `graft run` gives
    every database (SQLite, or PostgreSQL and the others opened directly) the project's store folder, and leaves a
    tracking server's experiments to the server's own artifact store."""
    from components.core.config import load_params
    from components.registry.tracking import experiment_location

    params = load_params(REPO / "params.yaml", [f"tracking.store_dir={tmp_path / 'store'}"])
    monkeypatch.chdir(tmp_path)
    inside = (tmp_path / "store" / "artifacts").as_uri()
    for uri in (f"sqlite:///{tmp_path / 'other.db'}", "postgresql://graft@db.internal/mlflow",
                "postgresql+psycopg2://graft@db.internal/mlflow", "mysql+pymysql://graft@db/mlflow", "mssql://db/mlflow"):
        assert experiment_location(params, uri) == inside, uri
    for uri in ("http://127.0.0.1:5000", "https://mlflow.internal", "databricks"):
        assert experiment_location(params, uri) is None, uri


def test_where_sqlalchemy_is_missing_the_message_offers_only_a_server(monkeypatch, tmp_path):
    """The serving image has mlflow-skinny, which cannot open SQLite: its message does not suggest a sqlite: URI."""
    import importlib.util

    from components.registry.tracking import consumer_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils.is_tracking_uri_set", lambda: False)
    with pytest.raises(TrackingStoreError) as raised:
        consumer_store()
    assert "sqlite:" not in str(raised.value) and "mlflow-skinny" in str(raised.value)
