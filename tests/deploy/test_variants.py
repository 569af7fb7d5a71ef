"""fp16, INT8 and optimised variants: built, judged on test images, published only within the accuracy limit and,
for the CPU variants, only when faster than fp32 on this machine."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import components.deploy.variants as variants_module
from components.data.images import load_batch
from components.deploy.variants import build_variants, judge_variant
from components.runtime.cpu import CpuFacts
from components.runtime.cpu import cpu_facts as real_cpu_facts
from components.runtime.model import OnnxClassifier
from tests.deploy.fixtures import biased_copy, tiny_model  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("variants")
    fp32 = shutil.copyfile(tiny_model.onnx_path, folder / "model.onnx")
    paths, labels = tiny_model.val()
    images = load_batch(paths, 64)
    calibration = load_batch([s.path for s in tiny_model.split.train[::3]], 64)
    report = build_variants(fp32, ("optimized", "fp16", "int8"), images, labels, calibration, max_drop=1.0, min_speedup=0)  # accuracy only
    return fp32, images, labels, report


def test_each_variant_reports_its_own_accuracy_change(built):
    fp32, images, labels, report = built
    assert [v.name for v in report.variants] == ["optimized", "fp16", "int8"]
    reference = OnnxClassifier(fp32).predict_proba(images)
    assert report.fp32_accuracy == pytest.approx(float((reference.argmax(1) == labels).mean()))
    for variant in report.variants:
        assert variant.published and variant.path.is_file() and variant.path.parent == fp32.parent
        probs = OnnxClassifier(variant.path).predict_proba(images)
        accuracy = float((probs.argmax(1) == labels).mean())
        assert variant.accuracy == pytest.approx(accuracy)
        assert variant.accuracy_change == pytest.approx(accuracy - report.fp32_accuracy)
        assert f"{variant.accuracy_change * 100:+.1f} points" in variant.reason
    assert report.get("optimized").max_abs_diff < 1e-5  # same maths, fused
    assert report.get("fp16").max_abs_diff < 5e-2
    assert report.get("int8").size_bytes < 0.5 * fp32.stat().st_size


def test_int8_keeps_validation_accuracy_within_the_configured_drop(built, tiny_model):  # noqa: F811
    _, images, labels, report = built
    int8 = report.get("int8")
    limit = tiny_model.params.deploy.max_variant_drop
    assert -int8.accuracy_change <= limit, int8.reason
    agreement = f"only {int8.top1_agreement:.1%} of {len(labels)} top-1 labels match fp32"
    assert int8.top1_agreement >= 1 - 2 * limit, agreement
    assert int8.size_bytes < 0.5 * report.get("optimized").size_bytes


def test_int8_integer_kernels_compute_what_its_quantised_graph_says(built):
    """onnxruntime's fused integer kernels must agree with the QDQ graph evaluated in float.

    They did not for full 8-bit weights on CPUs without VNNI (16-bit saturation in VPMADDUBSW):
    -17 accuracy points with the kernels against -3 for the same graph in float.
    """
    import onnxruntime as ort

    _, images, _, report = built
    path = report.get("int8").path

    def probabilities(level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]

    fused = probabilities(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    simulated = probabilities(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert (fused.argmax(1) == simulated.argmax(1)).mean() >= 0.98
    assert np.abs(fused - simulated).max() < 0.2
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Gemm" in ops and "QuantizeLinear" in ops  # the head stays fp32, the body is quantised


def test_variants_keep_the_metadata_and_io_types_consumers_rely_on(built):
    fp32, _, _, report = built
    original = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    for variant in report.variants:
        proto = onnx.load(str(variant.path))
        meta = {p.key: p.value for p in proto.metadata_props}
        assert {k: meta[k] for k in original} == original
        assert meta["graft.variant"] == variant.name
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    int8_ops = {node.op_type for node in onnx.load(str(report.get("int8").path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= int8_ops


def test_the_listing_names_only_published_variants(built):
    _, _, _, report = built
    listed = report.listing()
    assert set(listed) == {"optimized", "fp16", "int8"}
    assert listed["int8"]["file"] == "model.int8.onnx" and len(listed["int8"]["sha256"]) == 64
    assert report.get("fp16").published


def test_a_variant_losing_more_than_the_limit_is_not_published(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    fp32 = shutil.copyfile(tiny_model.onnx_path, tmp_path / "model.onnx")
    paths, labels = tiny_model.val()
    images = load_batch(paths, 64)

    def broken_int8(source, target, calibration_images, bits=None):  # a quantiser that ruins the model
        return biased_copy(source, target, winner=0)

    monkeypatch.setattr(variants_module, "build_int8", broken_int8)
    report = build_variants(fp32, ("int8",), images, labels, images[:4], max_drop=0.01, min_speedup=0)
    int8 = report.get("int8")
    assert not int8.published
    assert int8.accuracy_change < -0.01
    assert "NOT published" in int8.reason and "deploy.max_variant_drop" in int8.reason
    assert not (tmp_path / "model.int8.onnx").exists() and int8.path == tmp_path / "rejected" / "model.int8.onnx"
    assert "int8" not in report.listing() and report.published == ()
    with pytest.raises(Exception, match="not published"):
        OnnxClassifier.load(fp32, variant="int8")


def test_a_cpu_variant_no_faster_than_fp32_is_not_published(built, tiny_model, tmp_path):  # noqa: F811
    """Timed against fp32 on this machine, interleaved: asked for an impossible speed-up, the CPU variants stay out;
    fp16 (for GPUs) is not timed without a GPU and stays published on its accuracy."""
    fp32 = shutil.copyfile(tiny_model.onnx_path, tmp_path / "model.onnx")
    _, images, labels, _ = built
    report = build_variants(fp32, ("optimized", "fp16", "int8"), images, labels, images[::3], max_drop=1.0, min_speedup=100)
    for name in ("optimized", "int8"):
        variant = report.get(name)
        assert not variant.published and variant.path == tmp_path / "rejected" / variant.path.name
        assert variant.speed is not None and variant.speed.speedup_batch1 < 100 and variant.speed.fp32_batch1_ms > 0
        assert "NOT published" in variant.reason and "not 100x as fast as fp32 on this CPU" in variant.reason
        assert name not in report.listing()
    fp16 = report.get("fp16")
    assert fp16.published and fp16.speed is None and "not timed: no GPU" in fp16.reason
    assert report.published == ("fp16",)


@pytest.mark.parametrize(("fp32_s", "variant_s", "rounds"), [(2.0, 1.0, 3), (1.0, 2.0, 3), (1.0, 1.04, 5)],
                         ids=["twice as fast: clear", "half as fast: clear", "near the bar: every round"])
def test_speed_timing_stops_once_the_verdict_is_clear_and_times_every_round_near_the_bar(tiny_model, tmp_path, monkeypatch,  # noqa: F811
                                                                                         fp32_s, variant_s, rounds):
    """Against the 1.05x bar, three rounds decide a variant far from it either way; one near it is timed every round.
    Without a bar (GPU variants, the benchmark) every round is timed. The clock is replaced: each round times fp32,
    then the variant, at batch 1 and at batch 32."""
    import itertools

    fp32 = shutil.copyfile(tiny_model.onnx_path, tmp_path / "model.onnx")
    variant = shutil.copyfile(tiny_model.onnx_path, tmp_path / "model.int8.onnx")
    images = load_batch([s.path for s in tiny_model.split.val[:4]], 64)
    for bar, expected in ((variants_module.MIN_SPEEDUP, rounds), (None, variants_module.SPEED_ROUNDS)):
        clock = itertools.cycle([fp32_s, variant_s])
        monkeypatch.setattr(variants_module, "_seconds", lambda run, calls, clock=clock: next(clock))
        speed = variants_module.time_against_fp32(fp32, variant, images, ["CPUExecutionProvider"], bar=bar)
        assert speed.rounds == expected
        assert speed.speedup_batch1 == pytest.approx(fp32_s / variant_s) and speed.speedup_batch == pytest.approx(fp32_s / variant_s)


def test_int8_records_how_it_was_built_and_the_cpu_it_was_built_on(built):
    from components.runtime.cpu import cpu_facts

    _, _, _, report = built
    meta = {p.key: p.value for p in onnx.load(str(report.get("int8").path)).metadata_props}
    bits = "8" if cpu_facts().vnni else "7"
    assert meta["graft.int8_weight_bits"] == bits and f"{bits}-bit" in meta["graft.int8_scheme"]
    assert "bias-corrected" in meta["graft.int8_scheme"] and meta["graft.int8_built_on"] == cpu_facts().describe()
    assert len(meta["graft.int8_float_nodes"].split(",")) == 4  # the stem, the first block's two convolutions, the head


def test_int8_reads_the_image_through_one_dequantize_where_its_normalisation_is_exact(built):
    """EfficientNet-Lite's (x - 127) / 128: the INT8 file reads the uint8 image as a quantised tensor, one
    DequantizeLinear instead of Cast, Div, Sub and Div, and computes what the float chain computes."""
    from onnx import numpy_helper

    from components.deploy.int8 import fold_input_normalisation

    fp32, images, _, report = built
    proto = onnx.load(str(report.get("int8").path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["graft.int8_input"] == "DequantizeLinear(image, scale 0.0078125, zero point 127)"
    first = [node.op_type for node in proto.graph.node if proto.graph.input[0].name in node.input or node.name == "/graft_input_normalisation"]
    assert first == ["Transpose", "DequantizeLinear"] and not {"Cast", "Sub"} & {node.op_type for node in proto.graph.node}
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert constants["graft_input_normalisation_zero_point"] == 127 and constants["graft_input_normalisation_scale"] == 1 / 128
    used = {name for node in proto.graph.node for name in node.input}
    assert set(constants) <= used  # the float chain's 255, mean and std went with it: no "Removing initializer" at each load

    folded = onnx.load(str(fp32))  # the same fold on the float graph: only float rounding apart
    assert fold_input_normalisation(folded) is not None
    onnx.save(folded, str(fp32.parent / "folded.onnx"))
    reference = OnnxClassifier(fp32).predict_proba(images)
    assert np.abs(OnnxClassifier(fp32.parent / "folded.onnx").predict_proba(images) - reference).max() < 1e-5


def test_a_normalisation_that_is_no_whole_number_of_pixel_levels_is_left_as_it_is():
    """ImageNet's mean (123.675, 116.28, 103.53 pixel levels) has no uint8 zero point: the float chain stays."""
    from onnx import TensorProto, helper, numpy_helper

    from components.deploy.int8 import fold_input_normalisation

    def model(mean: list[float], std_shape: tuple[int, ...] = (1, 3, 1, 1)):  # noqa: ANN202 - onnx.ModelProto
        constants = [numpy_helper.from_array(np.array(v, dtype=np.float32).reshape(shape), name) for name, v, shape in (
            ("by", 255.0, ()), ("mean", mean, (1, 3, 1, 1)), ("std", [0.229, 0.224, 0.225], std_shape))]
        graph = helper.make_graph([
            helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["f", "by"], ["a"]), helper.make_node("Sub", ["a", "mean"], ["b"]),
            helper.make_node("Div", ["b", "std"], ["x"]),
        ], "normalise", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 4, 4, 3])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], constants)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)

    imagenet = model([0.485, 0.456, 0.406])
    before = imagenet.SerializeToString()
    assert fold_input_normalisation(imagenet) is None and imagenet.SerializeToString() == before
    along_width = model([124 / 255, 116 / 255, 104 / 255], std_shape=(3,))  # std broadcast along W, not the channels
    assert fold_input_normalisation(along_width) is None
    whole = model([124 / 255, 116 / 255, 104 / 255])  # whole pixel levels per channel: a per-channel fold on axis 1
    assert fold_input_normalisation(whole) == "DequantizeLinear(image, scale 0.0171248, 0.017507, 0.0174292, zero point 124, 116, 104)"
    import onnxruntime as ort

    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    expected = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.array([124, 116, 104]).reshape(1, 3, 1, 1) / 255) / np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    session = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": pixels})[0] - expected).max() < 1e-5


