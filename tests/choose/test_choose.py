"""The choose stage on real pip-packaged weights, real digit and texture images, real onnxruntime."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.backbones.zoo import ZOO, get_spec
from components.choose.candidates import SAMPLE_IMAGES, CandidateScore, plan_candidates, resolve_spec
from components.choose.ranking import rank
from components.choose.stage import choose_model
from components.core.config import load_params
from components.core.errors import ConfigError, DataError, ModelError
from components.data.folders import scan
from components.data.split import Split, SplitSettings, stratified_sample
from components.train.strategies import fit_finalist_head
from tests.conftest import REPO, tiny_overrides

SUMMARY_KEYS = {"name", "pretrained", "score", "probe_accuracy", "params", "latency_ms", "status"}


def _with_choose(params, **changes):
    return params.model_copy(update={"choose": params.choose.model_copy(update=changes)})


def test_unknown_candidate_lists_valid_names_and_closest(tiny_params):
    params = tiny_params.model_copy(update={"choose": tiny_params.choose.model_copy(update={"candidates": ("efficientnet_lite9",)})})
    with pytest.raises(ConfigError, match=r"Did you mean 'efficientnet_lite\d'.*Valid names: .*resnet18"):
        choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))


def test_stratified_sample_keeps_every_class(digits_dir):
    split = scan(digits_dir)
    sample = stratified_sample(split.train, 9, seed=0)
    assert sorted({s.label for s in sample}) == [0, 1, 2]


def test_ranking_scores_candidates_and_keeps_baseline_as_reference(tiny_params, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    params = tiny_params.model_copy(
        update={"choose": tiny_params.choose.model_copy(update={"candidates": ("efficientnet_lite0", "random_efficientnet_lite0", "resnet18"), "download": "never"})}
    )
    result = choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))
    rows = {row.name: row for row in result.candidates}
    assert result.chosen == "efficientnet_lite0"
    assert rows["efficientnet_lite0"].status == "ok" and rows["efficientnet_lite0"].logme is not None
    assert rows["random_efficientnet_lite0"].status.startswith("baseline")
    assert rows["random_efficientnet_lite0"].score is not None
    hint = rows["resnet18"].status
    assert hint.startswith("skipped: weights not found: put resnet18-") and str(tmp_path / "empty-torch-home") in hint
    for row in (rows["efficientnet_lite0"], rows["random_efficientnet_lite0"]):
        out = row.to_dict()
        assert SUMMARY_KEYS <= set(out)
        assert out["latency_ms"] > 0 and out["latency_batch_ms"] > 0 and 5 < out["size_mb"] < 30
        assert out["params"] == 3_400_000 and Path(out["onnx_path"]).is_file()
    assert rows["resnet18"].to_dict()["latency_ms"] is None


def test_params_limit_marks_candidate_and_it_is_not_chosen(tiny_params):
    params = tiny_params.model_copy(
        update={"choose": tiny_params.choose.model_copy(update={"candidates": ("efficientnet_lite0", "efficientnet_lite2"), "max_params_m": 4.0})}
    )
    result = choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))
    rows = {row.name: row for row in result.candidates}
    assert rows["efficientnet_lite2"].status.startswith("over limit")
    assert result.chosen == "efficientnet_lite0"


def test_zoo_metadata_is_complete():
    for spec in ZOO.values():
        assert spec.input_size >= 224 and len(spec.mean) == 3 and spec.params_m > 0 and spec.licence
    assert get_spec("efficientnet_lite1").weights_path().is_file()


@pytest.fixture(scope="module")
def texture_params(tmp_path_factory, feature_cache_dir):
    from components.data.demo import write_textures

    work = tmp_path_factory.mktemp("textures")
    data = write_textures(work / "images", per_class=10, size=64)
    # 10 crops a class: this seed gives every class an image in each split (the split follows each image's bytes)
    split = ["data.seed=2", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    return load_params(REPO / "params.yaml", tiny_overrides(data, work, feature_cache_dir) + ["choose.sample_size=80", *split])


@pytest.fixture(scope="module")
def digit_params(tmp_path_factory, feature_cache_dir):
    """All ten digits at the demo's 112 px (the data `make run` uses, 30 images a class)."""
    from components.data.demo import write_digits

    work = tmp_path_factory.mktemp("ten-digits")
    data = write_digits(work / "images", per_class=30)
    return load_params(REPO / "params.yaml", tiny_overrides(data, work, feature_cache_dir) + ["data.image_size=112", "choose.sample_size=200"])


