"""Fine-tuning in several processes (`train.processes`): torchrun starts real gloo processes on the
CPU, DistributedDataParallel averages their gradients, and the parent gets one model and every epoch's
metrics, or the processes' own error."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from components.backbones.zoo import get_spec
from components.core.errors import TrainingError
from components.data.folders import scan
from components.train.collectives import World, shard
from components.train.launcher import EpochProgress, check_setup, launch_command
from components.train.stage import fine_tune, forget_checkpoints, load_classifier, resume_key
from tests.train.test_train import accuracy, choice, make_params


def test_fine_tune_in_two_processes_learns_logs_every_epoch_and_keeps_one_model(digits_dir, feature_cache_dir, tmp_path, caplog):
    params = make_params(
        digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=3", "train.unfreeze=2",
        "train.processes=2", "train.freeze_bn=false",
    )
    split = scan(digits_dir)
    rows: list[tuple[int, dict]] = []
    elastic_before = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    with caplog.at_level("INFO", logger="components.train.launcher"):
        result = fine_tune(params, split, choice(), tmp_path / "run", on_epoch=lambda row, step: rows.append((step, row)))
    assert result.backbone_trained and result.epochs_run == 3
    # torchrun's own folders are in the job folder, not left behind in /tmp
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) == elastic_before
    assert (tmp_path / "run" / "distributed" / "torchrun-logs").is_dir()
    assert "fine-tune in 2 processes (gloo on the CPU)" in caplog.text and "torch.distributed.run --standalone" in caplog.text
    assert [line for line in caplog.messages if line.startswith("epoch ")] == [
        f"epoch {i}: train loss {row['train/loss']:.4f}, val loss {row['val/loss']:.4f}, val accuracy {row['val/accuracy']:.3f}"
        for i, row in enumerate(result.history, 1)
    ]
    assert accuracy(params, split, result) > 0.6  # chance is 1/3
    # the parent logged process 0's metrics of every epoch, as a one-process run does
    assert [step for step, _ in rows] == [1, 2, 3]
    assert [row for _, row in rows] == list(result.history)
    assert {"train/loss", "val/loss", "val/accuracy", "lr", "lr/backbone"} <= set(rows[-1][1])
    # one model: process 0's, which every process agreed on (the worker checks their hashes)
    job = tmp_path / "run" / "distributed"
    assert (job / "outcome.pt").is_file() and (job / "rank1.log").is_file() and (job / "torchrun.log").is_file()
    assert not (job / "error.json").exists()
    assert "backbone_state" in load_classifier(result.checkpoint_path)[1]
    # process 0 wrote an epoch checkpoint per epoch, the last one marked finished (kept until registration)
    key = resume_key(params, split, get_spec(result.backbone), result.image_size)
    assert key == result.resume_key
    kept = list((feature_cache_dir / "resume").glob(f"{key}-*"))
    assert kept and all(torch.load(p, weights_only=False)["finished"] for p in kept)
    forget_checkpoints(params, result)
    assert not list((feature_cache_dir / "resume").glob(f"{key}-*"))


def test_two_processes_train_the_same_model_as_one(digits_dir, feature_cache_dir, tmp_path):
    """Half of every batch in each process (one image more in one of them when the batch is odd),
    gradients averaged: the same steps as one process taking the whole batch (with nothing random in the step: a frozen backbone in eval mode, no augmentation)."""
    identity_augmentation = ["train.augment=true", "train.augment_crop_scale=1", "train.augment_rotate=0", "train.augment_color=0"]
    split = scan(digits_dir)
    # a batch of odd size gives the processes shares of 8 and 7 images: each share's gradient must weigh accordingly
    assert any(len(batch) % 2 for batch in torch.arange(len(split.train)).split(15)), "some batch must split unevenly"
    results = []
    for processes in (1, 2):
        params = make_params(
            digits_dir, tmp_path / f"p{processes}", feature_cache_dir, *identity_augmentation, "train.epochs=3",
            f"train.processes={processes}", "train.resume=false", "train.batch_size=15",
        )
        results.append(fine_tune(params, split, choice(), tmp_path / f"run{processes}"))
    one, two = results
    assert not one.backbone_trained and not two.backbone_trained
    assert (tmp_path / "run2" / "distributed" / "outcome.pt").is_file()  # it really ran under torchrun
    for a, b in zip(one.history, two.history, strict=True):
        for key in ("train/loss", "val/loss", "val/accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    head_one = load_classifier(one.checkpoint_path)[1]["head"]
    head_two = load_classifier(two.checkpoint_path)[1]["head"]
    for name in head_one:
        np.testing.assert_allclose(head_two[name].numpy(), head_one[name].numpy(), atol=1e-5)


def test_a_distributed_run_that_diverges_reports_the_processes_error(digits_dir, feature_cache_dir, tmp_path):
    params = make_params(
        digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=3", "train.unfreeze=all",
        "train.processes=2", "train.lr=1e12", "train.warmup_epochs=0", "train.resume=false",
    )
    with pytest.raises(TrainingError, match=r"diverged at epoch \d+ of fine-tune.*--set train\.lr="):
        fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    job = tmp_path / "run" / "distributed"
    error = json.loads((job / "error.json").read_text())
    assert error["type"] == "TrainingError"
    assert not (tmp_path / "run" / "model.pt").exists()  # nothing half-written for the flow to register
    assert "Traceback" in (job / "torchrun.log").read_text()  # the details are kept, off the terminal


def test_feature_extraction_on_cached_features_stays_in_one_process(digits_dir, feature_cache_dir, tmp_path, caplog):
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.processes=2", "train.epochs=2")
    with caplog.at_level("INFO"):
        result = fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    assert result.epochs_run == 2 and not (tmp_path / "run" / "distributed").exists()
    assert "train.processes=2 is not used by feature_extraction on cached features" in caplog.text


def test_setups_that_cannot_work_are_refused_with_the_fix(digits_dir, feature_cache_dir, tmp_path, caplog):
    from components.runtime.cpu import cpu_facts

    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.processes=4")
    with pytest.raises(TrainingError, match=r"torch sees 2 CUDA device\(s\).*--set train\.processes=2"):
        check_setup(params, cuda_devices=2)
    cores = cpu_facts().cores
    more = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", f"train.processes={cores + 1}",
                       f"train.batch_size={2 * cores + 2}")
    with caplog.at_level(logging.WARNING, logger="components"):
        check_setup(more, cuda_devices=0)  # CPU processes: any number, with a word when they outnumber the cores
    assert f"train.processes={cores + 1} on {cores} CPU core(s)" in caplog.text and f"--set train.processes={cores}" in caplog.text
    small = make_params(digits_dir, tmp_path, feature_cache_dir, "train.processes=4", "train.batch_size=6")
    with pytest.raises(TrainingError, match=r"train\.batch_size=6 cannot be shared.*train\.batch_size=8"):
        check_setup(small, cuda_devices=0)


def test_each_process_takes_a_disjoint_share_of_every_batch():
    batch = torch.tensor([7, 3, 9, 1, 4])
    shares = [shard(batch, World(rank, 2)) for rank in range(2)]
    assert sorted(torch.cat(shares).tolist()) == sorted(batch.tolist())
    assert [len(s) for s in shares] == [3, 2]
    assert torch.equal(shard(batch, World()), batch)
    command = launch_command(3, Path("/x/job.json"))
    assert "--nproc_per_node=3" in command and command[-2:] == ["components.train.worker", "/x/job.json"]
    assert "--log-dir=/x/torchrun-logs" in command


def test_progress_is_read_line_by_line_and_a_half_written_line_waits(tmp_path):
    path = tmp_path / "progress.jsonl"
    seen: list[tuple[int, dict]] = []
    progress = EpochProgress(path, lambda row, step: seen.append((step, row)))
    progress.poll()  # no file yet
    path.write_text(json.dumps({"metrics": {"val/loss": 1.0}, "step": 1}) + "\n" + '{"metrics": {"val/lo')
    progress.poll()
    assert seen == [(1, {"val/loss": 1.0})]
    with open(path, "a") as file:
        file.write('ss": 0.5}, "step": 2}\n')
    progress.poll()
    assert seen == [(1, {"val/loss": 1.0}), (2, {"val/loss": 0.5})]


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash of the flow's process while the training processes run."""


def test_an_interrupted_distributed_run_stops_its_processes_and_the_rerun_resumes(digits_dir, feature_cache_dir, tmp_path, caplog):
    import subprocess

    params = make_params(
        digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=3", "train.unfreeze=1",
        "train.patience=50", "train.processes=2",
    )
    split = scan(digits_dir)

    def interrupt(row: dict, step: int) -> None:
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fine_tune(params, split, choice(), tmp_path / "interrupted", on_epoch=interrupt)
    job = str(tmp_path / "interrupted" / "distributed" / "job.json")
    left = subprocess.run(["pgrep", "-f", job], capture_output=True, text=True).stdout.split()
    assert not left, f"training processes outlived the interrupted step: {left}"

    steps: list[int] = []
    with caplog.at_level("INFO", logger="components"):
        resumed = fine_tune(params, split, choice(), tmp_path / "resumed", on_epoch=lambda row, step: steps.append(step))
    assert resumed.resumed_from_epoch >= 2  # process 0 had written the epoch-2 checkpoint before reporting epoch 2
    assert steps == [1, 2, 3]  # the epochs it skipped are replayed to the logger, then it continued
    assert "resumed fine-tune from its epoch-" in (tmp_path / "resumed" / "distributed" / "torchrun.log").read_text()