def test_bias_correction_removes_the_mean_shift_of_rounded_weights(tiny_model, tmp_path):  # noqa: F811
    """On the calibration images, each corrected convolution's mean output with rounded weights equals the
    fp32 mean output (to float precision); uncorrected, rounding shifts it."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from components.deploy.int8 import correct_weight_bias, rounded_like_onnxruntime

    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(tiny_model.onnx_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    images = load_batch([s.path for s in tiny_model.split.train[:16]], 64)
    corrected = correct_weight_bias(model, "images", images, skip=(), bits=8)

    def conv_output_means(proto, round_weights: bool) -> dict[str, np.ndarray]:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        if round_weights:
            weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
            for init in proto.graph.initializer:
                if init.name in weights:
                    init.CopyFrom(numpy_helper.from_array(rounded_like_onnxruntime(numpy_helper.to_array(init), 8).astype(np.float32), init.name))
        outputs = [n.output[0] for n in proto.graph.node if n.op_type == "Conv"]
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return {o: v.mean(axis=(0, 2, 3)) for o, v in zip(outputs, session.run(outputs, {"images": images}), strict=True)}

    exact = conv_output_means(model, round_weights=False)
    rounded = conv_output_means(model, round_weights=True)
    fixed = conv_output_means(corrected, round_weights=True)
    first = next(iter(exact))  # the stem sees the images themselves: its mean shift is removed exactly
    np.testing.assert_allclose(fixed[first], exact[first], atol=1e-4)
    before = np.mean([np.abs(rounded[o] - exact[o]).mean() for o in exact])
    after = np.mean([np.abs(fixed[o] - exact[o]).mean() for o in exact])
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("vnni", [True, False], ids=["8-bit weights", "7-bit weights"])
def test_int8_weights_are_the_rounding_the_bias_correction_assumed(tiny_model, tmp_path, monkeypatch, vnni):  # noqa: F811
    """Each quantised convolution's weights in the INT8 file, dequantised, equal `rounded_like_onnxruntime` of the
    fp32 weights: per channel, scale absmax / 127 with VNNI, absmax / 63 without (onnxruntime's own reduced range
    is -64..64, which the bias correction did not assume), and no weight outside the range."""
    from onnx import numpy_helper
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import components.deploy.int8 as int8
    from components.runtime.cpu import CpuFacts, cpu_facts

    flags = ("avx2", "avx512f", "avx512_vnni") if vnni else ("avx2", "avx512f")
    monkeypatch.setattr(int8, "cpu_facts", lambda: CpuFacts(cpu_facts().model, cpu_facts().cores, flags))
    calibration = load_batch([s.path for s in tiny_model.split.train[:16]], 64)
    meta = int8.to_int8(tiny_model.onnx_path, tmp_path / "model.int8.onnx", calibration)
    bits = 8 if vnni else 7
    assert meta["graft.int8_weight_bits"] == str(bits)
    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(tiny_model.onnx_path), str(prepared), skip_symbolic_shape=True)
    source = onnx.load(str(prepared))
    fp32 = {init.name: numpy_helper.to_array(init) for init in source.graph.initializer}
    quantised = onnx.load(str(tmp_path / "model.int8.onnx"))
    stored = {init.name: numpy_helper.to_array(init) for init in quantised.graph.initializer}
    checked = adjusted = 0
    for node in quantised.graph.node:
        name = node.input[0].removesuffix("_quantized")
        if node.op_type == "DequantizeLinear" and name in fp32 and stored[node.input[0]].dtype == np.int8:
            weight, q, scale = fp32[name], stored[node.input[0]], stored[node.input[1]]
            assert np.abs(q).max() <= 2 ** (bits - 1) - 1, name
            # onnxruntime raises the scale of a channel whose int32 bias would overflow (weights near zero): those
            # channels are the only ones allowed to differ, and only upwards
            given = scale == int8.weight_scales(weight, bits)
            assert (scale[~given] > int8.weight_scales(weight, bits)[~given]).all(), name
            adjusted += int((~given).sum())
            dequantised = q.astype(np.float64) * scale.reshape(-1, *[1] * (q.ndim - 1))
            np.testing.assert_array_equal(dequantised[given], int8.rounded_like_onnxruntime(weight, bits)[given], err_msg=name)
            checked += len(scale)
    convs = [node for node in source.graph.node if node.op_type == "Conv"]
    assert sum(fp32[node.input[1]].shape[0] for node in convs[int8.INT8_FLOAT_LEADING_CONVS:]) == checked > 0
    assert adjusted <= 0.01 * checked, (adjusted, checked)


def test_judging_uses_the_configured_limit(tiny_model, tmp_path):  # noqa: F811
    paths, labels = tiny_model.val()
    images = load_batch(paths, 64)
    reference = OnnxClassifier(tiny_model.onnx_path).predict_proba(images)
    worse = biased_copy(tiny_model.onnx_path, tmp_path / "model.worse.onnx", winner=1)
    loss = float((reference.argmax(1) == labels).mean()) - float((OnnxClassifier(worse).predict_proba(images).argmax(1) == labels).mean())
    assert loss > 0
    assert not judge_variant("int8", worse, reference, images, labels, loss - 0.01, 0.0).published
    assert judge_variant("int8", worse, reference, images, labels, loss + 0.01, 0.0).published
    assert np.isclose(judge_variant("int8", worse, reference, images, labels, 1.0, 0.0).accuracy_change, -loss)


def test_a_drop_just_over_the_limit_never_reads_as_the_limit(tiny_model):  # noqa: F811
    """One image in N lost, the limit a tenth of a point under it: the verdict's figure must show which side it is on."""
    paths, _ = tiny_model.val()
    images = load_batch(paths, 64)
    served = OnnxClassifier(tiny_model.onnx_path).predict_proba(images)
    labels = served.argmax(1)
    labels[0] = (labels[0] + 1) % served.shape[1]  # the variant (the same file) errs on the first image only
    reference = served.copy()
    reference[0] = np.eye(served.shape[1])[labels[0]]  # fp32 gets it right
    drop = 100 / len(images)  # points
    limit = np.floor(drop * 10) / 10
    assert round(drop, 1) == limit < round(drop, 2)  # one decimal would show the drop equal to the limit
    result = judge_variant("int8", tiny_model.onnx_path, reference, images, labels, limit / 100, 0.0)
    assert not result.published
    assert f"({-drop:+.2f} points vs fp32, limit deploy.max_variant_drop={limit:.1f} points): NOT published" in result.reason
    assert np.isclose(result.accuracy_change * 100, -drop)


