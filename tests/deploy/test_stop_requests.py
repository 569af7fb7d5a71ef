"""A stop whose KeyboardInterrupt Python swallowed still stops the run at its next step, before anything is registered.

Python prints a KeyboardInterrupt raised while a garbage-collection callback runs as "Exception ignored" and goes on;
`flows.interrupts` records every stop in `components.core.progress`, and each stage, deploy step and epoch checks it.
"""

import pytest
from mlflow import MlflowClient

from components.core import progress
from tests.conftest import seeded_store
from tests.deploy.fixtures import NAME, deploy_tiny, tiny_model  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_progress():
    progress.reset()
    yield
    progress.reset()


def test_after_a_stop_request_every_stage_and_step_raises_until_the_next_run():
    progress.enter_stage("fine-tune")
    progress.note("epoch 1 of 5")
    progress.request_stop("SIGINT")
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        progress.note("epoch 2 of 5")
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        progress.enter_stage("evaluate")
    assert progress.where() == "fine-tune at epoch 1 of 5"
    progress.reset()  # a new run in the same process
    progress.enter_stage("choose")


def test_a_stop_in_the_first_epoch_promises_no_checkpoint_and_one_after_a_kept_epoch_does(tmp_path):
    """The interrupt's line says "resume from its last epoch checkpoint" only once an epoch checkpoint exists."""
    from components.train.loop import ResumeStore
    from flows.interrupts import Stop

    progress.enter_stage("fine-tune")
    progress.note("epoch 1 of 5")
    assert "no epoch had finished, so there is no checkpoint to resume from" in Stop("SIGINT", where=progress.where()).line()
    ResumeStore(tmp_path, "inputs", enabled=False).save("head", {"epoch": 1})  # train.resume: false, nothing to resume from
    assert "no checkpoint to resume from" in Stop("SIGINT", where=progress.where()).line()
    ResumeStore(tmp_path, "inputs").save("head", {"epoch": 1})  # what the epoch loop writes after each epoch
    progress.note("epoch 2 of 5")
    assert Stop("SIGINT", where=progress.where()).line().endswith("Run the same command to resume from its last epoch checkpoint")


def test_a_stop_swallowed_during_export_ends_the_deploy_at_the_gate_and_registers_nothing(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    import components.deploy.stage as stage

    export = stage.export

    def export_then_a_swallowed_sigterm(*args, **kwargs):
        exported = export(*args, **kwargs)
        progress.request_stop("SIGTERM")  # what the signal handler records; its KeyboardInterrupt got lost
        return exported

    monkeypatch.setattr(stage, "export", export_then_a_swallowed_sigterm)
    uri = f"sqlite:///{seeded_store(tmp_path / 'mlflow') / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        deploy_tiny(tiny_model, uri, NAME, tmp_path / "work")
    assert (tmp_path / "work" / "model.onnx").is_file()  # the export finished: the stop came in the middle of deploy
    client = MlflowClient(uri, uri)
    assert client.search_registered_models() == [] and client.search_model_versions() == []
