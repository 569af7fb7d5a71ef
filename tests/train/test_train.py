"""Fine-tune on tiny real data: every strategy learns, frozen parts stay frozen, the feature cache is
reused and invalidated, runs repeat exactly and resume after a crash, divergence is reported."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.backbones.spec import BackboneSpec
from components.backbones.unfreeze import block_count, select_trainable, trunk_blocks
from components.backbones.zoo import get_spec
from components.choose.ranking import ChooseResult
from components.core.config import load_params
from components.core.errors import ConfigError, ModelError, TrainingError
from components.core.files import file_md5
from components.data.folders import scan
from components.evaluate.stage import evaluate
from components.train.loop import ResumeStore, batch_indices, class_weights
from components.train.network import Precision, resolve_precision
from components.train.stage import fine_tune, forget_checkpoints, load_classifier, predict_logits, resume_key
from components.train.strategies import feature_standardisation, fold_standardisation, forget_trained_heads, train_head
from tests.conftest import REPO, tiny_overrides

SIZE = 32  # digits are 8x8 scans: 32 px is plenty, and keeps backbone epochs to about a second



def make_params(data_dir: Path, work: Path, cache_dir: Path, *extra: str):
    """The real params.yaml shrunk to toy size (see conftest.tiny_overrides), plus `extra` overrides."""
    return load_params(
        REPO / "params.yaml",
        [*tiny_overrides(data_dir, work, cache_dir), f"data.image_size={SIZE}", "train.batch_size=16", *extra],
    )


def choice(name: str = "efficientnet_lite0", size: int = SIZE) -> ChooseResult:
    return ChooseResult(chosen=name, image_size=size, score_name="logme", reason="test", candidates=(), seconds=0.0)


def accuracy(params, split, result) -> float:
    logits = predict_logits(params, result, [s.path for s in split.val])
    return float((logits.argmax(1) == np.array([s.label for s in split.val])).mean())


def backbone_state(result) -> dict[str, torch.Tensor]:
    return load_classifier(result.checkpoint_path)[0].backbone.state_dict()


# --- each strategy learns ------------------------------------------------------------------------


def test_feature_extraction_beats_chance_and_keeps_backbone_frozen(digits_dir, feature_cache_dir, tmp_path, monkeypatch):
    """Feature extraction beats chance and leaves the backbone as it was; its scores from cached features are the
    deployed model's, read with the head alone (no backbone built)."""
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "data.image_size=64")
    split = scan(digits_dir)
    result = fine_tune(params, split, choice(size=64), tmp_path / "run")
    assert result.epochs_run >= result.best_epoch >= 1 and not result.backbone_trained
    evaluation = evaluate(params, split, result, tmp_path / "run")
    assert evaluation.test["accuracy"] > 0.6  # chance is 1/3
    model, ckpt = load_classifier(result.checkpoint_path)
    assert set(ckpt) >= {"backbone", "image_size", "classes", "head", "config", "history"}
    assert "backbone_state" not in ckpt  # nothing to store: the pre-trained weights are unchanged
    pretrained = get_spec("efficientnet_lite0").build(64).state_dict()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    # the cached-feature path scores exactly the model that is deployed
    from components.data.images import load_batch

    with torch.no_grad():
        direct = model(torch.from_numpy(load_batch([s.path for s in split.val], 64))).numpy()
    with monkeypatch.context() as patch:  # every row is cached: the backbone is not needed, so not built
        patch.setattr(BackboneSpec, "build", lambda *a, **k: pytest.fail("a backbone was built to score cached features"))
        cached = torch.softmax(torch.from_numpy(predict_logits(params, result, [s.path for s in split.val])), 1).numpy()
    np.testing.assert_allclose(cached, direct, atol=1e-5)