@pytest.mark.parametrize("dataset", ["texture_params", "digit_params"])
def test_random_baseline_ranks_below_every_pretrained_candidate(dataset, request):
    """What pre-training buys shows in both scores, on photos and textures and on the demo digits."""
    params = request.getfixturevalue(dataset)
    result = choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))
    rows = {row.name: row for row in result.candidates}
    pretrained, random = rows["efficientnet_lite0"], rows["random_efficientnet_lite0"]
    assert result.chosen == "efficientnet_lite0" and result.candidates[0].name == "efficientnet_lite0"
    assert result.candidates[-1].name == "random_efficientnet_lite0"
    assert pretrained.logme > random.logme + 0.2
    assert pretrained.probe_accuracy > random.probe_accuracy


def test_random_baseline_is_the_network_training_starts_from():
    """Its BatchNorm statistics are set (activations neither vanish nor explode), the same for the same seed,
    and a pre-trained backbone keeps the statistics it was trained with."""
    images = torch.rand(4, 3, 64, 64)
    random_a, random_b = get_spec("random_efficientnet_lite0").build(64, seed=3), get_spec("random_efficientnet_lite0").build(64, seed=3)
    with torch.no_grad():
        features = random_a(images)
        assert torch.equal(features, random_b(images))
    assert 1e-2 < features.abs().mean().item() < 1e2  # placeholder statistics gave ~1e-8
    pretrained = get_spec("efficientnet_lite0").build(64)
    stored = torch.load(get_spec("efficientnet_lite0").weights_path(), map_location="cpu", weights_only=True)
    name = next(k for k in stored if k.endswith("running_var"))
    assert torch.equal(pretrained.net.state_dict()[name], stored[name])


def test_latency_limit_marks_every_candidate_and_says_which(tiny_params):
    params = _with_choose(tiny_params, max_latency_ms=0.001)
    with pytest.raises(ModelError, match=r"efficientnet_lite0: over limit: [\d.]+ ms/image > choose.max_latency_ms=0.001"):
        choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))


def test_size_limit_is_measured_on_the_onnx_file(tiny_params):
    params = _with_choose(tiny_params, max_size_mb=1.0, allow_baseline=True)
    with pytest.raises(ModelError, match=r"over limit: 1\d\.\d MB > choose.max_size_mb=1"):
        choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))


def test_over_limit_candidate_is_shown_but_not_chosen(tiny_params):
    params = _with_choose(tiny_params, max_latency_ms=20.0)
    fast = CandidateScore("fast", True, "ok", score=0.2, logme=0.2, latency_ms=5.0)
    slow = CandidateScore("slow", True, "over limit: 31.0 ms/image > choose.max_latency_ms=20", score=0.9, logme=0.9, latency_ms=31.0)
    result = rank(params, [slow, fast])
    assert result.chosen == "fast"
    assert "highest LogME (0.2000) within 20 ms/image" in result.reason
    assert [r.name for r in result.candidates] == ["slow", "fast"] and result.candidates[0].status.startswith("over limit")


def _split_from(digits_dir: Path, per_class: dict[int, int]) -> Split:
    full = scan(digits_dir)
    train = tuple(s for label, n in per_class.items() for s in [x for x in full.train if x.label == label][:n])
    return Split(full.root, full.classes, train, full.val, presplit=False)


