"""Backbones to ONNX: the exporters every export goes through, and a candidate backbone's own export.

Each candidate backbone is exported once (uint8 N x S x S x 3 images in,
pooled features out, preprocessing inside the graph, as the deployed model
will be) and the file is cached beside its features, under the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from components.backbones.classifier import Preprocess
from components.backbones.features import OnnxFeatures, cache_key
from components.backbones.spec import BackboneSpec
from components.core.errors import ExportError

log = logging.getLogger(__name__)

EXPORT_LOCK = threading.Lock()
"""torch.export keeps global state: one export at a time per process (mapped choose tasks run in threads)."""


def _export_program(model: torch.nn.Module, image_size: int, output_name: str, opset: int, optimize: bool):  # noqa: ANN202 - torch.onnx.ONNXProgram
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    # the exporter prints progress to stdout; keep it in the debug log instead
    with EXPORT_LOCK, contextlib.redirect_stdout(io.StringIO()) as chatter:
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=[output_name],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            opset_version=opset,
            external_data=False,
            optimize=optimize,
            verbose=False,
        )
    log.debug("exporter: %s", chatter.getvalue())
    return program


def _named_batch_axis(proto: onnx.ModelProto) -> onnx.ModelProto:
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def trace_to_onnx(model: torch.nn.Module, image_size: int, output_name: str, opset: int) -> onnx.ModelProto:
    """Export `model` (uint8 N x S x S x 3 -> `output_name`) with the torch.export-based exporter, batch axis dynamic."""
    return _named_batch_axis(_export_program(model, image_size, output_name, opset, optimize=True).model_proto)


GRAPH_TEMPLATE_VERSION = 1
"""Part of every graph template's key: raise it when what a template holds changes."""