def test_feature_extraction_computes_missing_features_with_the_exported_backbone(digits_dir, tmp_path, monkeypatch):
    """Images the choose stage never saw (here: all of them) get their features from the backbone graph the
    choose stage exported, on onnxruntime, in training and in evaluation; eager PyTorch never runs."""
    from components.backbones import features
    from components.backbones.export import backbone_onnx_path, export_backbone
    from components.data.images import load_batch

    params = make_params(digits_dir, tmp_path, tmp_path / "cache", "data.image_size=64")
    spec, split = get_spec("efficientnet_lite0"), scan(digits_dir)
    export_backbone(spec.build(64, seed=params.train.seed), spec, 64, backbone_onnx_path(params.data.cache_dir, spec, 64, params.train.seed, params.deploy.opset), params.deploy.opset)

    def eager(*args, **kwargs):
        raise AssertionError("eager PyTorch computed features although the exported backbone is cached")

    with monkeypatch.context() as patch:
        patch.setattr(features, "torch_extractor", eager)
        result = fine_tune(params, split, choice(size=64), tmp_path / "run")
        test_paths = [s.path for s in split.test]
        logits = predict_logits(params, result, test_paths)
    assert result.features_computed == len(split.train) + len(split.val) and not result.backbone_trained
    model, _ = load_classifier(result.checkpoint_path)
    with torch.no_grad():
        direct = model(torch.from_numpy(load_batch(test_paths, 64))).numpy()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), direct, atol=1e-5)

    # choose.onnx_features=false: eager PyTorch, to the same result
    eager_params = make_params(digits_dir, tmp_path, tmp_path / "eager-cache", "data.image_size=64", "choose.onnx_features=false")
    export_backbone(spec.build(64, seed=params.train.seed), spec, 64, backbone_onnx_path(eager_params.data.cache_dir, spec, 64, params.train.seed, params.deploy.opset), params.deploy.opset)
    calls = []
    real = features.torch_extractor
    monkeypatch.setattr(features, "torch_extractor", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_allclose(predict_logits(eager_params, result, test_paths), logits, atol=1e-4)
    assert calls


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("fine_tune", ()), ("two_stage", ()), ("scratch", ("train.batch_size=8", "train.epochs=5"))],
)
def test_network_strategies_beat_chance(digits_dir, feature_cache_dir, tmp_path, strategy, extra):
    params = make_params(digits_dir, tmp_path, feature_cache_dir, f"train.strategy={strategy}", "train.epochs=3", *extra)
    split = scan(digits_dir)
    rows: list[tuple[int, dict]] = []
    result = fine_tune(params, split, choice(), tmp_path / "run", on_epoch=lambda row, step: rows.append((step, row)))
    assert result.strategy == strategy and result.backbone_trained
    assert result.backbone == ("random_efficientnet_lite0" if strategy == "scratch" else "efficientnet_lite0")
    assert accuracy(params, split, result) > 0.6  # chance is 1/3
    # per-epoch metrics reach the callback, steps counted across two_stage's stages
    assert [step for step, _ in rows] == list(range(1, result.epochs_run + 1))
    assert {"train/loss", "val/loss", "val/accuracy", "lr", "lr/backbone"} <= set(rows[-1][1])
    # discriminative learning rates: the unfrozen blocks at train.backbone_lr_ratio of the head's rate
    ratio = {"fine_tune": params.train.backbone_lr_ratio, "two_stage": 1.0, "scratch": 1.0}[strategy]
    backbone_rows = [row for _, row in rows if "lr/backbone" in row]
    assert backbone_rows and all(row["lr/backbone"] == pytest.approx(row["lr"] * ratio) for row in backbone_rows)
    if strategy == "two_stage":
        # stage 1 trains the head alone on cached features (no backbone rate), at train.lr; stage 2 runs every
        # trainable layer at train.lr x train.backbone_lr_ratio, warm-up first
        head_rows = [row for _, row in rows if "lr/backbone" not in row]
        assert head_rows and rows[0][1] is head_rows[0] and all(row["lr"] == params.train.lr for row in head_rows)
        assert result.features_cached + result.features_computed == len(split.train) + len(split.val)
        low = params.train.lr * params.train.backbone_lr_ratio
        assert max(row["lr"] for row in backbone_rows) == pytest.approx(low)
    # the checkpoint holds the trained backbone, and the model it rebuilds is the one that was scored
    assert "backbone_state" in load_classifier(result.checkpoint_path)[1]
    initial = get_spec(result.backbone).build(SIZE, seed=params.train.seed).state_dict()
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in backbone_state(result).items())


def test_every_epoch_is_one_log_line_with_its_loss_accuracy_time_and_speed(digits_dir, feature_cache_dir, tmp_path, caplog):
    """tqdm is off where output is not a terminal; the log still shows each epoch (in files and Prefect's log too)."""
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=2")
    with caplog.at_level(logging.INFO, logger="components"):
        result = fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    lines = [m for m in caplog.messages if m.startswith("fine-tune: epoch ")]
    assert len(lines) == result.epochs_run == 2
    row = result.history[-1]
    assert lines[-1].startswith(f"fine-tune: epoch 2 of 2, train loss {row['train/loss']:.4f}, val loss {row['val/loss']:.4f}, "
                                f"val accuracy {row['val/accuracy']:.3f}, ")
    assert lines[-1].endswith(f"{row['time/epoch_seconds']:.1f} s, {row['train/images_per_second']:.0f} images/s")


def test_predict_logits_through_a_trained_backbone_match_the_deployable_model(digits_dir, feature_cache_dir, tmp_path):
    from components.data.images import load_batch

    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=1")
    split = scan(digits_dir)
    result = fine_tune(params, split, choice(), tmp_path / "run")
    model, _ = load_classifier(result.checkpoint_path)
    with torch.no_grad():
        direct = model(torch.from_numpy(load_batch([s.path for s in split.val], SIZE))).numpy()
    logits = predict_logits(params, result, [s.path for s in split.val])
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), direct, atol=1e-5)


