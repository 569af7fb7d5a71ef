"""The cached trunk: fine-tuning on the frozen blocks' cached output trains the model training through the
whole backbone trains, says which path ran, reuses its cache, and cuts only backbones it can cut exactly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from components.backbones.trunk import split_backbone
from components.backbones.unfreeze import select_trainable
from components.backbones.zoo import get_spec
from components.core.errors import ModelError
from components.data.folders import scan
from components.train.stage import fine_tune, load_classifier, predict_logits
from tests.train.test_train import SIZE, choice, make_params


def _same_training(fast, slow):  # noqa: ANN001, ANN202 - TrainResult, TrainResult -> the two classifiers
    """The same epochs, losses and weights, to float rounding; returns (through the backbone, on the cached trunk)."""
    assert fast.epochs_run == slow.epochs_run
    for a, b in zip(fast.history, slow.history, strict=True):
        for key in ("train/loss", "val/loss", "val/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    expected, actual = load_classifier(slow.checkpoint_path)[0], load_classifier(fast.checkpoint_path)[0]
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(actual.state_dict()[name], tensor, rtol=5e-3, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
    return expected, actual


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("fine_tune", ()), ("fine_tune", ("train.freeze_bn=false", "train.unfreeze=2")), ("two_stage", ())],
    ids=["fine_tune", "fine_tune-bn-trained", "two_stage"],
)
def test_the_cached_trunk_trains_the_model_the_whole_backbone_trains(digits_dir, tmp_path, caplog, strategy, extra):
    """Same seed and data, cache on and off: the same losses every epoch, the same predictions and the same weights,
    to float rounding. (The trunk's rows come from batches of another size, so sums run in another order; AdamW
    moves a weight by about its learning rate per step whatever the gradient's size, so where a gradient is
    near zero that rounding can move it by up to lr x steps: 1e-4 x 9 here.)"""
    split = scan(digits_dir)
    results = {}
    for cached in (True, False):
        params = make_params(digits_dir, tmp_path / str(cached), tmp_path / f"cache-{cached}", f"train.strategy={strategy}",
                             "train.epochs=3", "train.patience=50", "train.resume=false", f"train.cache_trunk={str(cached).lower()}",
                             "train.mixed_precision=false", *extra)  # float32 on both paths: the cache is what is compared
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="components"):
            results[cached] = fine_tune(params, split, choice(), tmp_path / f"run-{cached}")
        ran = "cached trunk:" in caplog.text
        assert ran == cached, caplog.text
        if not cached:
            assert "training through the whole backbone every epoch: train.cache_trunk is false" in caplog.text
    expected, actual = _same_training(results[True], results[False])
    from components.data.images import load_batch

    images = torch.from_numpy(load_batch([s.path for s in split.val + split.test], SIZE))
    with torch.no_grad():
        torch.testing.assert_close(actual(images), expected(images), rtol=0, atol=1e-3)


@pytest.mark.skipif(not __import__("components.runtime.cpu", fromlist=["cpu_facts"]).cpu_facts().bf16, reason="no native bfloat16 on this CPU")
def test_bfloat16_on_the_cached_trunk_changes_the_losses_by_rounding_only(digits_dir, tmp_path, caplog):
    """`train.mixed_precision: auto` on a CPU with native bfloat16: the tail runs under bfloat16 autocast (the log
    says so), and every epoch's losses stay within bfloat16's rounding of float32's."""
    split = scan(digits_dir)
    runs = {}
    for precision in ("auto", "false"):
        params = make_params(digits_dir, tmp_path / precision, tmp_path / "cache", "train.strategy=fine_tune", "train.epochs=3",
                             "train.patience=50", "train.resume=false", f"train.mixed_precision={precision}")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="components"):
            runs[precision] = fine_tune(params, split, choice(), tmp_path / f"run-{precision}")
        assert ("on cpu, bfloat16 autocast" in caplog.text) == (precision == "auto"), caplog.text
    for a, b in zip(runs["auto"].history, runs["false"].history, strict=True):
        for key in ("train/loss", "val/loss"):
            assert a[key] == pytest.approx(b[key], rel=3e-2), key
        assert abs(a["val/accuracy"] - b["val/accuracy"]) <= 1 / len(split.val) + 1e-9


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (("train.augment=true",), "augmentation is on, so the frozen blocks see new pixels every epoch"),
        (("train.unfreeze=all",), "train.unfreeze trains every block, so nothing is fixed to compute once"),
    ],
)
def test_where_the_trunk_is_not_a_fixed_function_training_runs_through_the_whole_backbone_and_says_why(
    digits_dir, feature_cache_dir, tmp_path, caplog, overrides, reason
):
    params = make_params(digits_dir, tmp_path, feature_cache_dir, "train.strategy=fine_tune", "train.epochs=1", *overrides)
    with caplog.at_level(logging.INFO, logger="components"):
        result = fine_tune(params, scan(digits_dir), choice(), tmp_path / "run")
    assert f"training through the whole backbone every epoch: {reason}" in caplog.text
    assert "cached trunk:" not in caplog.text
    assert load_classifier(result.checkpoint_path)[1]["frozen_blocks"] == (0 if "all" in overrides[0] else 15)


