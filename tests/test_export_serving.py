"""ONNX export and the torch-free consumer, on real digit images."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from components.choose import choose_model
from components.data import scan
from components.errors import ExportError
from components.export import check_parity, export_and_verify
from components.images import load_batch
from components.serving import OnnxClassifier, choose_providers
from components.train import fine_tune, load_classifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(digits_dir, feature_cache_dir, tmp_path_factory):
    from components.config import load_params
    from tests.conftest import tiny_overrides

    tmp_path = tmp_path_factory.mktemp("export")
    tiny_params = load_params(REPO / "params.yaml", tiny_overrides(digits_dir, tmp_path, feature_cache_dir))
    split = scan(tiny_params.data.dir)
    trained = fine_tune(tiny_params, split, choose_model(tiny_params, split), tmp_path / "run")
    model, _ = load_classifier(trained.checkpoint_path)
    meta = {"classes": list(split.classes), "image_size": trained.image_size, "backbone": trained.backbone}
    result = export_and_verify(
        model, tmp_path / "model.onnx", trained.image_size, 18, meta, [s.path for s in split.val], 1e-4
    )
    return split, model, result


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


def test_parity_failure_says_by_how_much(exported):
    split, model, result = exported
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.head.bias += 5.0 * torch.arange(3, dtype=torch.float32)  # torch now differs from the file
    images = load_batch([s.path for s in split.val], 64)
    with pytest.raises(ExportError, match=r"max \|diff\| .*x over.*not registered"):
        check_parity(model, result.onnx_path, images, 1e-4)


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
    import components.serving as serving

    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(serving, "_has_nvidia_gpu", lambda: False)
    assert choose_providers(listed) == ["CPUExecutionProvider"]
    monkeypatch.setattr(serving, "_has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(serving, "_has_tensorrt", lambda: True)
    assert choose_providers(listed) == listed