# --- frozen means frozen -------------------------------------------------------------------------


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_fine_tune_changes_only_the_unfrozen_blocks(digits_dir, feature_cache_dir, tmp_path, freeze_bn):
    params = make_params(
        digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=2", "train.unfreeze=2",
        f"train.freeze_bn={str(freeze_bn).lower()}", "train.lr=0.01",
    )
    result = fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    trained = backbone_state(result)
    pretrained = get_spec("efficientnet_lite0").build(SIZE)
    before = pretrained.state_dict()
    # the last two blocks are the conv head and the last MBConv block
    unfrozen = ("net._conv_head.", "net._bn1.", f"net._blocks.{len(pretrained.net._blocks) - 1}.")
    changed = {name for name, tensor in trained.items() if not torch.equal(tensor, before[name])}
    assert changed, "fine-tuning changed nothing"
    assert all(name.startswith(unfrozen) for name in changed), sorted(n for n in changed if not n.startswith(unfrozen))
    assert any(name.startswith(unfrozen) and name.endswith("weight") for name in changed)
    stats_changed = {name for name in changed if name.endswith(("running_mean", "running_var"))}
    if freeze_bn:
        assert stats_changed == set()
    else:
        assert stats_changed and all(name.startswith(unfrozen) for name in stats_changed)


def test_unfreeze_counts_blocks_from_the_output_and_rejects_too_many():
    lite = get_spec("efficientnet_lite0").build(SIZE)
    total = len(trunk_blocks(lite)) + 1
    assert total == len(lite.net._blocks) + 2  # stem + MBConv blocks + conv head
    trainable = select_trainable(lite, 1)
    assert {n for n, p in lite.named_parameters() if p.requires_grad} == {n for n, _ in lite.named_parameters() if n.startswith(("net._conv_head", "net._bn1"))}
    assert select_trainable(lite, "all").parameters == sum(p.numel() for p in lite.parameters())
    assert trainable.blocks == 1 and trainable.total_blocks == total
    with pytest.raises(ConfigError, match=rf"train.unfreeze={total + 1}.*up to {total}"):
        select_trainable(lite, total + 1)
    resnet = get_spec("random_resnet18").build(SIZE)
    select_trainable(resnet, 1)
    assert {n.split(".")[0] for n, p in resnet.named_parameters() if p.requires_grad} == {"layer4"}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "random_resnet18", "random_mobilenet_v3_small", "random_vit_b_16"])
def test_block_count_from_the_architecture_alone_is_what_the_built_backbone_has(name):
    """What the run's early `train.unfreeze` check counts (meta device, no weights) is what the stage counts."""
    spec = get_spec(name)
    size = spec.resolve_size(SIZE)
    assert block_count(spec, size) == select_trainable(spec.build(size), 1).total_blocks


class _Payload:
    """Unpickled, it would leave a file behind: what a malicious checkpoint or weights file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_malicious_weights_file_or_checkpoint_is_refused_without_running_its_code(tmp_path):
    """The files Graft loads with torch (a backbone's weights from choose.weights, a training checkpoint, an
    epoch's resume state) are read with weights_only=True: a pickle that would run code is refused instead."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker), "head": _Payload(marker), "key": _Payload(marker)}, evil)
    with pytest.raises(ModelError, match="cannot read weights file .*evil.pt"):
        get_spec("efficientnet_lite0").with_weights(evil).build(SIZE)
    with pytest.raises(pickle.UnpicklingError):
        load_classifier(evil)
    store = ResumeStore(tmp_path, "key")
    shutil.copy(evil, store.path("head"))
    assert store.load("head") is None  # unreadable: training starts fresh
    assert not marker.exists()



# --- the feature cache ---------------------------------------------------------------------------


def test_feature_cache_is_reused_and_invalidated_when_the_data_changes(digits_dir, tmp_path):
    data = shutil.copytree(digits_dir, tmp_path / "data")
    cache = tmp_path / "cache"
    params = make_params(data, tmp_path, cache, "train.epochs=3")
    split = scan(data)
    trained_on = len(split.train) + len(split.val)  # training reads train and val features; test waits for evaluate
    first = fine_tune(params, split, choice(), tmp_path / "run1")
    assert (first.features_cached, first.features_computed) == (0, trained_on)
    second = fine_tune(params, scan(data), choice(), tmp_path / "run2")
    assert (second.features_cached, second.features_computed) == (trained_on, 0)
    changed = sorted((data / "7").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(changed))).save(changed)  # new bytes: a new image, maybe in another split
    split = scan(data)
    used = [s.digest for s in split.train + split.val]
    third = fine_tune(params, split, choice(), tmp_path / "run3")
    assert third.features_computed == used.count(file_md5(changed)) and third.features_cached == len(used) - third.features_computed