def test_sample_with_one_class_is_refused(tiny_params, digits_dir):
    with pytest.raises(DataError, match=r"holds 1 class\(es\) \(0\).*at least two classes"):
        plan_candidates(tiny_params, _split_from(digits_dir, {0: 10}))


def test_class_with_one_image_is_named(tiny_params, digits_dir):
    with pytest.raises(DataError, match=r"fewer than two images in the choose sample: 7 \(1\).*choose.sample_size"):
        plan_candidates(tiny_params, _split_from(digits_dir, {0: 10, 1: 10, 2: 1}))


CUSTOM_NETS = """
import torch
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _Nan(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)) * torch.tensor(float("nan"))


def nan_net():
    return _Nan()


def feature_map():  # forgot to pool
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())


class _Pair(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))


def pair():
    return _Pair()
"""


def test_user_backbones_and_faulty_candidates_leave_the_others_ranked(tiny_params, tmp_path):
    module = tmp_path / "my_nets.py"
    module.write_text(CUSTOM_NETS)
    namespace: dict = {}
    exec(CUSTOM_NETS, namespace)  # noqa: S102 - the same test module, to save fitting and misfitting weights
    torch.save(namespace["tiny"]().state_dict(), tmp_path / "tiny.pth")
    torch.save({"wrong.weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    custom = {
        "my_tiny": {"factory": f"{module}:tiny", "weights": str(tmp_path / "tiny.pth"), "input_size": 64},
        "my_nan": {"factory": f"{module}:nan_net", "input_size": 64},
        "my_misfit": {"factory": f"{module}:tiny", "weights": str(tmp_path / "wrong.pth"), "input_size": 64},
        "my_missing": {"factory": "no_such_package.nets:net", "input_size": 64},
        "my_map": {"factory": f"{module}:feature_map", "input_size": 64},
        "my_pair": {"factory": f"{module}:pair", "input_size": 64},
    }
    params = load_params(
        REPO / "params.yaml",
        tiny_overrides(tiny_params.data.dir, tmp_path, tiny_params.data.cache_dir)
        + [f"choose.custom={custom}", "choose.candidates=[efficientnet_lite0, my_tiny, my_nan, my_misfit, my_missing, my_map, my_pair]", "choose.baseline=false"],
    )
    result = choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)), fit_head=partial(fit_finalist_head, params))
    rows = {row.name: row for row in result.candidates}
    assert result.chosen in {"efficientnet_lite0", "my_tiny"}
    assert {row.name for row in result.trained} == {"efficientnet_lite0", "my_tiny"}  # the faulty ones are no finalists
    assert rows["my_tiny"].status == "ok" and rows["my_tiny"].params_m == pytest.approx(224 / 1e6, abs=1e-6)
    assert rows["my_tiny"].latency_ms is not None
    assert rows["my_nan"].status.startswith("skipped: its features contain NaN or inf on")
    assert rows["my_misfit"].status.startswith("skipped: failed to load") and "does not fit the architecture" in rows["my_misfit"].status
    assert rows["my_missing"].status.startswith("skipped: failed to load") and "cannot import factory 'no_such_package.nets:net'" in rows["my_missing"].status
    assert rows["efficientnet_lite0"].status == "ok"
    # not one feature vector per image: refused when built, in one line, before anything is cached or scored
    assert "returns shape (2, 8, 31, 31) for 2 images, not N x D features; pool and flatten" in rows["my_map"].status
    assert "returns tuple, not one tensor of features" in rows["my_pair"].status


