"""A model whose backbone never trained is deployed as the choose stage's backbone graph plus its head, without the exporter."""

import copy
import logging

import numpy as np
import onnx
import pytest
import torch

from components.backbones.export import export_backbone
from components.backbones.zoo import get_spec
from components.data.images import load_batch
from components.deploy.export import HEAD_NODES, export_and_verify
from tests.deploy.fixtures import served_like_pytorch, tiny_model  # noqa: F401

META = {"classes": ["0", "1", "7"], "image_size": 64}


@pytest.fixture
def backbone_graph(tiny_model, tmp_path):  # noqa: F811
    """The tiny model's backbone exported as the choose stage exports every candidate (images -> features)."""
    spec = get_spec("efficientnet_lite0")
    return export_backbone(copy.deepcopy(tiny_model.model.backbone), spec, 64, tmp_path / "backbone.onnx", 18)


def _calibrated(tiny_model):  # noqa: F811
    model = copy.deepcopy(tiny_model.model).eval()
    model.temperature.fill_(1.7)  # the evaluate stage's temperature ships inside the graph
    return model


def test_an_untrained_backbone_model_is_the_backbone_graph_and_its_head_and_matches_pytorch(tiny_model, backbone_graph, tmp_path, caplog):  # noqa: F811
    model = _calibrated(tiny_model)
    paths = [s.path for s in tiny_model.split.val]
    templates = tmp_path / "templates"
    with caplog.at_level(logging.INFO, logger="components.deploy.export"):
        result = export_and_verify(model, tmp_path / "model.onnx", 64, 18, META, paths, 1e-4, template_dir=templates, backbone_onnx=backbone_graph)
    assert "composed from the backbone's exported graph and the head" in caplog.text and result.made == "composed"
    assert not templates.exists()  # the exporter never ran

    proto = onnx.load(str(result.onnx_path))
    assert tuple(node.name for node in proto.graph.node[-3:]) == HEAD_NODES
    served = served_like_pytorch(result.onnx_path, model, paths)
    assert result.top1_agreement == 1.0
    images = load_batch(paths, 64)
    flat = copy.deepcopy(model)
    flat.temperature.fill_(1.0)
    with torch.no_grad():
        assert not np.allclose(served, flat(torch.from_numpy(images)).numpy(), atol=1e-3)  # the temperature is in the graph


def test_a_backbone_graph_that_does_not_fit_costs_an_export_and_nothing_else(tiny_model, backbone_graph, tmp_path, caplog):  # noqa: F811
    model = _calibrated(tiny_model)
    paths = [s.path for s in tiny_model.split.val[:8]]
    wrong_opset = tmp_path / "older.onnx"
    export_backbone(copy.deepcopy(model.backbone), get_spec("efficientnet_lite0"), 64, wrong_opset, 17)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    for graph, why in ((wrong_opset, "the deployed model must be opset 18"), (broken, "")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="components.deploy.export"):
            result = export_and_verify(model, tmp_path / f"{graph.stem}-model.onnx", 64, 18, META, paths, 1e-4,
                                       template_dir=tiny_model.params.deploy.template_dir, backbone_onnx=graph)
        assert "could not compose the model" in caplog.text and why in caplog.text
        assert "composed" not in caplog.records[-1].getMessage() and result.made == "traced"
        assert not any(node.name in HEAD_NODES for node in onnx.load(str(result.onnx_path)).graph.node)
        assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0


def test_a_composed_model_whose_backbone_differs_fails_parity_and_is_exported_afresh(tiny_model, backbone_graph, tmp_path, caplog):  # noqa: F811
    """A backbone graph from other weights (a trained backbone, a stale file) never reaches the registry."""
    model = _calibrated(tiny_model)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.mul_(1.05)
    paths = [s.path for s in tiny_model.split.val[:8]]
    with caplog.at_level(logging.WARNING, logger="components.deploy.export"):
        result = export_and_verify(model, tmp_path / "model.onnx", 64, 18, META, paths, 1e-5, backbone_onnx=backbone_graph)
    assert "composed from the backbone's exported graph and the head failed parity" in caplog.text and "exporting afresh" in caplog.text
    assert result.max_abs_diff <= 1e-5 and result.top1_agreement == 1.0 and result.made == "fresh"
    assert not any(node.name in HEAD_NODES for node in onnx.load(str(result.onnx_path)).graph.node)
