"""The deployed model's ONNX export: one function exports, runs the full checker, and proves parity with PyTorch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import torch

from components.backbones.classifier import GraftClassifier
from components.backbones.export import template_path, tidy_onnx, torchscript_trace, trace_to_onnx, trace_with_template
from components.core.config import Exporter
from components.core.errors import ExportError
from components.core.files import atomic_write, cached_sha256, remove_orphan_temps
from components.data.images import load_batch
from components.runtime.model import OnnxClassifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """The exported file and its parity evidence."""

    onnx_path: Path
    sha256: str
    opset: int
    max_abs_diff: float
    top1_agreement: float
    parity_images: int
    seconds: float
    made: str = "fresh"
    """How the graph was made: "composed", "traced", "template" or "fresh" (`HOW_MADE`)."""

    @property
    def how_made(self) -> str:
        """`made` in words, for the model card and the logs."""
        return HOW_MADE.get(self.made, self.made)


HOW_MADE = {
    "composed": "composed from the backbone's exported graph and the head",
    "traced": "traced with PyTorch's TorchScript exporter, tidied by onnxruntime's basic optimiser",
    "template": "the graph from this architecture's template (torch.export-based exporter)",
    "fresh": "exported afresh (torch.export-based exporter)",
}


EXPORTERS = get_args(Exporter)
"""`deploy.exporter`: PyTorch's TorchScript-based tracer (tidied, `components.backbones.export.tidy_onnx`) or its
torch.export-based exporter (`dynamo=True`, once per architecture through the graph templates)."""


REQUIRED_METADATA = ("classes", "image_size")
"""Keys a consumer cannot work without; export refuses a model that lacks them."""


DESCRIPTIVE_METADATA = ("mean", "std", "backbone", "data_md5")
"""Keys that say what the model is; Graft's deploy stage always writes them."""


HEAD_NODES = ("graft_head/Gemm", "graft_head/Div", "graft_head/Softmax")
"""The nodes `compose_classifier` appends to a backbone's graph."""


def compose_classifier(backbone_onnx: Path, model: GraftClassifier, opset: int) -> onnx.ModelProto:
    """`model` as ONNX from its backbone's exported graph (uint8 images -> `features`) and its head, without the exporter.

    When the backbone was never trained (`feature_extraction`), the deployed network is the backbone the choose
    stage exported, with preprocessing inside, followed by the head: Gemm with the head's weights, division by the
    temperature, softmax. Appending those three nodes takes milliseconds where the exporter takes seconds, and the
    served model computes exactly the features the head was trained on. The caller still proves parity with
    `model` in PyTorch (`check_parity`).

    Raises:
        ValueError: the file is not a backbone graph this can extend (other input or output, another opset, a
        name the head would reuse).
    """
    proto = onnx.load(str(backbone_onnx))
    graph = proto.graph
    inputs = [value.name for value in graph.input if value.name not in {init.name for init in graph.initializer}]
    if inputs != ["images"] or [value.name for value in graph.output] != ["features"]:
        raise ValueError(f"{backbone_onnx.name} maps {inputs} to {[v.name for v in graph.output]}, not images to features")
    versions = {entry.domain: entry.version for entry in proto.opset_import}
    found = versions.get("", versions.get("ai.onnx"))
    if found != opset:
        raise ValueError(f"{backbone_onnx.name} is opset {found}, the deployed model must be opset {opset} (deploy.opset)")
    weight = model.head.weight.detach().cpu().numpy().astype(np.float32)
    bias = model.head.bias.detach().cpu().numpy().astype(np.float32)
    if weight.shape[1] != graph.output[0].type.tensor_type.shape.dim[1].dim_value:
        raise ValueError(f"{backbone_onnx.name} gives {graph.output[0].type.tensor_type.shape.dim[1].dim_value} features, the head takes {weight.shape[1]}")
    added = {"graft_head.weight": weight, "graft_head.bias": bias,
             "graft_head.temperature": np.array(float(model.temperature), dtype=np.float32)}
    taken = {init.name for init in graph.initializer} | {out for node in graph.node for out in node.output}
    clash = taken & {*added, "graft_head/logits", "graft_head/scaled", "probabilities"}
    if clash:
        raise ValueError(f"{backbone_onnx.name} already names {sorted(clash)}")
    graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in added.items())
    gemm, div, softmax = HEAD_NODES
    graph.node.extend([
        onnx.helper.make_node("Gemm", ["features", "graft_head.weight", "graft_head.bias"], ["graft_head/logits"], name=gemm, transB=1),
        onnx.helper.make_node("Div", ["graft_head/logits", "graft_head.temperature"], ["graft_head/scaled"], name=div),
        onnx.helper.make_node("Softmax", ["graft_head/scaled"], ["probabilities"], name=softmax, axis=1),
    ])
    graph.value_info.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", weight.shape[1]]))
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", weight.shape[0]]))
    del proto.metadata_props[:]
    return proto