def test_local_weights_file_replaces_torch_home(tiny_params, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "mnv3s.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    assert get_spec("mobilenet_v3_small").missing_weights() is not None
    params = _with_choose(tiny_params, weights={"mobilenet_v3_small": weights})
    spec = resolve_spec(params, "mobilenet_v3_small")
    assert spec.missing_weights() is None and str(weights) in spec.weights_source
    features = spec.build(64)(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, 576)
    wrong = _with_choose(tiny_params, weights={"mobilenet_v3_small": tmp_path / "missing.pth"})
    assert "put missing.pth in" in resolve_spec(wrong, "mobilenet_v3_small").missing_weights()
    folder = _with_choose(tiny_params, weights={"mobilenet_v3_small": tmp_path})
    assert f"{tmp_path} is a folder; name the weights file in it" in resolve_spec(folder, "mobilenet_v3_small").missing_weights()
    # a training checkpoint around the weights loads; a whole pickled model is refused, saying what to save instead
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model_state_dict": torch.load(weights, weights_only=True)}, checkpoint)
    assert resolve_spec(_with_choose(tiny_params, weights={"mobilenet_v3_small": checkpoint}), "mobilenet_v3_small").build(64) is not None
    whole = tmp_path / "whole.pth"
    torch.save(torchvision.models.mobilenet_v3_small(), whole)
    with pytest.raises(ModelError, match=r"whole model saved with torch.save\(model\).*save model.state_dict\(\) instead"):
        resolve_spec(_with_choose(tiny_params, weights={"mobilenet_v3_small": whole}), "mobilenet_v3_small").build(64)


def test_weights_for_an_unknown_backbone_is_a_config_error(tiny_params, digits_dir):
    params = _with_choose(tiny_params, weights={"resnet81": Path("x.pth")})
    with pytest.raises(ConfigError, match=r"choose.weights names 'resnet81'.*Did you mean 'resnet18'"):
        plan_candidates(params, scan(digits_dir))


def test_random_baseline_is_added_when_none_is_listed(tiny_params, digits_dir):
    params = _with_choose(tiny_params, candidates=("efficientnet_lite0",))
    assert plan_candidates(params, scan(digits_dir)) == ("efficientnet_lite0", "random_efficientnet_lite0")
    assert plan_candidates(_with_choose(params, baseline=False), scan(digits_dir)) == ("efficientnet_lite0",)


def test_candidates_share_one_decode_of_the_sample(tiny_params, tmp_path, monkeypatch):
    """Two candidates at one image size, features computed (empty cache): each sample image is decoded
    once, and the features are those decoding per candidate gives."""
    import components.data.images as images
    from components.backbones.features import FeatureCache, OnnxFeatures, compute_features

    decoded = []
    real_load_image = images.load_image

    def counting_load_image(source, size):
        decoded.append((Path(source), size))
        return real_load_image(source, size)

    monkeypatch.setattr(images, "load_image", counting_load_image)
    params = load_params(REPO / "params.yaml", tiny_overrides(tiny_params.data.dir, tmp_path, tmp_path / "cache"))
    split = scan(params.data.dir, SplitSettings.from_config(params.data))
    sample = stratified_sample(split.train, params.choose.sample_size, params.data.seed)
    result = choose_model(params, split)
    rows = {row.name: row for row in result.candidates}
    assert set(rows) == {"efficientnet_lite0", "random_efficientnet_lite0"}
    assert all(row.logme is not None for row in rows.values())
    assert sorted(decoded) == sorted((s.path, 64) for s in sample)
    assert SAMPLE_IMAGES.held_bytes == 0  # released once scoring is over

    paths = [s.path for s in sample]
    for row in rows.values():
        spec = resolve_spec(params, row.name)
        shared = FeatureCache(params.data.cache_dir, spec, 64, seed=params.train.seed).get(paths)
        alone = compute_features(None, spec, paths, 64, extractor=OnnxFeatures(Path(row.onnx_path)))
        assert np.array_equal(shared, alone), row.name


@pytest.mark.parametrize(("cores", "threads"), [(2, 1), (12, 6)])
def test_candidates_scored_side_by_side_share_the_cores(tiny_params, tmp_path, monkeypatch, cores, threads):
    """The flow scores the candidates at once: each one's feature extraction gets its share of the cores
    (the two candidates here, one of them the random baseline), not a thread on every core."""
    import dataclasses

    import components.backbones.features as features
    import components.choose.candidates as candidates

    real_facts, real_session = candidates.cpu_facts(), features.open_session
    monkeypatch.setattr(candidates, "cpu_facts", lambda: dataclasses.replace(real_facts, cores=cores))
    opened = []

    def recording_session(path, threads=0):
        opened.append(threads)
        return real_session(path, threads)

    monkeypatch.setattr(features, "open_session", recording_session)
    params = load_params(REPO / "params.yaml", tiny_overrides(tiny_params.data.dir, tmp_path, tmp_path / "cache"))
    result = choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)))
    assert {row.name for row in result.candidates if row.logme is not None} == {"efficientnet_lite0", "random_efficientnet_lite0"}
    assert opened[:2] == [threads, threads]  # the two candidates' sample features, before the finalists'


