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
from components.core.errors import DiskFullError, ExportError, IntegrityError
from components.core.files import atomic_write, cached_sha256
from components.runtime.trust import read_sidecar, sidecar_path, write_sidecar

log = logging.getLogger(__name__)

EXPORT_LOCK = threading.Lock()
"""torch.export keeps global state: one export at a time per process (mapped choose tasks run in threads)."""


def _export_program(model: torch.nn.Module, image_size: int, output_name: str, opset: int, optimize: bool):  # noqa: ANN202 - torch.onnx.ONNXProgram
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    # the exporter prints progress to stdout; keep it in the debug log instead. Traced without autograd:
    # the same ONNX file, byte for byte, 8-14% sooner (EfficientNet-Lite0 at 112 px on 2 cores: 7.3-7.4 s against 7.9-8.6)
    with EXPORT_LOCK, contextlib.redirect_stdout(io.StringIO()) as chatter, torch.no_grad():
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
    try:
        with atomic_write(path, ".onnx") as tmp:
            onnx.save_model(program.model_proto, str(tmp))
    except (OSError, DiskFullError) as exc:  # the template only saves time later; the export itself goes on
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


def backbone_onnx_path(cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int, opset: int) -> Path:
    """Where the exported backbone lives: the feature cache's key and the opset (`deploy.opset`: the deployed model
    is composed from this graph, so another opset is another file), `.onnx`."""
    return Path(cache_dir) / "onnx" / f"{cache_key(spec, image_size, seed)}-opset{opset}.onnx"


def cached_backbone_onnx(cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int, opset: int) -> Path | None:
    """The backbone's exported graph (`backbone_onnx_path`) when the cache holds it as it was written, else None."""
    path = backbone_onnx_path(cache_dir, spec, image_size, seed, opset)
    return path if path.is_file() and unchanged_since_export(path) else None


def unchanged_since_export(path: Path) -> bool:
    """Whether the exported graph at `path` is the file that was written: the sha256 in its sidecar (a graph exported
    before sidecars gets one now). A changed, cut or damaged file is deleted, so that it is exported again rather than
    scored, cut for the trunk or composed into the deployed model."""
    try:
        recorded = read_sidecar(path)
    except IntegrityError:
        recorded = "unreadable"
    if recorded is None:
        write_sidecar(path)
        return True
    if cached_sha256(path) == recorded:
        return True
    log.warning("%s changed since it was exported (its sha256 is not the one recorded beside it); exporting it again", path)
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)
    return False


def exported_extractor(cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int, opset: int) -> OnnxFeatures | None:
    """The backbone's cached exported graph as a feature extractor; None when it is not cached.

    It is the graph the choose stage scored with and the deploy stage serves a `feature_extraction`
    model with, so features computed with it are the served model's. onnxruntime computes them
    several times faster than eager PyTorch on a CPU.
    """
    path = cached_backbone_onnx(cache_dir, spec, image_size, seed, opset)
    return OnnxFeatures(path) if path is not None else None


def torchscript_trace(model: nn.Module, image_size: int, output_name: str, opset: int) -> onnx.ModelProto:
    """Export `model` (uint8 N x S x S x 3 -> `output_name`, batch axis dynamic) with PyTorch's TorchScript-based tracer.

    Raises:
        Whatever the tracer raises (it raises many types).
    """
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    with EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), buffer, dynamo=False, input_names=["images"], output_names=[output_name],
            dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def quick_trace_to_onnx(model: nn.Module, image_size: int, output_name: str, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript-based tracer, falling back to the torch.export-based exporter.

    The tracer takes well under a second for an EfficientNet-Lite on 2 cores where the torch.export-based
    exporter takes 5-6 s (20-40 s in older PyTorch releases), which made exports most of the choose
    stage's cost. PyTorch marks the tracer as legacy; when it is gone or fails on a backbone, the other
    exporter runs instead.
    """
    try:
        return torchscript_trace(model, image_size, output_name, opset)
    except Exception as exc:  # noqa: BLE001 - the tracer raises many types; the other exporter decides
        log.info("TorchScript tracer failed (%s: %s); using the torch.export-based exporter", exc.__class__.__name__, exc)
        return trace_to_onnx(model, image_size, output_name, opset)


def tidy_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` after onnxruntime's basic graph optimisations, when they leave plain ONNX; else `proto` unchanged.

    The tracer writes padding, shapes and constants as the Python code computed them (an
    EfficientNet-Lite comes out with about 450 nodes, 221 of them Constant and 17 Pad with their own
    shape arithmetic). onnxruntime's basic level (constant folding, redundant-node elimination, Conv +
    Pad / BatchNorm / Add / Mul fusion) is semantics-preserving, hardware-independent and runs for every
    execution provider; saved offline it leaves the graph a person reads in Netron and every runtime loads:
    the same nodes as the torch.export-based exporter's optimised graph (99 for that network), the same
    outputs. The result is used only if every node is a standard ONNX operator and the inputs and outputs
    are unchanged; the deploy stage's parity gate checks it against PyTorch either way.
    """
    import tempfile

    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory(prefix="graft-tidy-") as tmp:
            target = Path(tmp) / "tidy.onnx"
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.optimized_model_filepath = str(target)
            ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
            tidy = onnx.load(str(target))
    except Exception as exc:  # noqa: BLE001 - tidying is optional: the untidy graph computes the same
        log.info("onnxruntime could not tidy the graph (%s: %s); keeping it as exported", exc.__class__.__name__, exc)
        return proto
    foreign = sorted({node.domain for node in tidy.graph.node if node.domain not in ("", "ai.onnx")})

    def ends(model: onnx.ModelProto) -> list[str]:
        return [str(value) for value in (*model.graph.input, *model.graph.output)]

    if foreign or ends(tidy) != ends(proto):
        log.info("onnxruntime's tidied graph %s; keeping the graph as exported",
                 f"uses {', '.join(foreign)} operators" if foreign else "changed the inputs or outputs")
        return proto
    kept = [entry for entry in tidy.opset_import if entry.domain in ("", "ai.onnx")]  # onnxruntime lists every domain it knows
    del tidy.opset_import[:]
    tidy.opset_import.extend(kept)
    del tidy.metadata_props[:]
    tidy.metadata_props.extend(proto.metadata_props)
    tidy.producer_name, tidy.producer_version = proto.producer_name, proto.producer_version
    return tidy


def export_backbone(backbone: nn.Module, spec: BackboneSpec, image_size: int, path: Path, opset: int) -> Path:
    """Export images -> features with a dynamic batch axis, check it, and write it atomically.

    Raises:
        ExportError: the exporter or `onnx.checker` failed; the backbone cannot be deployed as it is.
    """
    model = _ImagesToFeatures(backbone, spec).eval()
    started = time.perf_counter()
    try:
        with atomic_write(path, ".onnx") as tmp:  # this process's own temporary file: two runs may share the cache
            proto = quick_trace_to_onnx(model, image_size, "features", opset)
            proto.producer_name = "graft-choose"
            onnx.save_model(proto, tmp)
            onnx.checker.check_model(str(tmp), full_check=True)
    except DiskFullError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter and checker raise many types
        raise ExportError(f"{spec.name}: ONNX export failed ({exc.__class__.__name__}: {str(exc)[:300]})") from exc
    write_sidecar(path)  # what `unchanged_since_export` checks the file against
    log.info("%s: exported to %s (%.1f MB) in %.1fs", spec.name, path.name, size_mb(path), time.perf_counter() - started)
    return path


def size_mb(path: Path) -> float:
    """File size in MB (10^6 bytes)."""
    return path.stat().st_size / 1e6
