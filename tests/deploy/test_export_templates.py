"""The torch.export-based ONNX exporter (`deploy.exporter: dynamo`) runs once per architecture: later exports fill its
graph template with their own weights."""

import copy
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from components.backbones.classifier import GraftClassifier
from components.backbones.export import graph_key, template_path, trace_to_onnx
from components.data.images import load_batch
from components.deploy.export import export_and_verify, export_onnx
from components.runtime.model import OnnxClassifier
from tests.deploy.fixtures import tiny_model  # noqa: F401

META = {"classes": ["0", "1", "7"], "image_size": 64}
TEXT_META = {"classes": '["0", "1", "7"]', "image_size": "64"}


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    other = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        other.temperature.fill_(1.3)
    return other


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def test_a_second_export_of_an_architecture_comes_from_its_template_and_equals_a_fresh_export(tiny_model, tmp_path):  # noqa: F811
    """The first torch.export-based export made the template; a model of the same architecture with other weights is built from it."""
    template_dir = tmp_path / "templates"
    assert export_onnx(tiny_model.model, tmp_path / "first.onnx", 64, 18, TEXT_META, template_dir, exporter="dynamo") == "fresh"
    model = _perturbed(tiny_model.model, seed=1)
    assert template_path(model, 64, "probabilities", 18, template_dir).is_file()

    assert export_onnx(model, tmp_path / "from-template.onnx", 64, 18, TEXT_META, template_dir, exporter="dynamo") == "template"
    via_template = onnx.load(str(tmp_path / "from-template.onnx"))
    fresh = trace_to_onnx(model, 64, "probabilities", 18)

    assert [node.op_type for node in via_template.graph.node] == [node.op_type for node in fresh.graph.node]
    assert [node.input[1:] for node in via_template.graph.node] == [node.input[1:] for node in fresh.graph.node]
    ours, theirs = _initializers(via_template), _initializers(fresh)
    assert ours.keys() == theirs.keys()
    for name in theirs:  # BatchNorm folded into the convolutions from these weights, not the template's
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert via_template.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    images = load_batch([s.path for s in tiny_model.split.val], 64)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    actual = OnnxClassifier(tmp_path / "from-template.onnx").predict_proba(images)
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert not np.allclose(actual, OnnxClassifier(tmp_path / "first.onnx").predict_proba(images), atol=1e-3)  # not the template's weights


def _small_classifier(seed: int) -> GraftClassifier:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = GraftClassifier(backbone, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    with torch.no_grad():
        backbone[1].running_mean.uniform_(-0.1, 0.1)
        backbone[1].running_var.uniform_(0.5, 1.5)
    return model


def test_a_template_that_does_not_fit_is_replaced_by_a_fresh_export(digits_dir, tmp_path, caplog):
    templates = tmp_path / "templates"
    model = _small_classifier(0)
    template = template_path(model, 64, "probabilities", 18, templates)

    assert export_onnx(model, tmp_path / "a.onnx", 64, 18, {}, templates, exporter="dynamo") == "fresh"
    assert template.is_file() and [p.name for p in templates.iterdir()] == [template.name]

    template.write_bytes(b"not an onnx file")  # a broken or half-written template costs a fresh export, nothing else
    with caplog.at_level(logging.WARNING, logger="components.backbones.export"):
        assert export_onnx(model, tmp_path / "b.onnx", 64, 18, {}, templates, exporter="dynamo") == "fresh"
    assert "does not fit" in caplog.text and "exporting afresh" in caplog.text
    onnx.checker.check_model(onnx.load(str(template)), full_check=True)  # replaced by a good one

    other = _small_classifier(1)
    assert export_onnx(other, tmp_path / "c.onnx", 64, 18, {}, templates, exporter="dynamo") == "template"
    bigger = GraftClassifier(other.backbone, 8, 5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()  # another head: another key
    assert export_onnx(bigger, tmp_path / "d.onnx", 64, 18, {}, templates, exporter="dynamo") == "fresh" and len(list(templates.iterdir())) == 2


def test_a_model_from_a_template_that_fails_parity_is_exported_afresh_before_the_gate_decides(digits_dir, tmp_path, caplog):
    """A template whose graph computes something else (its weights fit) cannot reach the registry."""
    templates = tmp_path / "templates"
    model = _small_classifier(0)
    export_onnx(model, tmp_path / "first.onnx", 64, 18, {}, templates, exporter="dynamo")
    template = template_path(model, 64, "probabilities", 18, templates)
    proto = onnx.load(str(template))
    (relu,) = [node for node in proto.graph.node if node.op_type == "Relu"]
    relu.op_type = "Sigmoid"  # same weights, another function
    onnx.save(proto, str(template))

    paths = sorted(digits_dir.rglob("*.png"))[:8]
    with caplog.at_level(logging.WARNING, logger="components.deploy.export"):
        result = export_and_verify(_small_classifier(1), tmp_path / "model.onnx", 64, 18, META, paths, 1e-5, template_dir=templates,
                                   exporter="dynamo")
    assert "failed parity" in caplog.text and "exporting afresh" in caplog.text
    assert result.max_abs_diff <= 1e-5 and result.top1_agreement == 1.0
    assert not template.exists()  # dropped: the next export makes a good one
    assert {node.op_type for node in onnx.load(str(result.onnx_path)).graph.node} >= {"Relu"}


@pytest.mark.parametrize("change", ["image_size", "opset", "module"])
def test_the_template_key_changes_with_what_shapes_the_graph(change):
    model = _small_classifier(0)
    base = graph_key(model, 64, "probabilities", 18)
    assert graph_key(_small_classifier(5), 64, "probabilities", 18) == base  # weights alone do not change it
    if change == "image_size":
        assert graph_key(model, 96, "probabilities", 18) != base
    elif change == "opset":
        assert graph_key(model, 64, "probabilities", 17) != base
    else:
        model.backbone[2] = nn.ReLU6()  # no weights differ, the function does
        assert graph_key(model, 64, "probabilities", 18) != base


def test_the_projects_on_one_machine_share_the_graph_templates(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """By default the templates live in the user's cache: a new project's first export of an architecture another
    project exported already comes from its template. A folder of your own (relative to the params file) also works."""
    from components.core.config import load_params
    from tests.conftest import REPO

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))

    def project(folder: str, *extra: str):
        return load_params(REPO / "params.yaml", [f"data.cache_dir={tmp_path / folder}", "deploy.exporter=dynamo", *extra])

    first, second = project("first"), project("second")
    assert first.deploy.template_dir == second.deploy.template_dir == tmp_path / "user-cache" / "graft" / "onnx-graphs"
    for params, seed, made in ((first, 3, "fresh"), (second, 4, "template")):
        assert export_onnx(_perturbed(tiny_model.model, seed=seed), tmp_path / f"{seed}.onnx", 64, 18, TEXT_META,
                           params.deploy.template_dir, exporter=params.deploy.exporter) == made
    assert project("third", "deploy.graph_template_dir=graphs").deploy.template_dir == REPO / "graphs"