def test_cached_features_open_no_extraction_session(tiny_params, tmp_path, monkeypatch):
    """With every feature row cached, the only onnxruntime sessions are the latency measurements,
    and none at all while the latency figures are reused."""
    import components.backbones.features as features

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # this test's own latency records
    tiny_params = _with_choose(tiny_params, latency_cache=True, latency_quiet_cores=None)
    split = scan(tiny_params.data.dir)
    choose_model(tiny_params, split)  # fills the feature cache and the latency records
    opened = []
    real_session = features.open_session

    def counting_session(path, threads=0):
        opened.append(Path(path).name)
        return real_session(path, threads)

    monkeypatch.setattr(features, "open_session", counting_session)
    result = choose_model(tiny_params, split)
    assert opened == []
    choose_model(_with_choose(tiny_params, latency_cache=False), split)
    assert sorted(opened) == sorted(Path(row.onnx_path).name for row in result.candidates)


def test_latency_is_timed_once_per_graph_settings_and_machine_whichever_project_exports_it(tiny_params, tmp_path, monkeypatch, caplog):
    import os

    import onnx

    import components.choose.latency as latency
    import components.choose.ranking as ranking
    from components.runtime.trust import write_sidecar

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # this machine's records start empty
    tiny_params = _with_choose(tiny_params, latency_cache=True, latency_quiet_cores=None)  # the tests' own share the cores
    split = scan(tiny_params.data.dir)
    timed: list[str] = []
    real = latency.measure_latency

    def counting(path, *args, **kwargs):
        timed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(latency, "measure_latency", counting)
    monkeypatch.setattr(ranking, "measure_latency", counting)
    first = choose_model(tiny_params, split)
    names = sorted(Path(row.onnx_path).name for row in first.candidates)
    assert sorted(timed) == names
    assert len(list(latency.latency_records_dir().glob("*.json"))) == len(names)
    with caplog.at_level("INFO", logger="components.choose.ranking"):
        again = choose_model(tiny_params, split)
    assert sorted(timed) == names  # not timed again: same graphs, settings, machine
    assert [r.latency_ms for r in again.candidates] == [r.latency_ms for r in first.candidates]
    assert "on this machine, same graph and runtime; choose.latency_cache=false times it again" in caplog.text

    # a new project exports the same backbones afresh, byte for byte: their figures are this machine's already
    other = tiny_params.model_copy(update={"data": tiny_params.data.model_copy(update={"cache_dir": tmp_path / "other-project"})})
    elsewhere = choose_model(other, split)
    assert all(Path(r.onnx_path).is_relative_to(tmp_path / "other-project") for r in elsewhere.candidates)
    assert sorted(timed) == names and [r.latency_ms for r in elsewhere.candidates] == [r.latency_ms for r in first.candidates]

    # another serving batch size, a changed graph, or the cache turned off: timed again
    choose_model(_with_choose(tiny_params, latency_batch_size=8), split)
    assert len(timed) == 2 * len(names)
    path = Path(elsewhere.candidates[0].onnx_path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # touched, not changed
    choose_model(other, split)
    assert len(timed) == 2 * len(names)
    graph = onnx.load(str(path))
    graph.doc_string = "another export"  # as another torch or onnx version would export it: other bytes, its own sidecar
    onnx.save(graph, str(path))
    write_sidecar(path)
    choose_model(other, split)
    assert len(timed) == 2 * len(names) + 1 and timed[-1] == path.name
    choose_model(_with_choose(tiny_params, latency_cache=False), split)
    assert len(timed) == 3 * len(names) + 1


def test_latency_timed_on_a_busy_machine_is_used_but_not_kept(tiny_params, tmp_path, monkeypatch, caplog):
    """A figure timed while other processes kept the cores busy would stay many times off in every later
    run: it is used for its own run only, and the next run times it again."""
    import components.choose.latency as latency
    from components.runtime.cpu import CpuWatch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # this machine's records start empty
    split = scan(tiny_params.data.dir)
    tiny_params = _with_choose(tiny_params, latency_cache=True)
    params = _with_choose(tiny_params, latency_quiet_cores=0.5)
    timed: list[str] = []
    real = latency.measure_latency
    monkeypatch.setattr(latency, "measure_latency", lambda path, *a, **k: timed.append(Path(path).name) or real(path, *a, **k))

    class Busy(CpuWatch):
        def __exit__(self, *exc: object) -> None:
            super().__exit__(*exc)
            self.others_cores = 1.7  # what /proc/stat shows while another job runs beside the timing

    monkeypatch.setattr(latency, "CpuWatch", Busy)
    with caplog.at_level("WARNING", logger="components.choose.latency"):
        busy = choose_model(params, split)
    names = sorted(Path(row.onnx_path).name for row in busy.candidates)
    assert sorted(timed) == names and all(row.latency_ms for row in busy.candidates)  # used in its own run
    assert "timed while other processes kept 1.7 cores busy" in caplog.text and "not kept" in caplog.text
    assert not list(latency.latency_records_dir().glob("*.json"))

    monkeypatch.setattr(latency, "CpuWatch", CpuWatch)  # a quiet machine (the real reading; the limit is lifted)
    quiet = _with_choose(tiny_params, latency_quiet_cores=None)
    choose_model(quiet, split)
    assert sorted(timed) == sorted(names * 2)  # timed again, and now kept
    records = [json.loads(r.read_text()) for r in latency.latency_records_dir().glob("*.json")]
    assert len(records) == len(names) and all("others_cores" in e for r in records for e in r["entries"])
    choose_model(quiet, split)
    assert len(timed) == 2 * len(names)  # reused

    # kept by a run without the check while the others were busy: a run with the check does not trust it
    for record in latency.latency_records_dir().glob("*.json"):
        kept = json.loads(record.read_text())
        for entry in kept["entries"]:
            entry["others_cores"] = 1.2
        record.write_text(json.dumps(kept))
    choose_model(quiet, split)
    assert len(timed) == 2 * len(names)  # without the check: reused
    choose_model(params, split)
    assert len(timed) == 3 * len(names)  # with it (0.5 cores): timed again


def _png(path: Path, value: int) -> Path:
    Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)).save(path)
    return path