@pytest.mark.parametrize("graph", ["the backbone's", "another backbone's", "one onnxruntime fails on"])
def test_many_images_run_the_frozen_blocks_on_onnxruntime_and_train_the_model_the_whole_backbone_trains(
    digits_dir, tmp_path, caplog, monkeypatch, graph
):
    """The frozen blocks run on onnxruntime through the export choose left in the cache, cut where they end, and
    training on those rows gives the losses and the weights of training through the whole backbone in PyTorch,
    to float rounding. A graph in that place that does not compute the frozen blocks (here: another backbone's
    weights) is not cut, and one onnxruntime fails on midway is left: PyTorch runs them, and says why."""
    import components.train.trunk as trunk_module
    from components.backbones.export import backbone_onnx_path, export_backbone
    from components.backbones.onnx_trunk import OnnxTrunk

    monkeypatch.setattr(trunk_module, "ONNX_TRUNK_MIN_IMAGES", 1)  # the tiny folders hold a few dozen images
    if graph == "one onnxruntime fails on":
        def fails(self, images):  # noqa: ANN001, ANN202 - as an out-of-memory or a kernel error would
            raise RuntimeError("onnxruntime: bad allocation")

        monkeypatch.setattr(OnnxTrunk, "__call__", fails)
    split = scan(digits_dir)
    results = {}
    for cached in (True, False):
        params = make_params(digits_dir, tmp_path / str(cached), tmp_path / f"cache-{cached}", "train.strategy=fine_tune",
                             "train.epochs=3", "train.patience=50", "train.resume=false", f"train.cache_trunk={str(cached).lower()}",
                             "train.mixed_precision=false")
        if cached:  # what choose leaves in the cache: the candidate's exported graph
            name = "random_efficientnet_lite0" if graph == "another backbone's" else "efficientnet_lite0"
            export_backbone(get_spec(name).build(SIZE, seed=params.train.seed), get_spec(name), SIZE,
                            backbone_onnx_path(params.data.cache_dir, get_spec("efficientnet_lite0"), SIZE, params.train.seed, params.deploy.opset),
                            params.deploy.opset)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="components"):
            results[cached] = fine_tune(params, split, choice(), tmp_path / f"run-{cached}")
        if cached and graph == "the backbone's":
            assert "frozen blocks on onnxruntime: efficientnet_lite0-" in caplog.text and ") on onnxruntime" in caplog.text, caplog.text
        elif cached and graph == "another backbone's":
            assert "frozen blocks in PyTorch: no tensor of efficientnet_lite0-" in caplog.text and ") on PyTorch" in caplog.text, caplog.text
        elif cached:
            assert "frozen blocks on onnxruntime failed (onnxruntime: bad allocation); running them in PyTorch" in caplog.text
            assert ") on PyTorch" in caplog.text, caplog.text
    _same_training(results[True], results[False])


def test_the_trunk_cache_is_reused_by_the_next_run_and_by_scoring(digits_dir, tmp_path, caplog):
    from components.data.images import load_batch

    params = make_params(digits_dir, tmp_path, tmp_path / "cache", "train.strategy=fine_tune", "train.epochs=1")
    split = scan(digits_dir)
    trained_on = len(split.train) + len(split.val)
    with caplog.at_level(logging.INFO, logger="components.train.trunk"):
        fine_tune(params, split, choice(), tmp_path / "run1")
        assert f"(0 cached, {trained_on} computed;" in caplog.text
        caplog.clear()
        result = fine_tune(params, split, choice(), tmp_path / "run2")
        assert f"({trained_on} cached, 0 computed;" in caplog.text
    rows = list((tmp_path / "cache" / "trunk").glob("*.npy"))
    assert len(rows) == 1 and np.load(rows[0], mmap_mode="r").shape[0] == trained_on
    # scoring the test images reads the trunk from the cache too (computing their rows once), and gives
    # exactly what the deployable model computes through its whole backbone
    paths = [s.path for s in split.test]
    logits = predict_logits(params, result, paths)
    rows = list((tmp_path / "cache" / "trunk").glob("*.npy"))  # the rows file that replaced the first one
    assert len(rows) == 1 and np.load(rows[0], mmap_mode="r").shape[0] == trained_on + len(paths)
    model, _ = load_classifier(result.checkpoint_path)
    with torch.no_grad():
        direct = model(torch.from_numpy(load_batch(paths, SIZE))).numpy()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), direct, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0", "random_resnet18", "random_mobilenet_v3_small", "random_mobilenet_v2",
             "random_efficientnet_b0", "random_regnet_y_400mf", "random_convnext_tiny"],
)
def test_backbones_are_cut_into_a_trunk_and_a_tail_that_compute_the_whole(name):
    backbone = get_spec(name).build(SIZE)
    trainable = select_trainable(backbone, 2)
    cut = split_backbone(backbone, trainable.total_blocks - trainable.blocks, SIZE)
    images = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(cut.tail(cut.trunk(images)), backbone(images), rtol=1e-4, atol=1e-4)
    trained = {id(p) for p in backbone.parameters() if p.requires_grad}
    assert trained == {id(p) for p in cut.tail.parameters()} & trained  # every trainable weight is in the tail
    assert not any(p.requires_grad for p in cut.trunk.parameters())


