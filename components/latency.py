"""Candidate backbones on the deployment runtime: ONNX export, size, latency, fast features.

Each candidate backbone is exported once (uint8 N x S x S x 3 images in,
pooled features out, preprocessing inside the graph, as the deployed model
will be) and the file is cached beside its features, under the same key. The
file's size is the model-size constraint, onnxruntime's time per image at
batch 1 and at the serving batch is the latency constraint, and the same
session extracts the choose sample's features faster than eager PyTorch.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from components.errors import ExportError
from components.export import _EXPORT_LOCK, trace_to_onnx
from components.features import cache_key
from components.model import Preprocess
from components.zoo import BackboneSpec

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Latency:
    """Median onnxruntime time per image, in milliseconds."""

    batch1_ms: float
    batch_ms: float
    """Per image at `batch_size`."""
    batch_size: int
    provider: str

    @property
    def worst_ms(self) -> float:
        """The figure a latency limit is checked against."""
        return max(self.batch1_ms, self.batch_ms)


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


def quick_trace_to_onnx(model: nn.Module, image_size: int, output_name: str, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript-based tracer, falling back to the torch.export-based exporter.

    A candidate's export only serves to measure its size and latency on onnxruntime and to
    extract the choose sample's features, and onnxruntime optimises both graphs alike at
    load. The tracer takes ~4 s for an EfficientNet-Lite where the torch.export-based
    exporter takes 20-40 s on 2 cores, which made exports most of the choose stage's cost.
    The model Graft deploys is always exported with the torch.export-based exporter
    (`components.export.export_onnx`). PyTorch marks the tracer as legacy; when it is gone
    or fails on a backbone, the other exporter runs instead.
    """
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with _EXPORT_LOCK, warnings.catch_warnings():
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
    tmp = path.with_suffix(f".{threading.get_ident()}.tmp.onnx")
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


def session(path: Path, threads: int = 0):  # noqa: ANN201 - onnxruntime.InferenceSession
    """An onnxruntime session on the providers this machine really has (as `graft predict` uses)."""
    import onnxruntime as ort

    from components.serving import choose_providers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=choose_providers())


class OnnxFeatures:
    """Features of uint8 image batches from an exported backbone; a drop-in extractor for `FeatureCache`.

    The onnxruntime session (about 0.1 s to create, graph optimisation included) is created
    on first use, so a `FeatureCache` that finds every row cached never pays for it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._session = None
        self._input_name = ""

    @property
    def session(self):  # noqa: ANN201 - onnxruntime.InferenceSession
        """The onnxruntime session, created on first use."""
        if self._session is None:
            self._session = session(self.path)
            self._input_name = self._session.get_inputs()[0].name
        return self._session

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: images})[0]


def time_calls(call, batch: np.ndarray, runs: int, warmup: int = 2) -> list[float]:  # noqa: ANN001 - any callable on a batch
    """Seconds of each of `runs` timed calls of `call(batch)`, after `warmup` untimed ones (first runs allocate)."""
    for _ in range(warmup):
        call(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    return times


def _median_ms(run, batch: np.ndarray, runs: int) -> float:  # noqa: ANN001 - a session.run bound with its feed name
    return float(np.median(time_calls(run, batch, runs))) * 1000.0


def measure_latency(path: Path, image_size: int, batch_size: int, runs: int, seed: int = 0) -> Latency:
    """Median onnxruntime time per image at batch 1 and at `batch_size`, on random uint8 images.

    Run candidates one after another: concurrent work on the same cores would inflate every figure.
    """
    extractor = OnnxFeatures(path)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
    batch1 = _median_ms(extractor, images[:1], runs)
    batched = _median_ms(extractor, images, max(3, runs // 4)) / batch_size
    provider = extractor.session.get_providers()[0]
    return Latency(round(batch1, 3), round(batched, 3), batch_size, provider)


@functools.cache
def _machine() -> dict[str, object]:
    """What a latency figure depends on besides the file: this machine, its runtime and providers."""
    import platform

    import onnxruntime as ort

    from components.serving import choose_providers

    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), "")
    return {
        "host": platform.node(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
        "onnxruntime": ort.__version__, "providers": choose_providers(),
    }


LATENCY_RECORDS = 8
"""Latency records kept per exported file (settings or machines that differ), newest last."""


def cached_latency(path: Path, image_size: int, batch_size: int, runs: int) -> tuple[Latency, str | None]:
    """`measure_latency`, or the figures measured earlier for the same file, settings and machine.

    The figures are kept beside the exported file (`<name>.latency.json`, the last few settings and
    machines it was timed with), keyed by the file's size and modification time (exports are written
    atomically, so a new export changes them), the batch size and runs, and the machine (host, CPU
    model, cores, onnxruntime version and providers). A scheduled retrain on new data reuses them
    instead of timing unchanged backbones again.

    Returns:
        The latency and, when it came from the file, when it was measured (else None).
    """
    stat = path.stat()
    key = {
        "file": [stat.st_size, stat.st_mtime_ns], "image_size": image_size, "batch_size": batch_size, "runs": runs,
        "machine": _machine(),
    }
    record = path.with_name(path.name + ".latency.json")
    try:
        entries = [e for e in json.loads(record.read_text())["entries"] if e["key"]["file"] == key["file"]]
    except (OSError, ValueError, KeyError, TypeError):
        entries = []  # none yet, or unreadable: measure
    for entry in entries:
        if entry["key"] == key:
            return Latency(**entry["latency"]), entry["measured_at"]
    latency = measure_latency(path, image_size, batch_size, runs)
    measured_at = time.strftime("%Y-%m-%d %H:%M:%S")
    entries = [*entries, {"key": key, "latency": asdict(latency), "measured_at": measured_at}][-LATENCY_RECORDS:]
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"entries": entries}))
        os.replace(tmp, record)
    except OSError as exc:  # a read-only cache still gets its figures, measured each time
        tmp.unlink(missing_ok=True)
        log.warning("could not keep the latency of %s in %s (%s); it will be measured again next run", path.name, record, exc)
    return latency, None
