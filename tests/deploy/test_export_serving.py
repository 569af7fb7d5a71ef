"""ONNX export and the torch-free consumer, on real digit images."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from PIL import Image

from components.core.errors import BundleError, ExportError, GraftError
from components.data.images import load_batch
from components.deploy.export import check_parity
from components.runtime.bundle import open_bundle, write_bundle
from components.runtime.model import OnnxClassifier
from components.runtime.providers import choose_providers
from components.runtime.variant_files import pick_variant
from tests.conftest import REPO, seeded_store
from tests.deploy.fixtures import NAME, active_registry, deploy_tiny, params_file, registry, tiny_model  # noqa: F401


@pytest.fixture(scope="module")
def exported(tiny_model):  # noqa: F811 - one export per session, shared with the other deploy tests
    return tiny_model.split, tiny_model.model, tiny_model.export


def test_export_is_checked_dynamic_and_agrees_with_torch(exported):
    split, _, result = exported
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    proto = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    model = OnnxClassifier(result.onnx_path)
    for n in (1, 5):
        probs = model.predict_proba(load_batch([s.path for s in split.val[:n]], model.image_size))
        assert probs.shape == (n, 3)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert model.classes == ("0", "1", "7")


def test_a_graph_the_checker_refuses_is_an_export_error_and_leaves_no_file(exported, tmp_path, monkeypatch):
    """onnx's full check runs strict shape inference, whose error is not a ValidationError."""
    import onnx.shape_inference

    from components.deploy.export import export_onnx

    _, model, result = exported

    def refuses(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] inferred shape and existing shape differ")

    monkeypatch.setattr(onnx.checker, "check_model", refuses)
    with pytest.raises(ExportError, match=r"onnx.checker rejected the exported model \(InferenceError: .*try another deploy.opset"):
        export_onnx(model, tmp_path / "model.onnx", 64, 18, {}, backbone_onnx=None)
    assert list(tmp_path.iterdir()) == []  # neither the model nor a temporary file


def test_parity_failure_says_by_how_much(exported):
    split, model, result = exported
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.head.bias += 5.0 * torch.arange(3, dtype=torch.float32)  # torch now differs from the file
    images = load_batch([s.path for s in split.val], 64)
    with pytest.raises(ExportError, match=r"max \|diff\| .*x over.*not registered"):
        check_parity(model, result.onnx_path, images, 1e-4)
    # probabilities never differ by more than 1: with that tolerance only the top-1 labels can fail the check
    with pytest.raises(ExportError, match=r"top-1 agreement (?!100\.00%)\d+\.\d+% \(must be 100%\)"):
        check_parity(model, result.onnx_path, images, 1.0)


def test_predict_cli_uses_onnxruntime_without_importing_torch(exported):
    split, _, result = exported
    files = [str(s.path) for s in split.val[:4]]
    code = (
        "import sys; from flows.cli import main; rc = main(['predict', '--model', sys.argv[1], *sys.argv[2:]]);"
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(result.onnx_path), *files], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in rows] == files
    truth = [split.classes[s.label] for s in split.val[:4]]
    assert sum(r["label"] == t for r, t in zip(rows, truth)) >= 3
    assert all(0 < r["score"] <= 1 for r in rows)


def test_predict_reports_a_corrupt_file_and_goes_on(exported, tmp_path):
    split, _, result = exported
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    from flows.cli import main

    assert main(["predict", "--model", str(result.onnx_path), str(bad), str(split.val[0].path)]) == 1