def test_a_backbone_that_cannot_be_cut_exactly_is_refused_with_the_reason():
    vit = get_spec("random_vit_b_16").build(224)
    with pytest.raises(ModelError, match="VisionTransformer has no forward Graft knows how to cut"):
        split_backbone(vit, 3, 224)
    lite = get_spec("efficientnet_lite0").build(SIZE)
    with pytest.raises(ModelError, match="no block frozen"):
        split_backbone(lite, 0, SIZE)

    class LooksLikeAResNet(nn.Module):  # layer1-4 like a ResNet, but its forward skips layer3
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1, self.relu, self.maxpool = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Identity()
            self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return torch.flatten(self.avgpool(self.layer4(self.layer2(self.layer1(x)))), 1)

    with pytest.raises(ModelError, match="does not reproduce its own forward"):
        split_backbone(LooksLikeAResNet().eval(), 2, SIZE)


def test_two_writers_adding_rows_at_once_each_get_their_own_images_rows_and_leave_a_consistent_cache(digits_dir, tmp_path):
    """A manual run beside a scheduled one: each adds rows for other images to the same cache at the same time."""
    import threading

    from components.backbones.classifier import Preprocess
    from components.data.images import load_batch
    from components.train.trunk import TrunkCache

    spec = get_spec("efficientnet_lite0")
    backbone = spec.build(SIZE)
    cut = split_backbone(backbone, 10, SIZE)
    model = Preprocess(spec.mean, spec.std)
    split = scan(digits_dir)
    groups = [[s.path for s in split.train[:24]], [s.path for s in split.train[24:48]], [s.path for s in split.val[:24]]]
    start, results, errors = threading.Barrier(len(groups)), {}, []

    def add(number: int) -> None:
        try:
            cache = TrunkCache(tmp_path / "cache", spec, SIZE, 0, 10, 18)
            start.wait()
            results[number] = cache.get(groups[number], cut, model, 8)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(len(groups))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with torch.inference_mode():
        for number, paths in enumerate(groups):
            expected = cut.trunk(model(torch.from_numpy(load_batch(paths, SIZE)))).float().numpy()
            np.testing.assert_allclose(results[number], expected.reshape(results[number].shape), atol=1e-4)
    # what is left is one rows file, with the index that describes it and every writer's rows: reading every image
    # again computes nothing and gives the same rows
    assert len(list((tmp_path / "cache" / "trunk").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache" / "trunk").glob("*.tmp*"))
    again = TrunkCache(tmp_path / "cache", spec, SIZE, 0, 10, 18)
    every = [p for paths in groups for p in paths]
    np.testing.assert_allclose(again.get(every, cut, model, 8), np.concatenate([results[n] for n in range(len(groups))]), atol=1e-4)
    assert (again.hits, again.misses) == (len(every), 0)



def test_backbones_whose_names_hold_a_dot_keep_each_size_and_cut_in_files_of_their_own(tmp_path):
    """`resnet18.v2` (a custom backbone's name): the cache's file names are appended to its key, never cut at the dot, so
    another image size or cut of it never reads these rows."""
    import dataclasses

    from components.train.trunk import TrunkCache

    spec = dataclasses.replace(get_spec("random_efficientnet_lite0"), name="team/resnet18.v2")
    first = TrunkCache(tmp_path, spec, 64, 0, frozen_blocks=2, opset=18)
    other = TrunkCache(tmp_path, spec, 96, 0, frozen_blocks=3, opset=18)
    first._add(["a", "b"], np.ones((2, 4), np.float32))
    assert first.index_path != other.index_path and first.index_path.name.endswith("-frozen2.json")
    assert other._read() == ([], None)
    assert first._read()[0] == ["a", "b"]


def test_a_reader_whose_rows_another_run_replaced_meanwhile_reads_the_new_ones_without_recomputing(tmp_path, monkeypatch, caplog):
    """The index names rows file A; before the reader opens it, another run commits B (and removes A): the reader reads
    the index again and gets B's rows, instead of warning that the cache is unreadable and computing every image."""
    import components.train.trunk as trunk
    from components.train.trunk import TrunkCache

    spec = get_spec("random_efficientnet_lite0")
    reader, writer = (TrunkCache(tmp_path, spec, 64, 0, frozen_blocks=2, opset=18) for _ in range(2))
    writer._add([f"image-{i}" for i in range(100)], np.ones((100, 4), np.float32))
    real_load, commits = np.load, []

    def load_after_a_commit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not commits:
            commits.append("once")  # before the commit: its own reads go straight through
            writer._add(["one-more"], np.zeros((1, 4), np.float32))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(trunk.np, "load", load_after_a_commit)
    with caplog.at_level(logging.WARNING, logger="components.train.trunk"):
        md5s, rows = reader._read()
    assert len(md5s) == len(rows) == 101 and md5s[-1] == "one-more"
    assert "unreadable" not in caplog.text
