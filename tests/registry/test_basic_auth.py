"""Graft against an MLflow server with basic authentication (`mlflow server --app-name basic-auth`).

Credentials come only from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow's
client reads; the password must not end up in anything Graft writes or prints.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import mlflow.artifacts
import pytest

from tests import services
from tests.conftest import REPO, tiny_overrides
from tests.deploy.fixtures import NAME, tiny_model  # noqa: F401

USER = "admin"


@pytest.fixture
def auth_server(tmp_path):
    """A basic-auth MLflow server on a free localhost port (SQLite + artifacts under tmp_path); yields (url, password)."""
    password = f"pw-{secrets.token_urlsafe(18)}"
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    config = server_dir / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{server_dir / 'auth.db'}\n"
        f"admin_username = {USER}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    with services.mlflow_server(server_dir, "--app-name", "basic-auth", env=env, seconds=240) as url:
        yield url, password


def _files_containing(folder: Path, secret: bytes) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]


@pytest.mark.slow
def test_graft_tracks_registers_and_serves_through_basic_auth_and_never_records_the_password(
    auth_server, tiny_model, tmp_path, monkeypatch, caplog, capfd  # noqa: F811
):
    from components.core.config import load_params
    from components.core.errors import TrackingAuthError
    from components.deploy.register import log_onnx_model, register_version
    from components.registry.history import move_alias
    from components.registry.tracking import open_tracking_store, parent_run
    from components.registry.versions import registry_version
    from components.runtime.model import OnnxClassifier
    from components.serve.server import LiveModel
    from flows.cli import main
    from mlflow import MlflowClient

    url, password = auth_server
    work = tmp_path / "work"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    caplog.set_level(logging.DEBUG)
    params = load_params(REPO / "params.yaml", tiny_overrides(Path(tiny_model.params.data.dir), work, Path(tiny_model.params.data.cache_dir)))

    # the registry-facing half of `graft run`: parent run, params, an artifact, the model, a version, the alias
    with parent_run(params, run_name="basic-auth", tags={"graft.stage": "test"}) as run:
        run.log_params({"data.dir": params.data.dir, "deploy.model_name": params.deploy.model_name})
        run.log_dict({"note": "basic auth"}, "summary.json")
        source = log_onnx_model(run, tiny_model.onnx_path, 64, 3)
        version = register_version(run, NAME, source, {"val.accuracy": "0.9"}, "basic-auth test")
        move_alias(run.client, NAME, version, "gate", "test", "first model behind basic auth")
    served = LiveModel(f"models:/{NAME}@champion")  # a consumer downloads the champion with the same credentials
    assert served.model.source.version == version and list(served.model.classes) == ["0", "1", "7"]

    client = MlflowClient(url, url)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.params["deploy.model_name"] == NAME
    assert client.get_model_version_by_alias(NAME, "champion").version == version

    # nothing Graft wrote or printed holds the password
    secret = password.encode()
    downloaded = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "downloaded")))
    assert sorted(p.name for p in downloaded.iterdir()) == ["summary.json"]
    model_version = client.get_model_version(NAME, version)  # the model is a LoggedModel of the run: its own artifacts
    model_files = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_version.source, dst_path=str(tmp_path / "model"),
                                                           tracking_uri=url))
    assert "model.onnx" in {p.name for p in model_files.iterdir()}
    recorded = {
        "params": finished.data.params, "tags": finished.data.tags, "version tags": model_version.tags,
        "version source": model_version.source, "model tags": client.get_registered_model(NAME).tags,
    }
    assert password not in repr(recorded), [where for where, value in recorded.items() if password in repr(value)]
    assert _files_containing(downloaded, secret) == [] and _files_containing(model_files, secret) == []
    assert _files_containing(work, secret) == []
    out, err = capfd.readouterr()
    assert password not in caplog.text and password not in out and password not in err

    # without credentials: `graft run`'s first MLflow calls stop with one clear line naming the variables to set
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with pytest.raises(TrackingAuthError) as refused:
        open_tracking_store(params)
    with pytest.raises(TrackingAuthError) as refused_run, parent_run(params):
        pass
    for message in (str(refused.value), str(refused_run.value)):
        assert url in message and "no credentials were given" in message and "(HTTP 401)" in message
        assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert f"experiment '{params.tracking.experiment}'" in str(refused_run.value)

    # a wrong password: refused, not "no alias", for consumers as for the pipeline; the password is never shown
    wrong = "not-" + password
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    with pytest.raises(TrackingAuthError) as refused_run, parent_run(params):
        pass
    with pytest.raises(TrackingAuthError) as refused_load:
        OnnxClassifier.load(f"models:/{NAME}@champion")
    with pytest.raises(TrackingAuthError) as refused_version:
        registry_version(NAME, "champion", None)
    for message in (str(refused_run.value), str(refused_load.value), str(refused_version.value)):
        assert f"refused the credentials of user '{USER}'" in message and url in message
        assert "MLFLOW_TRACKING_PASSWORD" in message and "no alias" not in message
        assert password not in message and wrong not in message
    assert f"alias 'champion' of '{NAME}'" in str(refused_load.value)

    # the CLI prints that as one line and exits 2, no traceback
    capfd.readouterr()
    registry = ["--model", f"models:/{NAME}@champion", "--params", str(REPO / "params.yaml")]
    assert main(["predict", *registry, str(tiny_model.val(1)[0][0])]) == 2
    assert main(["serve", *registry, "--port", "1"]) == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and all(f"refused the credentials of user '{USER}'" in line for line in lines), err
    assert "Traceback" not in err and "Traceback" not in out
    assert password not in caplog.text and password not in out and password not in err
    assert wrong not in caplog.text and wrong not in out and wrong not in err