def graph_key(model: torch.nn.Module, image_size: int, output_name: str, opset: int) -> str:
    """What decides the exported graph apart from the weights' values: the module tree, every parameter and
    buffer's name, shape and dtype, the input size, the output name, the opset and the exporter's versions."""
    import onnx_ir
    import onnxscript

    parts = [
        GRAPH_TEMPLATE_VERSION, torch.__version__, onnxscript.__version__, onnx_ir.__version__, onnx.__version__,
        image_size, output_name, opset,
        [(name, f"{type(module).__module__}.{type(module).__qualname__}") for name, module in model.named_modules()],
        [(name, list(value.shape), str(value.dtype)) for name, value in model.state_dict().items()],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def template_path(model: torch.nn.Module, image_size: int, output_name: str, opset: int, template_dir: Path) -> Path:
    """Where the graph template of `model`'s architecture lives in `template_dir`."""
    return Path(template_dir) / f"{graph_key(model, image_size, output_name, opset)}.onnx"


def trace_with_template(
    model: torch.nn.Module, image_size: int, output_name: str, opset: int, template_dir: Path
) -> tuple[onnx.ModelProto, str]:
    """`trace_to_onnx`, with the exporter run once per architecture.

    The torch.export-based exporter spends seconds tracing and decomposing a model whose graph
    depends only on its architecture. Unoptimised, its graph holds every parameter and buffer as
    an initializer named after it, unchanged; that graph is kept in `template_dir` under
    `graph_key`. The next export of the same architecture loads it, puts this model's weights into
    the initializers, and runs the exporter's own optimiser (which folds BatchNorm into the
    convolutions) as the exporter would: the same nodes and the same weights as a fresh export,
    in about a tenth of the time. A template that does not fit (an initializer the model lacks, a
    shape or dtype that differs, an unreadable file) is replaced by a fresh export.

    Returns:
        The model, and "template" or "fresh" (how it was made).
    """
    path = template_path(model, image_size, output_name, opset, template_dir)
    weights = {name: value.detach().cpu().numpy() for name, value in model.state_dict().items()}
    if path.exists():
        try:
            return _from_template(onnx.load(str(path)), weights), "template"
        except Exception as exc:  # noqa: BLE001 - a bad template only costs a fresh export
            log.warning("ONNX graph template %s does not fit (%s); exporting afresh", path, exc)
    program = _export_program(model, image_size, output_name, opset, optimize=False)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(program.model_proto, str(tmp))
        tmp.replace(path)
    except OSError as exc:  # the template only saves time later; the export itself goes on
        tmp.unlink(missing_ok=True)
        log.warning("could not keep the ONNX graph template %s (%s); the next export of this architecture runs the exporter again", path, exc)
    program.optimize()
    return _named_batch_axis(program.model_proto), "fresh"


def _from_template(template: onnx.ModelProto, weights: dict[str, object]) -> onnx.ModelProto:
    """The template's graph with `weights` in its initializers, optimised as the exporter optimises."""
    import onnx_ir

    model = onnx_ir.serde.deserialize_model(template)
    for name, value in model.graph.initializers.items():
        if name not in weights:
            raise ValueError(f"initializer {name} is not a parameter or buffer of the model")
        array = weights[name]
        old = value.const_value
        if tuple(old.shape) != tuple(array.shape) or old.dtype != onnx_ir.DataType.from_numpy(array.dtype):
            raise ValueError(f"{name}: {tuple(old.shape)} {old.dtype} in the template, {tuple(array.shape)} {array.dtype} in the model")
        value.const_value = onnx_ir.tensor(array.copy(), name=name)
    program = torch.onnx.ONNXProgram(model, None)
    program.optimize()
    return _named_batch_axis(program.model_proto)


class _ImagesToFeatures(nn.Module):
    """uint8 N x S x S x 3 -> normalised N x 3 x S x S -> backbone features."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.preprocess = Preprocess(spec.mean, spec.std)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images))


def backbone_onnx_path(cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int) -> Path:
    """Where the exported backbone lives: the feature cache's key, `.onnx`."""
    return Path(cache_dir) / "onnx" / f"{cache_key(spec, image_size, seed)}.onnx"


def cached_backbone_onnx(cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int) -> Path | None:
    """The backbone's exported graph (`backbone_onnx_path`) when the cache holds it, else None."""
    path = backbone_onnx_path(cache_dir, spec, image_size, seed)
    return path if path.is_file() else None


def exported_extractor(cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int) -> OnnxFeatures | None:
    """The backbone's cached exported graph as a feature extractor; None when it is not cached.

    It is the graph the choose stage scored with and the deploy stage serves a `feature_extraction`
    model with, so features computed with it are the served model's. onnxruntime computes them
    several times faster than eager PyTorch on a CPU.
    """
    path = cached_backbone_onnx(cache_dir, spec, image_size, seed)
    return OnnxFeatures(path) if path is not None else None


def quick_trace_to_onnx(model: nn.Module, image_size: int, output_name: str, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript-based tracer, falling back to the torch.export-based exporter.

    A candidate's export only serves to measure its size and latency on onnxruntime and to
    extract the choose sample's features, and onnxruntime optimises both graphs alike at
    load. The tracer takes ~4 s for an EfficientNet-Lite where the torch.export-based
    exporter takes 20-40 s on 2 cores, which made exports most of the choose stage's cost.
    The model Graft deploys is always exported with the torch.export-based exporter
    (`components.deploy.export.export_onnx`). PyTorch marks the tracer as legacy; when it is gone
    or fails on a backbone, the other exporter runs instead.
    """
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (example,), buffer, dynamo=False, input_names=["images"], output_names=[output_name],
                dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset,
            )
        return onnx.load_model_from_string(buffer.getvalue())
    except Exception as exc:  # noqa: BLE001 - the tracer raises many types; the other exporter decides
        log.info("TorchScript tracer failed (%s: %s); using the torch.export-based exporter", exc.__class__.__name__, exc)
        return trace_to_onnx(model, image_size, output_name, opset)


def export_backbone(backbone: nn.Module, spec: BackboneSpec, image_size: int, path: Path, opset: int) -> Path:
    """Export images -> features with a dynamic batch axis, check it, and write it atomically.

    Raises:
        ExportError: the exporter or `onnx.checker` failed; the backbone cannot be deployed as it is.
    """
    model = _ImagesToFeatures(backbone, spec).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.onnx")  # two runs may share the cache
    started = time.perf_counter()
    try:
        proto = quick_trace_to_onnx(model, image_size, "features", opset)
        proto.producer_name = "graft-choose"
        onnx.save_model(proto, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the exporter and checker raise many types
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{spec.name}: ONNX export failed ({exc.__class__.__name__}: {str(exc)[:300]})") from exc
    tmp.replace(path)
    log.info("%s: exported to %s (%.1f MB) in %.1fs", spec.name, path.name, size_mb(path), time.perf_counter() - started)
    return path


def size_mb(path: Path) -> float:
    """File size in MB (10^6 bytes)."""
    return path.stat().st_size / 1e6