def test_gpu_providers_are_only_requested_when_a_gpu_exists(monkeypatch):
    import components.runtime.providers as providers

    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(providers, "has_nvidia_gpu", lambda: False)
    assert choose_providers(listed) == ["CPUExecutionProvider"]
    monkeypatch.setattr(providers, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(providers, "_has_tensorrt", lambda: True)
    assert choose_providers(listed) == listed


def test_metadata_says_what_the_model_is(exported):
    _, _, result = exported
    meta = {p.key: p.value for p in onnx.load(str(result.onnx_path)).metadata_props}
    assert {"classes", "image_size", "mean", "std", "backbone", "data_md5"} <= set(meta)
    assert json.loads(meta["classes"]) == ["0", "1", "7"] and len(json.loads(meta["std"])) == 3
    assert onnx.load(str(result.onnx_path)).opset_import[0].version == result.opset >= 18


def test_a_consumer_without_graft_prepares_images_from_the_deployed_files_own_metadata(tiny_model, tmp_path):  # noqa: F811
    """The deployed file says what it takes and how an image becomes that (`input`, `preprocessing`), in its own metadata
    and in the MLflow model's: following those words with Pillow and onnxruntime alone gives Graft's own answer."""
    import mlflow
    import onnxruntime as ort
    from PIL import ImageOps

    uri = f"sqlite:///{seeded_store(tmp_path / 'mlflow') / 'mlflow.db'}"
    result = deploy_tiny(tiny_model, uri, NAME, tmp_path / "work")
    session = ort.InferenceSession(str(result.export.onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["graft.variant"] == "fp32"
    assert all(words in meta["input"] for words in ("uint8 RGB 0-255", "channels last", "normalises it (mean, std) itself"))
    assert all(words in meta["preprocessing"] for words in ("EXIF orientation", "bilinear", "no crop", "aspect ratio is not kept"))
    size = int(meta["image_size"])
    paths = [s.path for s in tiny_model.split.test[:6]]
    by_the_words = np.stack([np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                                        dtype=np.uint8) for p in paths])
    plain = session.run(None, {session.get_inputs()[0].name: by_the_words})[0]
    np.testing.assert_allclose(plain, OnnxClassifier(result.export.onnx_path).predict_proba(load_batch(paths, size)), atol=1e-6)
    info = mlflow.models.get_model_info(f"models:/{NAME}/{result.version}")
    assert (info.metadata["preprocessing"], info.metadata["input"]) == (meta["preprocessing"], meta["input"])


def test_paths_pil_images_arrays_and_batches_give_the_same_answer(exported):
    split, _, result = exported
    model = OnnxClassifier(result.onnx_path)
    paths = [s.path for s in split.val[:3]]
    by_path = [p.label for p in model.predict(paths)]
    pil = [Image.open(p) for p in paths]
    assert [p.label for p in model.predict(pil)] == by_path
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    assert [p.label for p in model.predict(arrays)] == by_path
    assert [p.label for p in model.predict(load_batch(paths, 64))] == by_path
    assert model.predict(arrays[0])[0].label == by_path[0]
    with pytest.raises(GraftError, match="must be uint8"):
        model.predict([arrays[0].astype(np.float32)])


def test_io_binding_gives_the_same_probabilities(exported):
    split, _, result = exported
    images = load_batch([s.path for s in split.val], 64)
    bound = OnnxClassifier(result.onnx_path, ["CPUExecutionProvider"], io_binding=True)
    plain = OnnxClassifier(result.onnx_path, ["CPUExecutionProvider"])
    assert bound.io_binding and not plain.io_binding  # on by default only on CUDA/TensorRT
    np.testing.assert_array_equal(bound.predict_proba(images, batch_size=5), plain.predict_proba(images))


def test_auto_variant_follows_the_provider():
    assert pick_variant("auto", ["fp32", "fp16", "int8"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "fp16"
    assert pick_variant("auto", ["fp32", "fp16", "int8"], ["CPUExecutionProvider"]) == "int8"
    assert pick_variant("auto", ["fp32"], ["CPUExecutionProvider"]) == "fp32"
    with pytest.raises(GraftError, match="not published"):
        pick_variant("int8", ["fp32"], ["CPUExecutionProvider"])


def test_bundle_loads_verified_and_refuses_a_tampered_file(exported, tmp_path):
    split, _, result = exported
    card = tmp_path / "model_card.md"
    card.write_text("# card\n")
    bundle = write_bundle(result.onnx_path, tmp_path / "bundle", {"name": NAME, "version": "7"}, model_card=card)
    assert sorted(p.name for p in bundle.dir.iterdir()) == ["SHA256SUMS", "labels.txt", "metadata.json", "model.onnx", "model_card.md"]
    assert bundle.classes == ("0", "1", "7") and bundle.version == "7"
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle.dir, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    model = OnnxClassifier.load(bundle.dir)
    assert model.source.version == "7"
    paths = [s.path for s in split.val[:4]]
    assert [p.label for p in model.predict(paths)] == [p.label for p in OnnxClassifier(result.onnx_path).predict(paths)]
    with pytest.raises(BundleError, match="not empty"):
        write_bundle(result.onnx_path, bundle.dir, {})
    (bundle.dir / "labels.txt").write_text("0\n7\n1\n")
    with pytest.raises(BundleError, match=r"labels.txt does not match its checksum"):
        OnnxClassifier.load(bundle.dir)
    (bundle.dir / "extra.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.onnx is not listed"):
        open_bundle(bundle.dir)


def test_consumer_without_torch_classifies_from_the_registry_by_alias(active_registry, exported, tmp_path):  # noqa: F811
    split, _, _ = exported
    reg = active_registry
    reg.client.set_registered_model_alias(NAME, "champion", reg.v1)
    samples = split.val[:6]
    code = (
        "import json, sys\n"
        "from components.registry.tracking import use_tracking_uri\n"
        "from components.runtime.model import OnnxClassifier\n"
        "use_tracking_uri(sys.argv[1])\n"
        "model = OnnxClassifier.load('models:/graft-test@champion')\n"
        "labels = [p.label for p in model.predict(sys.argv[2:])]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps({'version': model.source.version, 'provider': model.provider, 'labels': labels}))\n"
    )

    def consume() -> dict:
        out = subprocess.run([sys.executable, "-c", code, reg.uri, *[str(s.path) for s in samples]], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    first = consume()
    truth = [split.classes[s.label] for s in samples]
    assert first["version"] == reg.v1 and first["provider"] == "CPUExecutionProvider"
    assert sum(a == b for a, b in zip(first["labels"], truth)) >= 5
    reg.client.set_registered_model_alias(NAME, "champion", reg.v2)  # as in the MLflow UI
    second = consume()
    assert second["version"] == reg.v2 and second["labels"] == ["7"] * 6
    reg.client.set_registered_model_alias(NAME, "champion", reg.v1)


def test_graft_bundle_from_the_registry(active_registry, exported, tmp_path, capsys):  # noqa: F811
    split, _, _ = exported
    reg = active_registry
    reg.client.set_registered_model_alias(NAME, "champion", reg.v1)
    out = tmp_path / "bundle"
    assert main_cli(["bundle", "--params", str(params_file(reg, tmp_path)), "--model", f"models:/{NAME}@champion", "--out", str(out)]) == 0
    bundle = open_bundle(out)
    assert bundle.name == NAME and bundle.version == reg.v1 and bundle.variants == ("fp32",)
    assert json.loads((out / "metadata.json").read_text())["source"] == f"models:/{NAME}/{reg.v1}"
    assert str(out.resolve()) in capsys.readouterr().out


def main_cli(argv):
    from flows.cli import main

    return main(argv)


def test_graft_serve_turns_spin_waiting_off_and_other_sessions_keep_onnxruntime_s_default(monkeypatch):
    """onnxruntime's threads spin after each run by default; `graft serve` shares its cores with its HTTP workers."""
    import components.runtime.providers as providers
    import components.serve.server as server

    key = "session.intra_op.allow_spinning"
    monkeypatch.setattr(providers, "_SPIN_WAITING", True)
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default (spinning)
        providers.session_options().get_session_config_entry(key)

    class Stop(Exception):
        pass

    def no_model(*_args, **_kwargs):
        raise Stop  # serve() has made its process-wide choice by the time it loads the model

    monkeypatch.setattr(server, "LiveModel", no_model)
    with pytest.raises(Stop):
        server.serve("models:/none@champion", "127.0.0.1", 0, server.ServeSettings())
    assert providers.session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError):  # a caller may still ask for it explicitly
        providers.session_options(spin=True).get_session_config_entry(key)


def _sessions_asked_for(monkeypatch) -> list:
    """Record the `providers` each onnxruntime session is asked for, and open it on the CPU (no GPU here)."""
    import onnxruntime as ort

    asked, real = [], ort.InferenceSession

    def recording(path, options=None, providers=None, **kwargs):
        asked.append(providers)
        return real(path, options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return asked


def test_tensorrt_keeps_each_model_file_s_engines_in_a_folder_of_its_own(exported, tmp_path, monkeypatch):
    """TensorRT builds its engines once per machine, into a cache. onnxruntime names a cached engine by the
    file's name and the graph's node names, not the weights: two versions of one architecture, both
    `model.onnx`, must get folders of their own, or the new version would run the old one's engine."""
    import components.runtime.providers as providers

    _, _, result = exported
    monkeypatch.setenv(providers.TENSORRT_CACHE_ENV, str(tmp_path / "tensorrt"))
    old, new = tmp_path / "v1" / "model.onnx", tmp_path / "v2" / "model.onnx"
    old.parent.mkdir()
    new.parent.mkdir()
    old.write_bytes(result.onnx_path.read_bytes())
    retrained = onnx.load(str(result.onnx_path))
    weight = next(t for t in reversed(retrained.graph.initializer) if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))  # same graph, other weights
    onnx.save(retrained, str(new))

    asked = _sessions_asked_for(monkeypatch)
    for path in (old, new, old):
        OnnxClassifier.load(path, providers=["TensorrtExecutionProvider", "CPUExecutionProvider"])
    options = [providers_asked[0][1] for providers_asked in asked]
    assert [providers_asked[0][0] for providers_asked in asked] == ["TensorrtExecutionProvider"] * 3
    assert all(providers_asked[1] == "CPUExecutionProvider" for providers_asked in asked)
    engines = [o["trt_engine_cache_path"] for o in options]
    assert engines[0] == engines[2] != engines[1]  # the same file finds its engines again; a retrained one does not
    assert all(o["trt_engine_cache_enable"] == "True" and o["trt_timing_cache_enable"] == "True" for o in options)
    assert {o["trt_timing_cache_path"] for o in options} == {str(tmp_path / "tensorrt" / "timing")}  # tactics: shared
    assert all("trt_fp16_enable" not in o for o in options)  # the file's own precision: what the deploy stage judged
    assert all((Path(e).stat().st_mode & 0o777) == 0o700 for e in engines)


def test_an_unwritable_tensorrt_cache_costs_the_cache_and_says_so_not_the_session(exported, tmp_path, monkeypatch, caplog):
    import components.runtime.providers as providers

    _, _, result = exported
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(providers.TENSORRT_CACHE_ENV, str(blocker / "tensorrt"))  # no folder can be made under a file
    asked = _sessions_asked_for(monkeypatch)
    with caplog.at_level("WARNING", logger="components.runtime.providers"):
        model = OnnxClassifier(result.onnx_path, ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert asked == [["TensorrtExecutionProvider", "CPUExecutionProvider"]]
    assert model.predict_proba(np.zeros((1, model.image_size, model.image_size, 3), np.uint8)).shape[0] == 1
    assert "GRAFT_TENSORRT_CACHE" in caplog.text and "built in every process" in caplog.text


def test_a_variant_asked_for_by_an_artifact_uri_is_that_variant_or_an_error(tmp_path):
    """`--model runs:/...` or any artifact URI with `--variant int8` loads the int8 file beside the fp32 one, not fp32."""
    from tests.models import tiny_onnx

    tiny_onnx(tmp_path / "model" / "model.onnx", ("0", "1", "7"))
    tiny_onnx(tmp_path / "model" / "model.int8.onnx", ("a", "b", "c"))  # told apart by their classes
    int8 = OnnxClassifier.load(f"file://{tmp_path}/model", variant="int8")
    assert int8.classes == ("a", "b", "c") and int8.source.variant == "int8"
    assert OnnxClassifier.load(f"file://{tmp_path}/model").classes == ("0", "1", "7")
    with pytest.raises(GraftError, match=r"variant 'fp16' was not published for this model \(available: fp32, int8\)"):
        OnnxClassifier.load(f"file://{tmp_path}/model", variant="fp16")


def test_an_export_that_scores_otherwise_than_the_evaluated_model_is_not_registered(tiny_model, tmp_path):  # noqa: F811
    """Training and evaluation read cached features; the exported model computes its own. When the two disagree (features
    cached from another network), the run stops before registering a model whose figures describe another."""
    from dataclasses import replace

    from components.registry.tracking import tracking_uri
    from mlflow import MlflowClient
    from tests.deploy.fixtures import deploy_params, deploy_tiny

    evaluated = tiny_model.evaluation
    elsewhere = replace(tiny_model, evaluation=replace(evaluated, test={**evaluated.test, "accuracy": 0.065}))
    uri = tracking_uri(deploy_params(tiny_model, tmp_path))
    with pytest.raises(ExportError, match=r"test accuracy is [01]\.\d+, but the evaluate stage measured 0\.0650 .*nothing was "
                                          r"registered.*delete .*features and .*onnx, and rerun"):
        deploy_tiny(elsewhere, uri, "graft-elsewhere", tmp_path / "run")
    assert MlflowClient(uri, uri).search_model_versions("name = 'graft-elsewhere'") == []
    assert deploy_tiny(tiny_model, uri, "graft-elsewhere", tmp_path / "again").version == "1"  # the same figures: registered
