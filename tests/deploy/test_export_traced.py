"""A model whose backbone trained is traced with PyTorch's TorchScript exporter and tidied by onnxruntime (`deploy.exporter`)."""

import collections
import copy
import logging

import numpy as np
import onnx
import torch

from components.backbones.export import torchscript_trace, trace_to_onnx
from components.data.images import load_batch
from components.deploy.export import export_and_verify
from components.runtime.model import OnnxClassifier
from tests.deploy.fixtures import served_like_pytorch, tiny_model  # noqa: F401

META = {"classes": ["0", "1", "7"], "image_size": 64}


def _trained_backbone(tiny_model):  # noqa: F811
    """The tiny model with every backbone weight moved, as fine-tuning moves them."""
    model = copy.deepcopy(tiny_model.model).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
        model.temperature.fill_(1.4)
    return model


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in proto.graph.node)


def test_a_trained_backbone_model_is_traced_tidied_to_the_torch_export_graph_and_matches_pytorch(tiny_model, tmp_path, caplog):  # noqa: F811
    model = _trained_backbone(tiny_model)
    paths = [s.path for s in tiny_model.split.val]
    templates = tmp_path / "templates"
    with caplog.at_level(logging.INFO, logger="components.deploy.export"):
        result = export_and_verify(model, tmp_path / "model.onnx", 64, 18, META, paths, 1e-4, template_dir=templates)
    assert result.made == "traced" and "traced with PyTorch's TorchScript exporter, tidied by onnxruntime" in caplog.text
    assert not templates.exists()  # the torch.export-based exporter never ran

    served = onnx.load(str(result.onnx_path))
    raw = torchscript_trace(model, 64, "probabilities", 18)
    assert {"Constant", "Pad"} <= set(_ops(raw))  # what the tracer writes, and the tidying removes
    assert _ops(served) == _ops(trace_to_onnx(model, 64, "probabilities", 18))  # the torch.export-based exporter's nodes
    assert len(served.graph.node) < len(raw.graph.node) / 3
    assert {node.domain for node in served.graph.node} <= {""} and [(o.domain, o.version) for o in served.opset_import] == [("", 18)]

    actual = served_like_pytorch(result.onnx_path, model, paths)
    assert result.top1_agreement == 1.0
    untrained = OnnxClassifier(tiny_model.onnx_path).predict_proba(load_batch(paths, 64))
    assert not np.allclose(actual, untrained, atol=1e-3)  # its own weights


def test_when_the_tracer_fails_the_torch_export_based_exporter_makes_the_model(tiny_model, tmp_path, caplog, monkeypatch):  # noqa: F811
    """PyTorch marks the TorchScript exporter legacy: a tracer that raises (or is gone) costs the other exporter's time, nothing else."""
    import components.deploy.export as export

    def gone(*_args, **_kwargs):
        raise RuntimeError("the TorchScript-based exporter was removed")

    monkeypatch.setattr(export, "torchscript_trace", gone)
    model = _trained_backbone(tiny_model)
    paths = [s.path for s in tiny_model.split.val[:8]]
    with caplog.at_level(logging.WARNING, logger="components.deploy.export"):
        result = export_and_verify(model, tmp_path / "model.onnx", 64, 18, META, paths, 1e-4, template_dir=tmp_path / "templates")
    assert "TorchScript tracer failed (RuntimeError: the TorchScript-based exporter was removed)" in caplog.text
    assert "torch.export-based exporter" in caplog.text
    assert result.made == "fresh" and result.top1_agreement == 1.0 and result.max_abs_diff <= 1e-4
    assert (tmp_path / "templates").is_dir()  # the next export of this architecture fills the template