@pytest.mark.slow  # trains the head on all 1,797 digits at the configured 112 px: ~2-3 min on two shared cores
def test_int8_is_published_for_the_real_configuration(tmp_path, feature_cache_dir):
    from components.backbones.zoo import get_spec
    from components.choose.ranking import ChooseResult
    from components.core.config import load_params
    from components.data.demo import write_digits
    from components.data.folders import scan
    from components.data.split import SplitSettings, stratified_sample
    from components.deploy.export import export_and_verify
    from components.train.stage import fine_tune, load_classifier
    from tests.conftest import REPO

    images_dir = write_digits(tmp_path / "images")
    params = load_params(REPO / "params.yaml", [
        f"data.dir={images_dir}", f"data.cache_dir={feature_cache_dir}", f"deploy.output_dir={tmp_path / 'outputs'}",
        f"tracking.store_dir={tmp_path / 'mlflow'}",
    ])
    split = scan(params.data.dir, SplitSettings.from_config(params.data))
    size = params.data.image_size
    trained = fine_tune(params, split, ChooseResult("efficientnet_lite0", size, "logme", "fixed for tests", (), 0.0), tmp_path / "run")
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    meta = {"classes": list(split.classes), "image_size": size, "mean": list(spec.mean), "std": list(spec.std)}
    val_paths = [s.path for s in split.val]
    exported = export_and_verify(model, tmp_path / "model" / "model.onnx", size, params.deploy.opset, meta, val_paths[:16], 1e-4)
    calibration_samples = stratified_sample(split.train, params.deploy.calibration_images, params.data.seed)
    calibration = load_batch([s.path for s in calibration_samples], size)
    labels = np.array([s.label for s in split.test])  # deploy judges variants on the test images
    report = build_variants(
        exported.onnx_path, ("int8",), load_batch([s.path for s in split.test], size), labels, calibration, params.deploy.max_variant_drop
    )
    int8 = report.get("int8")
    assert len(labels) > 250 and report.fp32_accuracy > 0.9
    assert int8.published, int8.reason  # within 1 point and faster than fp32 on this CPU
    assert -int8.accuracy_change <= params.deploy.max_variant_drop and int8.top1_agreement >= 0.97
    assert int8.speed is not None and min(int8.speed.speedup_batch1, int8.speed.speedup_batch) >= 1.05


