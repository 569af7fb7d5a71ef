"""MLflow failing under tracking and alias reads: 5xx retried then a clear error, a 401/403 explained, never
"no champion" during an outage.

MLflow runs on SQLite in a temp folder; faults are injected by patching one `MlflowClient` method to raise
what MLflow's REST client raises for a 5xx, 401 or 403 answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from components.core.errors import GraftError, RegistryError, TrackingAuthError
from components.registry import mlflow_calls
from components.registry.tracking import Run
from components.registry.versions import alias_version

NAME = "tracking-errors"
ALIAS_ENDPOINT = "/api/2.0/mlflow/registered-models/alias"


def _http_error(status: int, endpoint: str = "/api/2.0/mlflow/runs/log-batch"):
    """What MLflow's REST client raises when a server or proxy answers `status` with a non-JSON body."""
    from mlflow.exceptions import MlflowException, get_error_code

    return MlflowException(
        f"API request to endpoint {endpoint} failed with error code {status} != 200. Response body: 'refused'",
        error_code=get_error_code(status),
    )


@dataclass
class Flaky:
    """Counts the calls of one patched `MlflowClient` method; the first `times` raise `error`."""

    error: Exception
    times: int
    calls: int = 0


def _break(monkeypatch, method: str, error: Exception, times: int) -> Flaky:
    from mlflow import MlflowClient

    real = getattr(MlflowClient, method)
    flaky = Flaky(error, times)

    def patched(client, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        flaky.calls += 1
        if flaky.calls <= flaky.times:
            raise flaky.error
        return real(client, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, patched)
    return flaky


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str, str]:
    """A SQLite MLflow store with one run and `NAME` v1 as champion: (uri, experiment id, version)."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("tracking-errors")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment_id = client.create_experiment("errors", artifact_location=(work / "artifacts").as_uri())
    run = client.create_run(experiment_id)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    client.set_registered_model_alias(NAME, "champion", str(version))
    return uri, experiment_id, str(version)


@pytest.fixture
def run(store, monkeypatch) -> Run:
    from mlflow import MlflowClient

    uri, experiment_id, _ = store
    monkeypatch.setattr(mlflow_calls, "FIRST_DELAY_S", 0.01)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return Run(MlflowClient(uri, uri).create_run(experiment_id).info.run_id, uri)


# ---------------------------------------------------------------- run logging: 5xx retried, 401/403 explained


def test_run_logging_survives_a_5xx_for_a_while(run, monkeypatch):
    batch = _break(monkeypatch, "log_batch", _http_error(503), times=2)
    as_dict = _break(monkeypatch, "log_dict", _http_error(502, "/api/2.0/mlflow-artifacts/artifacts"), times=2)

    run.set_tags({"graft.stage": "deploy"})
    run.log_dict({"accuracy": 0.9}, "summary.json")

    assert (batch.calls, as_dict.calls) == (3, 3)  # two failures, then the real call
    logged = run.client.get_run(run.run_id)
    assert logged.data.tags["graft.stage"] == "deploy"
    assert run.client.list_artifacts(run.run_id)[0].path == "summary.json"
    assert run.artifact_uri() == logged.info.artifact_uri


def test_epoch_metrics_go_in_batches_and_epochs_before_a_stop_are_still_logged(run, monkeypatch):
    from mlflow import MlflowClient

    calls = []
    real = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, **kw: (calls.append(kw), real(self, *a, **kw))[1])
    with pytest.raises(KeyboardInterrupt), run.epoch_metrics(every_s=3600) as on_epoch:
        for epoch in range(1, 6):
            on_epoch({"train/loss": 1.0 / epoch, "val/loss": 2.0 / epoch}, epoch)
        raise KeyboardInterrupt  # a Ctrl-C after epoch 5
    assert [len(c["metrics"]) for c in calls] == [2, 8]  # epoch 1 at once, epochs 2-5 when the block ended
    history = run.client.get_metric_history(run.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(e, 2.0 / e) for e in range(1, 6)]


def test_an_mlflow_outage_during_training_delays_the_epoch_metrics_and_never_stops_training(run, monkeypatch, caplog):
    """The server goes away at epoch 3 and answers again later: every epoch trains, the missing epochs' metrics are sent
    with later ones, each with its own step; epoch 1 is sent at once, as always."""
    import logging

    import components.registry.tracking as tracking

    monkeypatch.setattr(tracking, "METRICS_RETRY_S", 0)
    with run.epoch_metrics(every_s=0) as on_epoch:
        on_epoch({"val/loss": 1.0}, 1)
        flaky = _break(monkeypatch, "log_batch", _http_error(503), times=3)  # epochs 2-4: the server is away
        with caplog.at_level(logging.WARNING, logger="components.registry.tracking"):
            for epoch in range(2, 8):
                on_epoch({"val/loss": 1.0 / epoch}, epoch)
    assert flaky.calls >= 4 and "MLflow did not take this epoch's metrics" in caplog.text and "training goes on" in caplog.text
    history = run.client.get_metric_history(run.run_id, "val/loss")
    assert sorted((m.step, m.value) for m in history) == [(e, 1.0 / e) for e in range(1, 8)]


def test_a_refusal_of_the_epoch_metrics_is_not_waited_out(run, monkeypatch):
    _break(monkeypatch, "log_batch", _http_error(403), times=100)
    with pytest.raises(TrackingAuthError), run.epoch_metrics(every_s=0) as on_epoch:
        on_epoch({"val/loss": 1.0}, 1)


def test_run_logging_that_keeps_failing_gives_one_clear_error(run, monkeypatch):
    batch = _break(monkeypatch, "log_batch", _http_error(503), times=100)
    as_dict = _break(monkeypatch, "log_dict", _http_error(500, "/api/2.0/mlflow-artifacts/artifacts"), times=100)

    with pytest.raises(RegistryError) as tags_err:
        run.set_tags({"graft.stage": "deploy"})
    with pytest.raises(RegistryError) as dict_err:
        run.log_dict({"accuracy": 0.9}, "summary.json")

    assert (batch.calls, as_dict.calls) == (mlflow_calls.ATTEMPTS, mlflow_calls.ATTEMPTS)
    for err, what, code in ((tags_err, "setting tags of", "503"), (dict_err, "writing summary.json to", "500")):
        message = str(err.value)
        assert f"{what} run {run.run_id} failed {mlflow_calls.ATTEMPTS} times" in message
        assert f"error code {code}" in message and "check that the MLflow server" in message


@pytest.mark.parametrize(("status", "words"), [(401, "no credentials were given"), (403, "ask an MLflow admin")])
def test_a_refused_run_call_is_explained_and_not_retried(run, monkeypatch, status, words):
    batch = _break(monkeypatch, "log_batch", _http_error(status), times=100)
    if status == 403:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")

    with pytest.raises(TrackingAuthError) as err:
        run.log_metrics({"val/accuracy": 0.9})

    assert batch.calls == 1
    message = str(err.value)
    assert f"logging metrics to run {run.run_id}" in message and run.uri in message and words in message
    assert ("MLFLOW_TRACKING_USERNAME" in message) == (status == 401)
    assert "s3cret-pw" not in message


def test_a_password_in_the_tracking_uri_is_not_printed():
    refused = mlflow_calls.explain_auth(_http_error(401), "https://bob:hunter2@mlflow.example:5000", "opening x")
    assert refused is not None and "https://mlflow.example:5000" in str(refused) and "hunter2" not in str(refused)


# ---------------------------------------------------------------- alias reads: none only when there is none


def test_alias_version_is_none_only_for_a_missing_alias_or_model(store, monkeypatch):
    from mlflow import MlflowClient

    uri, _, version = store
    monkeypatch.setattr(mlflow_calls, "FIRST_DELAY_S", 0.01)
    client = MlflowClient(uri, uri)
    assert alias_version(client, NAME) == version
    assert alias_version(client, NAME, "challenger") is None  # no such alias
    assert alias_version(client, "no-such-model") is None

    flaky = _break(monkeypatch, "get_model_version_by_alias", _http_error(503, ALIAS_ENDPOINT), 2)
    assert alias_version(client, NAME) == version and flaky.calls == 3

    down = _break(monkeypatch, "get_model_version_by_alias", _http_error(503, ALIAS_ENDPOINT), 100)
    with pytest.raises(RegistryError, match=f"alias 'champion' of '{NAME}' failed {mlflow_calls.ATTEMPTS} times"):
        alias_version(client, NAME)
    assert down.calls == mlflow_calls.ATTEMPTS

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    _break(monkeypatch, "get_model_version_by_alias", _http_error(401, ALIAS_ENDPOINT), 100)
    with pytest.raises(TrackingAuthError, match="MLFLOW_TRACKING_USERNAME"):
        alias_version(client, NAME)


def test_registry_version_tells_a_missing_alias_from_a_registry_outage(store, monkeypatch):
    from components.registry.tracking import use_tracking_uri
    from components.registry.versions import registry_version

    uri, _, version = store
    monkeypatch.setattr(mlflow_calls, "FIRST_DELAY_S", 0.01)
    use_tracking_uri(uri)
    assert str(registry_version(NAME, "champion", None).version) == version
    with pytest.raises(GraftError, match="has no alias 'challenger'"):
        registry_version(NAME, "challenger", None)
    with pytest.raises(GraftError, match=rf"there is no registered model '{NAME}x' .* \(did you mean '{NAME}'\?\); check the name"):
        registry_version(f"{NAME}x", "champion", None)  # a misspelt name is not a missing alias

    _break(monkeypatch, "get_model_version_by_alias", _http_error(503, ALIAS_ENDPOINT), 100)
    with pytest.raises(RegistryError) as err:
        registry_version(NAME, "champion", None)
    assert "no alias" not in str(err.value) and "check that the MLflow server" in str(err.value)


def test_a_champion_move_on_a_store_that_may_only_be_read_is_one_clear_line_not_retries_and_tracebacks(store, caplog):
    """`graft serve` records a move made in the MLflow UI; on a store it may only read (here SQLite opened read-only, as
    a read-only file or mount behaves) MLflow calls the failed write temporary and logs a traceback for it. Graft
    neither retries it nor lets the traceback through: one error naming the store and what to change."""
    import logging
    import time

    from components.registry.history import notice_outside_moves
    from mlflow import MlflowClient

    uri, experiment_id, version = store
    writer = MlflowClient(uri, uri)
    run = writer.create_run(experiment_id)
    moved = writer.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    writer.set_registered_model_alias(NAME, "champion", str(moved))  # by hand, outside Graft
    read_only = f"sqlite:///file:{uri.removeprefix('sqlite:///')}?mode=ro&uri=true"
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(RegistryError) as raised:
        notice_outside_moves(MlflowClient(read_only, read_only), NAME, "graft serve", str(version))
    assert time.monotonic() - started < mlflow_calls.FIRST_DELAY_S  # not retried
    assert "may only be read here" in str(raised.value) and "write access" in str(raised.value)
    assert not [r for r in caplog.records if r.name.startswith("mlflow") or r.exc_info], caplog.text
    assert "try 2 of" not in caplog.text
    writer.set_registered_model_alias(NAME, "champion", str(version))  # the module's champion, as it was


def test_a_registry_whose_files_are_on_another_machines_disk_says_how_to_serve_them(store, tmp_path, monkeypatch):
    """A store filled by `graft run` on a laptop (a local artifact root) read from a container: the files' `file:` paths
    do not exist there, and the error says to serve the artifacts, not to check the model's name."""
    from components.registry.versions import download_artifact

    uri, _, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(GraftError, match=r"a disk this machine does not see .*--serve-artifacts"):
        download_artifact("file:///laptop-only/alice/project/mlflow/artifacts/1/models/m-1/artifacts/model.onnx", tmp_path / "a")
    with pytest.raises(GraftError, match="check the name/alias in the MLflow UI"):  # here, but gone: another cause
        download_artifact(f"{(tmp_path / 'artifacts' / 'model.onnx').as_uri()}", tmp_path / "b")


def test_a_read_only_artifact_folder_is_not_blamed_on_a_writable_store():
    """An upload to a read-only artifact mount while the SQLite store itself is writable: the message names the file
    system, not the store."""
    error = OSError(30, "Read-only file system: '/mnt/artifacts/1/model.onnx'")
    explained = mlflow_calls.explain_read_only(error, "uploading model.onnx to run 1", "sqlite:////work/mlflow.db")
    assert explained is not None and "read-only file system" in str(explained) and "/mnt/artifacts" in str(explained)
    assert "may only be read here" not in str(explained) and "sqlite:" not in str(explained)
    assert mlflow_calls.explain_read_only(OSError(28, "No space left on device"), "uploading", None) is None