def export_onnx(model: GraftClassifier, path: Path, image_size: int, opset: int, metadata: dict[str, str],
                template_dir: Path | None = None, backbone_onnx: Path | None = None, exporter: Exporter = "torchscript") -> str:
    """Export `model` (uint8 N x S x S x 3 -> probabilities) with a dynamic batch axis, then check it.

    With `backbone_onnx` (the graph of `model`'s untrained backbone), the model is composed from it
    (`compose_classifier`). Otherwise, or should that fail, `exporter` runs: "torchscript", PyTorch's
    TorchScript-based tracer, its graph tidied by onnxruntime's basic optimiser (under a second for an
    EfficientNet-Lite on 2 cores); "dynamo", the torch.export-based exporter (5-6 s), once per architecture
    with `template_dir` (`components.backbones.export.trace_with_template`). Should the tracer fail (PyTorch
    marks it legacy), the torch.export-based exporter runs instead.

    Returns:
        How the graph was made: "composed", "traced", "fresh", or "template" (this architecture's graph,
        exported before, with these weights).
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown deploy.exporter '{exporter}'; choose from {', '.join(EXPORTERS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)  # a model file is large: a killed export's copy is not left to pile up
    proto = None
    if backbone_onnx is not None:
        try:
            proto, how = tidy_onnx(compose_classifier(backbone_onnx, model, opset)), "composed"
        except Exception as exc:  # noqa: BLE001 - an unreadable or unfit graph only costs an export
            log.warning("could not compose the model from the backbone's graph %s (%s); exporting it", backbone_onnx, exc)
    if proto is None and exporter == "torchscript":
        try:
            proto, how = tidy_onnx(torchscript_trace(model, image_size, "probabilities", opset)), "traced"
        except Exception as exc:  # noqa: BLE001 - the tracer raises many types; the other exporter decides
            log.warning("PyTorch's TorchScript tracer failed (%s: %s); using the torch.export-based exporter",
                        exc.__class__.__name__, str(exc)[:300])
    if proto is None:
        try:
            if template_dir is None:
                proto, how = trace_to_onnx(model, image_size, "probabilities", opset), "fresh"
            else:
                proto, how = trace_with_template(model, image_size, "probabilities", opset, template_dir)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"torch.onnx.export failed ({exc}); try another deploy.opset or backbone") from exc
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "graft"
    try:
        with atomic_write(path) as tmp:  # checked before it replaces the model there
            onnx.save_model(proto, tmp)
            onnx.checker.check_model(str(tmp), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:  # full_check's shape inference raises the second
        raise ExportError(f"onnx.checker rejected the exported model ({exc.__class__.__name__}: {exc}); try another "
                          "deploy.opset or deploy.exporter") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return how


def check_parity(model: GraftClassifier, onnx_path: Path, images: np.ndarray, atol: float) -> tuple[float, float]:
    """Compare onnxruntime with PyTorch on real images.

    Returns:
        (max |p_onnx - p_torch|, top-1 agreement).

    Raises:
        ExportError: when the difference exceeds `atol` or any top-1 label differs.
    """
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    actual = OnnxClassifier(onnx_path, ["CPUExecutionProvider"]).predict_proba(images)
    max_diff = float(np.abs(actual - expected).max())
    agreement = float((actual.argmax(1) == expected.argmax(1)).mean())
    if max_diff > atol or agreement < 1.0:
        raise ExportError(
            f"ONNX parity failed on {len(images)} validation images: max |diff| {max_diff:.2e} "
            f"(limit deploy.parity_atol={atol:g}, {max_diff / atol:.1f}x over), top-1 agreement {agreement:.2%} "
            "(must be 100%); the model was not registered"
        )
    return max_diff, agreement


def export_and_verify(
    model: GraftClassifier,
    path: Path,
    image_size: int,
    opset: int,
    metadata: dict[str, object],
    parity_sources: list[Path],
    atol: float,
    template_dir: Path | None = None,
    backbone_onnx: Path | None = None,
    exporter: Exporter = "torchscript",
) -> ExportResult:
    """Export (`export_onnx`), check with `onnx.checker` (full), and pass the parity gate on `parity_sources`.

    With `backbone_onnx`, the graph is composed from the untrained backbone's graph and the head; otherwise
    `exporter` makes it, from this architecture's template in `template_dir` when the torch.export-based
    exporter runs and there is one. Should a composed, traced or templated model ever fail the parity gate,
    the template is dropped and the model exported afresh with the torch.export-based exporter before the
    gate decides."""
    started = time.perf_counter()
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ExportError(f"ONNX metadata lacks {', '.join(missing)}; consumers need them to label and size images")
    undescribed = [key for key in DESCRIPTIVE_METADATA if key not in metadata]
    if undescribed:
        log.warning("ONNX metadata lacks %s; the model will not say what it is", ", ".join(undescribed))
    text_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    how = export_onnx(model, path, image_size, opset, text_meta, template_dir, backbone_onnx, exporter)
    images = load_batch(parity_sources, image_size)
    try:
        max_diff, agreement = check_parity(model, path, images, atol)
    except ExportError as exc:
        if how == "fresh":
            raise
        log.warning("the model %s failed parity (%s); exporting afresh", HOW_MADE[how], exc)
        if how == "template":
            template_path(model, image_size, "probabilities", opset, template_dir).unlink(missing_ok=True)
        how = export_onnx(model, path, image_size, opset, text_meta, exporter="dynamo")
        max_diff, agreement = check_parity(model, path, images, atol)
    log.info("ONNX parity on %d images: max |diff| %.2e, top-1 agreement %.0f%% (%s)", len(images), max_diff, agreement * 100,
             HOW_MADE[how])
    # cached: the variants' build cache keys on the same digest in this process
    return ExportResult(path, cached_sha256(path), opset, max_diff, agreement, len(images), time.perf_counter() - started, how)