def test_decoded_images_are_keyed_by_content_and_size_and_bounded(tmp_path):
    from components.data.images import DecodedImages, load_image

    paths = [_png(tmp_path / f"{i}.png", 40 * i) for i in range(3)]
    one = 16 * 16 * 3
    memo = DecodedImages(max_bytes=2 * one)  # room for two 16 px images
    batch = memo.batch(paths, ["a", "b", "c"], 16)
    assert batch.shape == (3, 16, 16, 3) and (batch[2] == load_image(paths[2], 16)).all()
    assert memo.decoded == 3 and memo.held_bytes == 2 * one  # "a", least recently used, was dropped
    memo.batch(paths[1:], ["b", "c"], 16)
    assert (memo.decoded, memo.reused) == (3, 2)
    memo.batch(paths[:1], ["a"], 16)
    memo.batch(paths[:1], ["a"], 8)  # another size is another array
    assert (memo.decoded, memo.reused) == (5, 2)
    _png(paths[1], 250)  # the same file, new bytes: a new key
    assert (memo.batch(paths[1:2], ["b2"], 16) == 250).all() and memo.decoded == 6
    with pytest.raises(ValueError, match="one digest per source"):
        memo.batch(paths, ["a"], 16)
    memo.clear()
    assert memo.held_bytes == 0 and memo.decoded == 0