@pytest.mark.parametrize("damage", ["truncated", "bytes flipped"])
def test_a_damaged_feature_cache_is_recomputed_with_a_warning(digits_dir, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    params = make_params(digits_dir, tmp_path, cache, "train.epochs=2")
    split = scan(digits_dir)
    first = fine_tune(params, split, choice(), tmp_path / "run1")
    (stored,) = (cache / "features").glob("*.npz")
    data = bytearray(stored.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    stored.write_bytes(bytes(data))
    forget_trained_heads()
    with caplog.at_level(logging.WARNING, logger="components"):
        again = fine_tune(params, split, choice(), tmp_path / "run2")
    assert f"feature cache {stored} is unreadable" in caplog.text and "recomputing it" in caplog.text
    assert (again.features_cached, again.features_computed) == (0, first.features_computed)
    assert again.best_val_loss == pytest.approx(first.best_val_loss, rel=1e-5)
    assert not list((cache / "features").glob(".*.tmp"))  # and the rewrite left no temporary file


def test_augmentation_bypasses_the_cache_and_says_why(digits_dir, feature_cache_dir, tmp_path, caplog):
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.augment=true", "train.epochs=2")
    with caplog.at_level(logging.INFO, logger="components"):
        result = fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    assert "feature cache is bypassed" in caplog.text and "random crops" in caplog.text
    assert (result.features_cached, result.features_computed) == (0, 0)
    assert not result.backbone_trained
    pretrained = get_spec("efficientnet_lite0").build(SIZE).state_dict()
    assert all(torch.equal(t, pretrained[n]) for n, t in backbone_state(result).items())


# --- repeatable and resumable --------------------------------------------------------------------


def test_same_seed_and_data_give_the_same_model_and_another_seed_does_not(digits_dir, feature_cache_dir, tmp_path):
    base = ("train.strategy=fine_tune", "train.epochs=2", "train.augment=true", "train.resume=false")
    split = scan(digits_dir)
    runs = [
        fine_tune(make_params(digits_dir, tmp_path, feature_cache_dir, *base, f"train.seed={seed}"), split, choice(), tmp_path / f"run{i}")
        for i, seed in enumerate((7, 7, 8))
    ]
    states = [load_classifier(r.checkpoint_path)[0].state_dict() for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert [r.history[-1]["val/loss"] for r in runs[:2]] == [runs[0].history[-1]["val/loss"]] * 2
    assert not torch.equal(states[0]["head.weight"], states[2]["head.weight"])


class Killed(Exception):
    """Stands in for the process dying right after an epoch's checkpoint was written."""


@pytest.mark.parametrize(
    ("strategy", "kill_at"),
    [("fine_tune", 2), ("two_stage", 5), ("feature_extraction", 2)],
)
def test_a_killed_run_resumes_and_ends_exactly_like_an_uninterrupted_one(digits_dir, feature_cache_dir, tmp_path, caplog, strategy, kill_at):
    # augmentation on, so the resumed run must also continue the same random crops
    extra = ("train.augment=true",) if strategy == "fine_tune" else ()
    params = make_params(digits_dir, tmp_path, feature_cache_dir, f"train.strategy={strategy}", "train.epochs=3", "train.patience=50", *extra)
    split = scan(digits_dir)
    reference = fine_tune(params, split, choice(), tmp_path / "reference")
    assert reference.epochs_run > kill_at
    forget_checkpoints(params, reference)  # as the flow does once the model is registered

    def die(row: dict, step: int) -> None:
        if step == kill_at:
            raise Killed

    # each run below stands for a new process: none has the heads this one trained (`train_head` keeps them)
    forget_trained_heads()
    with pytest.raises(Killed):
        fine_tune(params, split, choice(), tmp_path / "killed", on_epoch=die)
    key = resume_key(params, split, get_spec("efficientnet_lite0"), SIZE)
    left = list((params.data.cache_dir / "resume").glob(f"{key}-*.pt"))  # this run's: the cache folder is shared
    assert left, "no epoch checkpoint was left behind"
    if strategy == "fine_tune":  # the frozen blocks are left out: the rerun builds the same pre-trained weights again
        state = torch.load(left[0], weights_only=True)
        assert state["frozen"] and not set(state["frozen"]) & (set(state["model"]) | set(state["best_model"]))

    steps: list[int] = []
    forget_trained_heads()
    with caplog.at_level(logging.INFO, logger="components"):
        resumed = fine_tune(params, split, choice(), tmp_path / "resumed", on_epoch=lambda row, step: steps.append(step))
    assert "resumed" in caplog.text
    assert resumed.resumed_from_epoch == kill_at
    assert steps == list(range(1, reference.epochs_run + 1))  # replayed, then continued
    expected = load_classifier(reference.checkpoint_path)[0].state_dict()
    actual = load_classifier(resumed.checkpoint_path)[0].state_dict()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert [r["val/loss"] for r in resumed.history] == [r["val/loss"] for r in reference.history]
    # the finished state stays until the model is registered (a stop in a later stage must not retrain) ...
    kept = list((params.data.cache_dir / "resume").glob(f"{resumed.resume_key}-*"))
    assert kept and all(torch.load(p, weights_only=False)["finished"] for p in kept)
    forget_trained_heads()
    again = fine_tune(params, split, choice(), tmp_path / "again")
    assert again.resumed_from_epoch == reference.epochs_run and again.epochs_run == reference.epochs_run
    # ... and then it is forgotten
    forget_checkpoints(params, resumed)
    assert not list((params.data.cache_dir / "resume").glob(f"{resumed.resume_key}-*"))


def test_a_checkpoint_that_froze_other_parameters_is_not_resumed(digits_dir, feature_cache_dir, tmp_path, caplog):
    """Its frozen parameters are not in it, so it fits only a model that freezes the same ones: another is
    trained from the start, with a warning, instead of being given weights that were never trained."""
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=2", "train.patience=49")
    split = scan(digits_dir)

    def die(row: dict, step: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        fine_tune(params, split, choice(), tmp_path / "killed", on_epoch=die)
    key = resume_key(params, split, get_spec("efficientnet_lite0"), SIZE)
    path = params.data.cache_dir / "resume" / f"{key}-fine-tune.pt"
    state = torch.load(path, weights_only=True)
    state["frozen"] = state["frozen"][1:]  # as if one more parameter had trained
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="components"):
        again = fine_tune(params, split, choice(), tmp_path / "again")
    assert "froze other parameters than this run; training from the start" in caplog.text
    assert again.resumed_from_epoch == 0 and again.epochs_run == 2
    forget_checkpoints(params, again)


_SIGKILL_CHILD = """
import os, signal, sys
from pathlib import Path
from components.data.folders import scan
from components.train.stage import fine_tune
from tests.train.test_train import choice, make_params

data, work, cache, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
params = make_params(data, work, cache, *sys.argv[5:])


def die(row, step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no finally: what the OOM killer or kill -9 does


fine_tune(params, scan(data), choice(), work / "killed", on_epoch=die)
"""


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(digits_dir, feature_cache_dir, tmp_path):
    """A real SIGKILL in another process (not an exception): the rerun resumes and ends like an uninterrupted run."""
    import signal
    import subprocess
    import sys

    overrides = ("train.strategy=fine_tune", "train.epochs=3", "train.patience=50")
    params = make_params(digits_dir, tmp_path, feature_cache_dir, *overrides)
    split = scan(digits_dir)
    reference = fine_tune(params, split, choice(), tmp_path / "reference")
    forget_checkpoints(params, reference)
    killed = subprocess.run(
        [sys.executable, "-c", _SIGKILL_CHILD, str(digits_dir), str(tmp_path), str(feature_cache_dir), "2", *overrides],
        cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "model.pt").exists(), "a killed run left a final checkpoint"
    resumed = fine_tune(params, split, choice(), tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == reference.epochs_run
    # two processes may order float sums differently, so "the same" is to float32 rounding here
    # (within one process the resumed weights are bitwise equal: the test above)
    expected = load_classifier(reference.checkpoint_path)[0].state_dict()
    actual = load_classifier(resumed.checkpoint_path)[0].state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name].float(), tensor.float(), rtol=1e-4, atol=1e-5), name
    assert resumed.best_val_loss == pytest.approx(reference.best_val_loss, rel=1e-3)
    forget_checkpoints(params, resumed)


def test_other_inputs_do_not_resume(digits_dir, feature_cache_dir, tmp_path):
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.epochs=3", "train.patience=50")
    split = scan(digits_dir)

    def die(row: dict, step: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        fine_tune(params, split, choice(), tmp_path / "killed", on_epoch=die)
    other = params.model_copy(update={"train": params.train.model_copy(update={"lr": 0.002})})
    assert fine_tune(other, split, choice(), tmp_path / "other").resumed_from_epoch == 0
    no_resume = params.model_copy(update={"train": params.train.model_copy(update={"resume": False})})
    assert fine_tune(no_resume, split, choice(), tmp_path / "fresh").resumed_from_epoch == 0


# --- the training loop ---------------------------------------------------------------------------


def test_early_stopping_restores_the_best_epoch(tiny_params):
    """Training stops `patience` epochs after the best validation loss, and the head it returns is the best
    epoch's: its validation loss is the best one recorded, below the last epoch's."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 2, size=60)  # pure noise: validation loss stops improving quickly
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"epochs": 500, "patience": 3})})
    head, result = train_head(params, x[:40], y[:40], x[40:], y[40:])
    losses = [h["val/loss"] for h in result.history]
    assert len(losses) < 500
    best = int(np.argmin(losses))
    assert len(losses) - 1 - best == 3 and result.best_epoch == best + 1
    logits = torch.from_numpy(x[40:]) @ head["weight"].T + head["bias"]  # the returned head takes raw features
    restored = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[40:]).long()))
    assert restored == pytest.approx(losses[best], rel=1e-5) and restored < losses[-1] - 1e-6


def test_divergence_names_the_epoch_and_suggests_a_lower_lr(tiny_params):
    x = np.full((20, 4), 1e30, dtype=np.float32)
    x[::2] *= -1
    y = np.arange(20) % 2
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"lr": 1e30})})
    with pytest.raises(TrainingError, match=r"diverged at epoch \d+.*nothing was registered.*lower train.lr"):
        train_head(params, np.vstack([x, x * np.inf]), np.concatenate([y, y]), x, y)


def test_a_diverging_fine_tune_saves_nothing(digits_dir, feature_cache_dir, tmp_path):
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.lr=1e30", "train.epochs=5")
    before = set((params.data.cache_dir / "resume").glob("*.pt"))
    with pytest.raises(TrainingError, match=r"diverged at epoch 1 .*--set train.lr="):
        fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists()
    assert set((params.data.cache_dir / "resume").glob("*.pt")) == before, "a diverged run left resume state"


def test_balancing_smoothing_and_clipping_reach_the_loss_and_the_optimiser_and_still_learn(digits_dir, feature_cache_dir, tmp_path, monkeypatch):
    import components.train.strategies as strategies

    criteria, clipped = [], []
    real_criterion, real_clip = strategies.make_criterion, torch.nn.utils.clip_grad_norm_

    def criterion_spy(*args, **kwargs):
        criteria.append(real_criterion(*args, **kwargs))
        return criteria[-1]

    def clip_spy(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        before = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        clipped.append((max_norm, float(before), float(after)))
        return before

    optimizers, real_adamw = [], strategies.adamw
    monkeypatch.setattr(strategies, "adamw", lambda *args: optimizers.append(real_adamw(*args)) or optimizers[-1])
    monkeypatch.setattr(strategies, "make_criterion", criterion_spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    params = make_params(
        digits_dir, tmp_path, feature_cache_dir, "train.balance=class_weights", "train.label_smoothing=0.1", "train.grad_clip=0.05",
        "train.weight_decay=0.0123",
    )
    split = scan(digits_dir)
    forget_trained_heads()  # the head trains here, not from this process's memory of an earlier test
    assert accuracy(params, split, fine_tune(params, split, choice(), tmp_path / "run")) > 0.6
    (criterion,) = criteria
    labels = torch.tensor([sample.label for sample in split.train])
    torch.testing.assert_close(criterion.weight, class_weights(labels, len(split.classes)))
    assert criterion.label_smoothing == 0.1
    (optimizer,) = optimizers
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0123]
    assert clipped and {norm for norm, _, _ in clipped} == {0.05}
    assert max(before for _, before, _ in clipped) > 0.05  # some steps needed clipping ...
    assert max(after for _, _, after in clipped) <= 0.05 * 1.001  # ... and every step stepped with at most that norm


def test_class_weights_and_the_balanced_sampler_even_out_classes(tiny_params):
    labels = torch.tensor([0] * 90 + [1] * 10)
    torch.testing.assert_close(class_weights(labels, 2), torch.tensor([100 / 180, 100 / 20]))
    cfg = tiny_params.train.model_copy(update={"balance": "sampler", "batch_size": 32})
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([torch.cat(batch_indices(labels, 2, cfg, generator)) for _ in range(20)])
    assert 0.4 < float((labels[drawn] == 1).float().mean()) < 0.6  # 10% of the data, half the draws
    plain = tiny_params.train.model_copy(update={"batch_size": 32})
    assert sorted(torch.cat(batch_indices(labels, 2, plain, generator)).tolist()) == list(range(100))


def test_standardisation_folds_exactly_and_ignores_features_that_never_vary():
    head = {"weight": torch.randn(3, 5), "bias": torch.randn(3)}
    mean, scale = torch.randn(5), torch.rand(5) + 0.5
    features = torch.randn(7, 5)
    folded = fold_standardisation(head, mean, scale)
    expected = ((features - mean) / scale) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(features @ folded["weight"].T + folded["bias"], expected)
    train = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    train[:, 1] = 0.0  # a dead unit
    mean, scale = feature_standardisation(train)
    assert torch.isinf(scale[1]) and torch.isfinite(scale[[0, 2]]).all()
    assert fold_standardisation({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, mean, scale)["weight"][:, 1].eq(0).all()


def test_precision_per_device_and_path(tiny_params):
    """CUDA: autocast and channels-last. CPU: float32, except bfloat16 on a cached trunk's tail where the CPU has
    native bfloat16 (auto), or everywhere when asked (true); never without native bfloat16."""
    cfg = tiny_params.train
    assert cfg.mixed_precision == "auto"
    cpu = resolve_precision(cfg, cuda_available=False, cpu_bf16=False)
    assert cpu == Precision("cpu", None, False) and cpu.scaler() is None
    with cpu.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert resolve_precision(cfg, cached_trunk=True, cuda_available=False, cpu_bf16=False).amp_dtype is None
    tail = resolve_precision(cfg, cached_trunk=True, cuda_available=False, cpu_bf16=True)
    assert tail == Precision("cpu", torch.bfloat16, False) and tail.scaler() is None
    with tail.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert resolve_precision(cfg, cached_trunk=False, cuda_available=False, cpu_bf16=True).amp_dtype is None
    everywhere = cfg.model_copy(update={"mixed_precision": True})
    assert resolve_precision(everywhere, cached_trunk=False, cuda_available=False, cpu_bf16=True).amp_dtype == torch.bfloat16
    off = cfg.model_copy(update={"mixed_precision": False})
    assert resolve_precision(off, cached_trunk=True, cuda_available=False, cpu_bf16=True).amp_dtype is None
    assert resolve_precision(cfg, cuda_available=True, bf16_supported=True) == Precision("cuda", torch.bfloat16, True)
    assert resolve_precision(cfg, cuda_available=True, bf16_supported=False).amp_dtype == torch.float16
    full = cfg.model_copy(update={"mixed_precision": False, "channels_last": False})
    assert resolve_precision(full, cuda_available=True, bf16_supported=True) == Precision("cuda", None, False)
    assert resolve_precision(cfg.model_copy(update={"device": "cpu"}), cuda_available=True, cpu_bf16=False).device == "cpu"
    with pytest.raises(TrainingError, match="train.device=cuda.*no CUDA.*train.device=auto"):
        resolve_precision(cfg.model_copy(update={"device": "cuda"}), cuda_available=False)
    assert load_params(REPO / "params.yaml", ["train.mixed_precision=true"]).train.mixed_precision is True


def test_augmentation_is_per_image_seeded_and_keeps_the_format(tiny_params):
    from components.train.augment import Augmenter

    cfg = tiny_params.train.model_copy(update={"augment": True, "augment_flip": True})
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, size=(4, SIZE, SIZE, 3), dtype=np.uint8))
    images[1] = images[0]
    augmenter = Augmenter(cfg, SIZE)
    torch.manual_seed(0)
    first = augmenter(images)
    torch.manual_seed(0)
    again = augmenter(images)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, images)
    assert not torch.equal(first[0], first[1])  # same picture, different random crop
    assert "RandomResizedCrop" in augmenter.describe()


@pytest.mark.slow  # torch.export of the whole model takes ~15-30 s on two shared cores
def test_the_trained_model_is_logged_to_mlflow_with_its_signature_and_the_same_model_again_from_its_copy(
    digits_dir, feature_cache_dir, tmp_path, monkeypatch, temp_in_tmp_path
):
    """The PyTorch model is logged with its signature and loads to the same outputs. Logged a second time (a rerun
    trains the same weights), it comes from the build cache without another export: the same `model.pt2` bytes,
    with a `MLmodel` of its own (a new uuid), and it loads to the same outputs."""
    import mlflow.pytorch
    import yaml
    from mlflow.models import get_model_info

    from components.data.images import load_batch
    from components.registry.tracking import parent_run
    from components.train.report import log_trained_model

    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.epochs=2")
    split = scan(digits_dir)
    result = fine_tune(params, split, choice(), tmp_path / "run")
    cache_dir = tmp_path / "cache" / "pt2"
    with parent_run(params) as run:
        uri = log_trained_model(run, result, cache_dir)
    signature = get_model_info(uri).signature
    spec = signature.inputs.to_dict()[0]["tensor-spec"]
    assert spec["dtype"] == "uint8" and list(spec["shape"]) == [-1, SIZE, SIZE, 3]
    assert list(signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3]
    logged = mlflow.pytorch.load_model(uri)
    images = torch.from_numpy(load_batch([s.path for s in split.val[:4]], SIZE))
    with torch.no_grad():
        expected = load_classifier(result.checkpoint_path)[0](images)
        torch.testing.assert_close(logged(images), expected)

    monkeypatch.setattr(mlflow.pytorch, "save_model", lambda *a, **k: pytest.fail("the same model was exported again"))
    with parent_run(params) as run:
        again = log_trained_model(run, result, cache_dir)
    assert again != uri
    first, second = (Path(mlflow.artifacts.download_artifacts(u, dst_path=str(tmp_path / name))) for u, name in ((uri, "a"), (again, "b")))
    assert (second / "data" / "model.pt2").read_bytes() == (first / "data" / "model.pt2").read_bytes()
    before, after = (yaml.safe_load((folder / "MLmodel").read_text()) for folder in (first, second))
    assert after["model_uuid"] != before["model_uuid"]
    assert {k: v for k, v in after.items() if k not in ("model_uuid", "utc_time_created")} == {
        k: v for k, v in before.items() if k not in ("model_uuid", "utc_time_created")}
    with torch.no_grad():
        torch.testing.assert_close(mlflow.pytorch.load_model(again)(images), expected)


@pytest.mark.slow  # two torch.export runs of the whole model
def test_a_new_model_built_like_one_exported_before_is_written_into_that_archive_the_same_bytes_as_its_own_export(
    digits_dir, feature_cache_dir, tmp_path, monkeypatch, temp_in_tmp_path
):
    """A model with new weights but the structure of one exported before (a retrain, a new project on the same
    machine) is not exported: its weights are put into the kept archive, and the result is its own export's
    `model.pt2` byte for byte, with its own metadata in `MLmodel`, and loads to the model's outputs. A template
    that does not hold the model's weights is refused."""
    import dataclasses

    import mlflow.pytorch
    import yaml

    from components.data.images import load_batch
    from components.registry.tracking import parent_run
    from components.train.report import PT2_FILE, TemplateMismatch, fill_template, log_trained_model

    split = scan(digits_dir)
    first = fine_tune(make_params(digits_dir, tmp_path, feature_cache_dir), split, choice(), tmp_path / "a")
    # fine-tuned: the backbone's weights (and BatchNorm's counters) differ from the template's too, not only the head's
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=1")
    second = dataclasses.replace(fine_tune(params, split, choice(), tmp_path / "b"), classes=("nought", "one", "two"))
    before, after = (load_classifier(result.checkpoint_path)[0].state_dict() for result in (first, second))
    assert {name for name in before if not torch.equal(before[name], after[name])} > {"head.weight", "head.bias"}
    templates = tmp_path / "pt2-templates"
    with parent_run(params) as run:
        log_trained_model(run, first, template_dir=templates)
    assert len(list(templates.iterdir())) == 1

    export = mlflow.pytorch.save_model
    monkeypatch.setattr(mlflow.pytorch, "save_model", lambda *a, **k: pytest.fail("a model built like the template was exported"))
    with parent_run(params) as run:
        filled = log_trained_model(run, second, template_dir=templates)
    monkeypatch.setattr(mlflow.pytorch, "save_model", export)
    with parent_run(params) as run:
        exported = log_trained_model(run, second)
    ours, theirs = (Path(mlflow.artifacts.download_artifacts(u, dst_path=str(tmp_path / name))) for u, name in ((filled, "f"), (exported, "e")))
    assert (ours / PT2_FILE).read_bytes() == (theirs / PT2_FILE).read_bytes()
    mine, own = (yaml.safe_load((folder / "MLmodel").read_text()) for folder in (ours, theirs))
    assert mine["metadata"]["classes"] == ["nought", "one", "two"] and mine["model_uuid"] != own["model_uuid"]
    assert {k: v for k, v in mine.items() if k not in ("model_uuid", "utc_time_created")} == {
        k: v for k, v in own.items() if k not in ("model_uuid", "utc_time_created")}
    images = torch.from_numpy(load_batch([s.path for s in split.val[:4]], SIZE))
    with torch.no_grad():
        torch.testing.assert_close(mlflow.pytorch.load_model(filled)(images), load_classifier(second.checkpoint_path)[0](images))

    wider, _ = load_classifier(second.checkpoint_path)
    wider.head = torch.nn.Linear(wider.head.in_features, 4)
    with pytest.raises(TemplateMismatch, match="head.weight has another size"):
        fill_template(ours / PT2_FILE, wider, tmp_path / "wider" / "model.pt2")


def test_an_interrupt_during_a_checkpoint_write_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A Ctrl-C (or SIGTERM) that lands inside torch.save: its zip writer's clean-up raises "unexpected pos ..." over
    the interrupt. The interrupt is what propagates, the half-written file is gone and the previous checkpoint stays."""
    import io

    import components.train.loop as loop

    path = tmp_path / "resume" / "run-fine-tune.pt"
    loop.save_checkpoint(path, epoch=1, weights=torch.zeros(64, 64))

    class InterruptedFile(io.FileIO):
        writes = 0

        def write(self, data):  # noqa: ANN001, ANN202 - io.FileIO's signature
            InterruptedFile.writes += 1
            if InterruptedFile.writes == 3:
                raise KeyboardInterrupt  # as a signal handler raises it, between two writes of the record
            return super().write(data)

    monkeypatch.setattr(loop, "open", lambda file, mode: InterruptedFile(file, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        loop.save_checkpoint(path, epoch=2, weights=torch.ones(256, 256))
    assert InterruptedFile.writes >= 3
    assert not list(path.parent.glob("*.tmp*"))  # the torn temporary file is gone
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_two_runs_saving_the_same_checkpoint_at_once_do_not_trip_over_each_other(tmp_path):
    """Two `graft run`s with the same inputs (a manual run beside a scheduled one) share a checkpoint's key; each writes
    through its own tmp file, so neither finds its tmp file renamed away by the other."""
    import threading

    import torch

    from components.train.loop import save_checkpoint

    path, errors = tmp_path / "resume" / "key-head.pt", []

    def writer(value: int) -> None:
        try:
            for _ in range(40):
                save_checkpoint(path, weights=torch.full((256,), float(value)))
        except Exception as exc:  # noqa: BLE001 - the test reports whatever one writer met
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert float(torch.load(path)["weights"][0]) in (0.0, 1.0, 2.0) and not list(path.parent.glob("*.tmp"))