def test_a_variant_of_the_same_model_and_inputs_is_copied_from_the_build_cache_and_judged_again(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """A rerun exports the same fp32 file: its variants come from the cache, byte for byte, and are judged afresh. Other
    calibration images, or a tampered cache entry, build again."""
    cache_dir = tmp_path / "cache" / "variants"
    paths, labels = tiny_model.val()
    images = load_batch(paths, 64)
    calibration = load_batch([s.path for s in tiny_model.split.train[::3]], 64)

    def build(folder_name, calibration_images):
        folder = tmp_path / folder_name
        folder.mkdir()
        fp32 = shutil.copyfile(tiny_model.onnx_path, folder / "model.onnx")
        return build_variants(fp32, ("fp16", "int8"), images, labels, calibration_images, max_drop=1.0, min_speedup=0, cache_dir=cache_dir)

    first = build("first", calibration)
    assert [v.reused for v in first.variants] == [False, False]
    real_int8 = variants_module.build_int8
    monkeypatch.setattr(variants_module, "build_int8", lambda *args: pytest.fail("INT8 was built again for the same model and inputs"))
    monkeypatch.setattr(variants_module, "to_fp16", lambda *args: pytest.fail("fp16 was built again for the same model"))
    second = build("second", calibration)
    assert [v.reused for v in second.variants] == [True, True]
    for before, after in zip(first.variants, second.variants, strict=True):
        assert after.path.parent == tmp_path / "second" and after.path.read_bytes() == before.path.read_bytes()
        assert after.accuracy == before.accuracy and after.reason == before.reason  # judged again, to the same verdict

    monkeypatch.setattr(variants_module, "build_int8", real_int8)
    other = build("other-calibration", calibration[::2])
    assert [v.reused for v in other.variants] == [True, False]  # fp16 does not read the calibration images

    for entry in cache_dir.iterdir():
        for kept in entry.glob("model.int8.onnx"):
            kept.write_bytes(kept.read_bytes()[:-16] + bytes(16))
    rebuilt = build("after-tampering", calibration)
    assert not rebuilt.get("int8").reused
    assert rebuilt.get("int8").path.read_bytes() == first.get("int8").path.read_bytes()


def _cpu(vnni: bool) -> CpuFacts:
    """This machine's CPU, with or without VNNI."""
    flags = ("avx2", "avx512f", "avx512_vnni") if vnni else ("avx2", "fma")
    return CpuFacts(real_cpu_facts().model, real_cpu_facts().cores, flags)


def _copied(tiny_model, folder):  # noqa: F811
    """The tiny model's fp32 file copied into `folder`, and its validation images and labels."""
    paths, labels = tiny_model.val()
    return shutil.copyfile(tiny_model.onnx_path, folder / "model.onnx"), load_batch(paths, 64), labels


@pytest.fixture(scope="module")
def eight_bit_int8(tiny_model, tmp_path_factory):  # noqa: F811
    """A folder with fp32 and an INT8 file built with 8-bit weights, as a CPU with VNNI builds it."""
    import components.deploy.int8 as int8

    folder = tmp_path_factory.mktemp("int8-bits")
    fp32, images, labels = _copied(tiny_model, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "cpu_facts", lambda: _cpu(vnni=True))
        report = build_variants(fp32, ("int8",), images, labels, images[::2], max_drop=1.0, min_speedup=0)
    return fp32, report


def test_auto_passes_over_an_int8_model_with_8_bit_weights_on_a_cpu_without_vnni(eight_bit_int8, monkeypatch, caplog):
    import components.runtime.cpu as cpu

    fp32, report = eight_bit_int8
    int8 = report.get("int8")
    assert int8.published and int8.keeps_accuracy_on.startswith("CPUs with VNNI")
    monkeypatch.setattr(cpu, "cpu_facts", lambda: _cpu(vnni=True))
    assert OnnxClassifier.load(fp32, variant="auto").source.variant == "int8"

    monkeypatch.setattr(cpu, "cpu_facts", lambda: _cpu(vnni=False))
    with caplog.at_level("WARNING"):
        model = OnnxClassifier.load(fp32, variant="auto")
    assert model.source.variant == "fp32" and model.path == fp32
    assert "8-bit weights" in model.source.note and "no VNNI" in model.source.note
    assert "deploy.int8_weight_bits: 7" in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING"):
        asked = OnnxClassifier.load(fp32, variant="int8")  # asked for by name: loaded, with the warning
    assert asked.source.variant == "int8" and asked.source.note is None
    assert "no VNNI" in caplog.text and asked.accuracy_warning


def test_int8_weight_bits_7_builds_a_file_every_cpu_may_load(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    import components.deploy.int8 as int8
    import components.runtime.cpu as cpu

    fp32, images, labels = _copied(tiny_model, tmp_path)
    monkeypatch.setattr(int8, "cpu_facts", lambda: _cpu(vnni=True))
    report = build_variants(fp32, ("int8",), images, labels, images[::2], max_drop=1.0, min_speedup=0, int8_weight_bits=7)
    meta = {p.key: p.value for p in onnx.load(str(report.get("int8").path)).metadata_props}
    assert meta["graft.int8_weight_bits"] == "7" and meta["graft.int8_exact_on"] == "any x86-64 CPU"
    assert report.get("int8").keeps_accuracy_on is None
    monkeypatch.setattr(cpu, "cpu_facts", lambda: _cpu(vnni=False))
    assert OnnxClassifier.load(fp32, variant="auto").source.variant == "int8"


def test_int8_weight_bits_8_is_refused_where_the_cpu_could_not_judge_it(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    import components.deploy.int8 as int8
    from components.core.errors import VariantError

    fp32, images, labels = _copied(tiny_model, tmp_path)
    monkeypatch.setattr(int8, "cpu_facts", lambda: _cpu(vnni=False))
    with pytest.raises(VariantError, match="int8_weight_bits is 8.*no VNNI.*auto or 7"):
        build_variants(fp32, ("int8",), images, labels, images[::2], max_drop=1.0, min_speedup=0, int8_weight_bits=8)
    assert not (tmp_path / "model.int8.onnx").exists()