@pytest.mark.slow
def test_every_torchvision_backbone_loads_from_torch_home_exports_and_is_ranked(tiny_params, tmp_path, monkeypatch):
    """The whole torchvision path, end to end, for every zoo entry: a weights file at the exact place
    the torch hub cache keeps it, loaded, exported to ONNX, scored and timed. The files here hold
    torchvision's own initialisation (no ImageNet weights can be downloaded on this machine), so the
    scores are not compared; everything else is what a user with a filled `$TORCH_HOME` runs."""
    import torchvision

    from components.backbones.zoo import TORCHVISION

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    names = sorted(TORCHVISION)
    for name in names:
        path = get_spec(name).weights_path()
        assert path.parent == tmp_path / "torch-home" / "hub" / "checkpoints"
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"image_size": 224} if name.startswith("vit") else {}
        torch.save(torchvision.models.get_model(name, weights=None, **kwargs).state_dict(), path)
    params = _with_choose(tiny_params, candidates=tuple(names), baseline=False, latency_runs=3)
    result = choose_model(params, scan(params.data.dir, SplitSettings.from_config(params.data)), fit_head=partial(fit_finalist_head, params))
    rows = {row.name: row for row in result.candidates}
    assert set(rows) == set(names)
    assert len(result.trained) == params.choose.finalists and rows[result.chosen].trained_rank == 1
    for name, row in rows.items():
        assert row.status == "ok", (name, row.status)
        assert row.logme is not None and row.latency_ms > 0 and Path(row.onnx_path).is_file(), name
        assert row.image_size == (224 if name.startswith("vit") else 64), name


