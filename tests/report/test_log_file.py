"""The run's log file: every line from the first, kept when the run stops, uploaded to a real MLflow run."""

import logging
import threading

import pytest

from components.core.errors import RegistryError
from components.registry.tracking import Run
from components.report.log_file import RUN_LOG, capture_run_log
from mlflow import MlflowClient

log = logging.getLogger("components.test_log_file")


@pytest.fixture(autouse=True)
def root_at_warning():
    """The root logger at WARNING, as Prefect's own logging set-up leaves it where it runs a scheduled flow."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    yield
    root.setLevel(level)


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("logs", artifact_location=str(tmp_path / "artifacts"))
    return Run(client.create_run(experiment).info.run_id, uri)


def test_lines_before_the_run_folder_exists_come_first_then_every_line_and_the_upload(tmp_path, run):
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING and logging.getLogger("components").level == logging.NOTSET
    with capture_run_log() as run_log:
        log.info("before the run folder")
        log.debug("not a terminal line")
        with run_log.kept(run, tmp_path / "runs" / run.run_id):
            threads = [threading.Thread(target=log.warning, args=(f"from thread {i}",)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            log.info("last line of the body")
    log.info("after the run: not in its file")
    written = (tmp_path / "runs" / run.run_id / RUN_LOG).read_text().splitlines()
    assert written[0].endswith("INFO components.test_log_file: before the run folder")
    assert sorted(line.split(": ", 1)[1] for line in written[1:5]) == [f"from thread {i}" for i in range(4)]
    assert written[5].endswith("last line of the body") and f"uploading it to MLflow run {run.run_id}" in written[6]
    assert len(written) == 7 and logging.getLogger().handlers.count(run_log) == 0
    assert logging.getLogger("components").level == logging.NOTSET  # Graft's loggers as they were
    uploaded = run.client.download_artifacts(run.run_id, RUN_LOG, str(tmp_path / "download"))
    assert open(uploaded).read().splitlines() == written


def test_a_failing_body_uploads_its_log_and_raises_its_own_error(tmp_path, run):
    with pytest.raises(ZeroDivisionError), capture_run_log() as run_log, run_log.kept(run, tmp_path / "run"):
        log.info("about to fail")
        _ = 1 / 0
    assert [a.path for a in run.client.list_artifacts(run.run_id)] == [RUN_LOG]


def test_an_interrupted_body_keeps_its_file_and_uploads_nothing(tmp_path, run):
    with pytest.raises(KeyboardInterrupt), capture_run_log() as run_log, run_log.kept(run, tmp_path / "run"):
        log.info("at epoch 3")
        raise KeyboardInterrupt
    *_, last_logged, said = (tmp_path / "run" / RUN_LOG).read_text().rstrip().splitlines()
    assert last_logged.endswith("at epoch 3") and "the run was stopped (SIGINT) " in said  # why it ends there, last
    assert run.client.list_artifacts(run.run_id) == []


def test_an_unwritable_run_folder_or_a_refused_upload_is_a_warning(tmp_path, run, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with capture_run_log() as run_log, run_log.kept(run, blocked / "run"):
        log.info("still running")
    assert "cannot write the run's log to" in caplog.text and run.client.list_artifacts(run.run_id) == []

    def refuse(*args):
        raise RegistryError("MLflow refused the upload")

    monkeypatch.setattr(Run, "log_artifact", refuse)
    with capture_run_log() as run_log, run_log.kept(run, tmp_path / "run"):
        log.info("still running")
    assert "could not upload the run's log to MLflow (MLflow refused the upload)" in caplog.text
    assert (tmp_path / "run" / RUN_LOG).is_file()