def test_a_new_project_copies_a_zoo_backbones_graph_from_this_machines_cache_instead_of_exporting_it(tiny_params, tmp_path, monkeypatch, caplog):
    """The first project exports each zoo candidate and keeps the graph for the machine; a second project (its own
    caches) scores the same candidates from copies, byte for byte, without exporting or building a backbone. A kept
    graph whose bytes changed is refused and exported again; `choose.shared_exports: false` keeps nothing."""
    import components.choose.candidates as candidates
    from components.backbones.spec import BackboneSpec
    from components.choose.candidates import score_candidate

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    split = scan(tiny_params.data.dir)
    names = ("efficientnet_lite0", "random_efficientnet_lite0")

    def project(name: str, shared: bool = True):
        params = _with_choose(tiny_params, shared_exports=shared)
        return params.model_copy(update={"data": params.data.model_copy(update={"cache_dir": tmp_path / name})})

    first = {name: score_candidate(project("first"), split, name) for name in names}
    kept = sorted((tmp_path / "user-cache" / "graft" / "backbones").glob("*/*.onnx"))
    assert sorted(path.name for path in kept) == sorted(Path(row.onnx_path).name for row in first.values())

    real_export, real_build = candidates.export_backbone, BackboneSpec.build
    monkeypatch.setattr(candidates, "export_backbone", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setattr(BackboneSpec, "build", lambda *a, **k: pytest.fail("a backbone was built"))
    with caplog.at_level("INFO", logger="components.choose.candidates"):
        second = {name: score_candidate(project("second"), split, name) for name in names}
    for name in names:
        assert second[name].status == "ok" and second[name].logme == first[name].logme
        copied, exported = Path(second[name].onnx_path), Path(first[name].onnx_path)
        assert copied.parent.parent == tmp_path / "second" and copied.read_bytes() == exported.read_bytes()
        assert f"{name}: exported graph {copied.name} copied from this machine's cache" in caplog.text

    kept[0].write_bytes(kept[0].read_bytes()[:-16] + bytes(16))  # a kept graph altered after it was kept
    monkeypatch.setattr(candidates, "export_backbone", real_export)
    monkeypatch.setattr(BackboneSpec, "build", real_build)
    third = {name: score_candidate(project("third"), split, name) for name in names}
    assert "does not match its recorded sha256" in caplog.text
    for name in names:
        assert Path(third[name].onnx_path).read_bytes() == Path(first[name].onnx_path).read_bytes()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-user-cache"))
    score_candidate(project("fourth", shared=False), split, names[0])
    assert not (tmp_path / "other-user-cache" / "graft" / "backbones").exists()


def test_the_sizes_line_names_only_candidates_that_were_scored():
    """A candidate skipped (its weights not here) was never scored: 'scored at 112px: resnet18' would say it was."""
    from components.choose.ranking import sizes_line

    rows = [{"name": "efficientnet_lite0", "image_size": 112, "status": "ok"},
            {"name": "resnet18", "image_size": 112, "status": "skipped: no offline weights"},
            {"name": "random_efficientnet_lite0", "image_size": 112, "status": "baseline: random weights"}]
    assert sizes_line(rows) == "scored at 112px: efficientnet_lite0, random_efficientnet_lite0"


def test_another_deploy_opset_is_another_exported_backbone_and_another_cached_score(tiny_params):
    """The deployed model is composed from the exported backbone: after a change of deploy.opset, choose exports and
    scores it again (Prefect's cache included) instead of serving the deploy stage a graph of the old opset."""
    from components.backbones.export import backbone_onnx_path
    from components.core.lineage import params_fingerprint
    from flows.caching import CHOOSE_KEYS

    other = tiny_params.model_copy(update={"deploy": tiny_params.deploy.model_copy(update={"opset": tiny_params.deploy.opset - 1})})
    spec = get_spec("efficientnet_lite0")
    paths = {backbone_onnx_path(p.data.cache_dir, spec, 64, p.train.seed, p.deploy.opset) for p in (tiny_params, other)}
    assert len(paths) == 2
    assert params_fingerprint(tiny_params, CHOOSE_KEYS) != params_fingerprint(other, CHOOSE_KEYS)


@pytest.mark.parametrize("damage", ["truncated", "another graph"])
def test_a_projects_exported_graph_changed_since_export_is_exported_again_not_scored(tiny_params, tmp_path, caplog, damage):
    """A cut file (a full disk, a copy interrupted) or another network's graph in the project's cache: choose would
    score it, the trunk cut it and deploy compose the model from it; it is exported again instead."""
    from components.choose.candidates import score_candidate

    split = scan(tiny_params.data.dir)
    params = _with_choose(tiny_params, shared_exports=False)
    params = params.model_copy(update={"data": params.data.model_copy(update={"cache_dir": tmp_path / "cache"})})
    first = score_candidate(params, split, "efficientnet_lite0")
    graph = Path(first.onnx_path)
    exported = graph.read_bytes()
    if damage == "truncated":
        graph.write_bytes(exported[:5000])
    else:
        other = score_candidate(params, split, "random_efficientnet_lite0")
        graph.write_bytes(Path(other.onnx_path).read_bytes())
    for cached in (Path(params.data.cache_dir) / "features").glob("efficientnet_lite0-*.npz"):
        cached.unlink()  # so that the features would be computed from the damaged graph
    with caplog.at_level("WARNING", logger="components"):
        again = score_candidate(params, split, "efficientnet_lite0")
    assert f"{graph} changed since it was exported" in caplog.text
    assert again.status == "ok" and again.logme == pytest.approx(first.logme, rel=1e-5)
    assert Path(again.onnx_path) == graph and graph.read_bytes() == exported  # the same export again
