"""Consumer side: load a Graft ONNX model and classify images with onnxruntime only.

Importable without torch. A model loads from an `.onnx` file, a deploy bundle
folder (checksums verified first) or an MLflow URI such as
`models:/NAME@champion`; the label list, input size and backbone are read
from the ONNX model's own metadata. Each model may come in variants beside
the fp32 file (`model.fp16.onnx` for GPUs, `model.int8.onnx` for CPUs,
`model.optimized.onnx` with onnxruntime's offline graph optimisation);
`variant="auto"` picks the one that suits the execution provider.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.errors import GraftError
from components.images import load_batch

log = logging.getLogger(__name__)

VARIANT_SUFFIXES: dict[str, str] = {"fp32": "", "optimized": ".optimized", "fp16": ".fp16", "int8": ".int8"}
"""Variant name -> what its file adds to the fp32 file's stem (`model.onnx` -> `model.int8.onnx`)."""
VARIANT_CHOICES = ("auto", *VARIANT_SUFFIXES)
VARIANTS_TAG = "onnx.variants"
"""Model-version tag: JSON {variant: {file, sha256, accuracy_change, ...}} of the published variants."""
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def _has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def _has_tensorrt() -> bool:
    return any(ctypes.util.find_library(name) for name in ("nvinfer", "nvinfer_10"))


def choose_providers(available: list[str] | None = None) -> list[str]:
    """Execution providers in order TensorRT, CUDA, CPU, keeping only those this machine can run.

    onnxruntime-gpu lists CUDA and TensorRT even where no GPU exists, and asking
    for them there prints long library errors before it falls back; so a GPU
    provider is asked for only when an NVIDIA driver is present.
    """
    import onnxruntime as ort

    available = available if available is not None else ort.get_available_providers()
    gpu = _has_nvidia_gpu()
    order = []
    if gpu and "TensorrtExecutionProvider" in available and _has_tensorrt():
        order.append("TensorrtExecutionProvider")
    if gpu and "CUDAExecutionProvider" in available:
        order.append("CUDAExecutionProvider")
    order.append("CPUExecutionProvider")
    return order


def variant_path(fp32_path: Path, variant: str) -> Path:
    """The file of `variant` beside the fp32 model file."""
    if variant not in VARIANT_SUFFIXES:
        raise GraftError(f"unknown model variant '{variant}'; choose one of {', '.join(VARIANT_CHOICES)}")
    return fp32_path.with_name(f"{fp32_path.stem}{VARIANT_SUFFIXES[variant]}{fp32_path.suffix}")


def pick_variant(requested: str, available: Sequence[str], providers: Sequence[str]) -> str:
    """Resolve `auto` (fp16 on a GPU provider, else int8, else the optimised fp32) and check availability."""
    if requested == "auto":
        preference = ("fp16", "fp32") if providers and providers[0] in GPU_PROVIDERS else ("int8", "optimized", "fp32")
        return next(name for name in preference if name in available or name == "fp32")
    if requested not in VARIANT_SUFFIXES:
        raise GraftError(f"unknown model variant '{requested}'; choose one of {', '.join(VARIANT_CHOICES)}")
    if requested not in available:
        raise GraftError(
            f"variant '{requested}' was not published for this model (available: {', '.join(available)}); "
            "a variant that lost more accuracy than deploy.max_variant_drop is not published"
        )
    return requested


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from: what was asked for, and what was resolved."""

    uri: str
    variant: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    def describe(self) -> str:
        where = f"{self.name} v{self.version}" if self.version else self.uri
        return f"{where} ({self.variant})"


def parse_registry_uri(text: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, else None."""
    match = _REGISTRY_URI.match(text)
    return (match["name"], match["alias"], match["version"]) if match else None


def registry_version(name: str, alias: str | None, version: str | None):  # noqa: ANN201 - mlflow ModelVersion
    """The model version an alias or number names, with a clear error when there is none.

    Transient registry failures are retried (`components.registry_calls`).

    Raises:
        TrackingAuthError: the server refused the credentials or the permission to read the model.
        RegistryError: the registry kept failing.
        GraftError: the model has no such alias or version.
    """
    from mlflow import MlflowClient

    from components import registry_calls
    from components.transient import is_transient

    what = f"alias '{alias}'" if alias else f"version {version}"
    client = MlflowClient()

    def read():  # noqa: ANN202 - mlflow ModelVersion
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)

    try:
        return registry_calls.call(f"reading {what} of model '{name}'", read, uri=client.tracking_uri)
    except registry_calls.TrackingAuthError:
        raise
    except GraftError as exc:
        if exc.__cause__ is None or is_transient(exc.__cause__):
            raise  # the registry is down, not the alias missing
        raise GraftError(
            f"model '{name}' has no {what} in the MLflow registry at {client.tracking_uri} "
            f"({registry_calls.first_line(exc.__cause__)}); "
            "check the name and alias in the MLflow UI, or pass --params naming the right store"
        ) from exc.__cause__


def published_variants(tags: dict[str, str]) -> list[str]:
    """Variant names a model version lists in its `onnx.variants` tag (always includes fp32)."""
    try:
        listed = json.loads(tags.get(VARIANTS_TAG, "{}"))
    except ValueError:
        listed = {}
    return ["fp32", *[name for name in listed if name != "fp32" and name in VARIANT_SUFFIXES]]


def _download(artifact_uri: str, dst: Path) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        from components.registry_calls import explain_auth

        refused = explain_auth(exc, mlflow.get_tracking_uri(), f"downloading '{artifact_uri}'")
        if refused is not None:
            raise refused from exc
        raise GraftError(f"cannot download '{artifact_uri}' from MLflow ({exc}); check the name/alias in the MLflow UI") from exc


class OnnxClassifier:
    """A Graft ONNX model ready to classify images."""

    def __init__(
        self,
        path: Path,
        providers: list[str] | None = None,
        source: ModelSource | None = None,
        io_binding: bool | None = None,
    ) -> None:
        """Open `path` with onnxruntime.

        Args:
            path: An `.onnx` file with Graft metadata.
            providers: Execution providers to ask for; default `choose_providers()`.
            source: Where the file came from (registry version, bundle), for reports.
            io_binding: Bind inputs and outputs to the device explicitly; default on for CUDA/TensorRT.
        """
        import onnxruntime as ort

        from components.onnx_safety import check_external_data

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.path = Path(path)
        check_external_data(self.path)  # refuse weights files outside the model's folder before onnxruntime reads them
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers or choose_providers())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise GraftError(f"onnxruntime cannot load {self.path} ({exc}); is it a valid ONNX model?") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: tuple[str, ...] = tuple(json.loads(meta["classes"]))
            self.image_size = int(meta["image_size"])
        except (KeyError, ValueError) as exc:
            raise GraftError(f"{self.path} lacks Graft metadata (classes, image_size); export it with Graft") from exc
        self.metadata = dict(meta)
        self.source = source or ModelSource(str(self.path), meta.get("graft.variant", "fp32"))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        on_gpu = self.provider in GPU_PROVIDERS
        self.io_binding = on_gpu if io_binding is None else io_binding
        self._device = "cuda" if on_gpu else "cpu"

    @classmethod
    def load(cls, model: str | Path, providers: list[str] | None = None, variant: str = "fp32") -> OnnxClassifier:
        """Load from an `.onnx` file, a deploy bundle folder, or an MLflow URI such as `models:/NAME@champion`.

        Args:
            model: Where the model is.
            providers: Execution providers; default `choose_providers()`.
            variant: fp32, optimized, fp16, int8, or auto (fp16 on a GPU, int8 on a CPU, when published).
        """
        providers = providers or choose_providers()
        text = str(model)
        registry = parse_registry_uri(text)
        if registry is not None:
            return cls._from_registry(text, *registry, providers, variant)
        if "://" in text or text.startswith(("runs:/", "models:/")):
            with tempfile.TemporaryDirectory(prefix="graft-model-") as tmp:
                local = _download(text, Path(tmp))
                path = _find_onnx(local, text)
                return cls(path, providers, ModelSource(text, "fp32"))
        path = Path(text)
        if path.is_dir():
            from components.bundle import open_bundle

            bundle = open_bundle(path)
            chosen = pick_variant(variant, bundle.variants, providers)
            return cls(bundle.file(chosen), providers, ModelSource(text, chosen, bundle.name, bundle.version))
        if not path.is_file():
            raise GraftError(f"model file '{path}' not found: pass an .onnx file, a bundle folder or models:/NAME@champion")
        available = [name for name in VARIANT_SUFFIXES if variant_path(path, name).is_file()]
        chosen = pick_variant(variant, available, providers)
        return cls(variant_path(path, chosen), providers, ModelSource(text, chosen))

    @classmethod
    def _from_registry(cls, uri: str, name: str, alias: str | None, version: str | None, providers: list[str], variant: str) -> OnnxClassifier:
        from mlflow import MlflowClient

        found = registry_version(name, alias, version)
        chosen = pick_variant(variant, published_variants(found.tags), providers)
        root = MlflowClient().get_model_version_download_uri(name, found.version)
        filename = variant_path(Path("model.onnx"), chosen).name
        # the session holds the model in memory, so the downloaded copy can go at once
        with tempfile.TemporaryDirectory(prefix="graft-model-") as tmp:
            local = _download(f"{root.rstrip('/')}/{filename}", Path(tmp))
            return cls(local, providers, ModelSource(uri, chosen, name, str(found.version), alias))

    @property
    def provider(self) -> str:
        """The execution provider onnxruntime really uses (not just the one asked for)."""
        return self.session.get_providers()[0]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        # I/O binding: the uint8 batch is copied to the device once and the output is
        # allocated there, instead of onnxruntime staging both through extra host copies
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        binding.bind_output(self.output_name, self._device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for a uint8 N x S x S x 3 batch."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise GraftError(
                f"expected uint8 images of shape N x {self.image_size} x {self.image_size} x 3, "
                f"got {images.dtype} {images.shape}; use components.images.load_batch"
            )
        outputs = [self._run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), dtype=np.float32)

    def to_input(self, sources: Sequence[object] | np.ndarray) -> np.ndarray:
        """The uint8 N x S x S x 3 batch for paths, PIL images, H x W (x 3) uint8 arrays, or one N x H x W x 3 array."""
        if isinstance(sources, np.ndarray):
            if sources.ndim == 4 and sources.shape[1:] == (self.image_size, self.image_size, 3) and sources.dtype == np.uint8:
                return sources
            sources = list(sources) if sources.ndim == 4 else [sources]
        return load_batch([_as_image(item) for item in sources], self.image_size)

    def predict(self, sources: Sequence[object] | np.ndarray, batch_size: int = 32) -> list[Prediction]:
        """Top-1 label and probability for each path, PIL image or uint8 array (one image or a batch)."""
        items = list(sources) if not isinstance(sources, np.ndarray) or sources.ndim == 4 else [sources]
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            probs = self.predict_proba(self.to_input(chunk))
            for item, row in zip(chunk, probs, strict=True):
                best = int(row.argmax())
                name = os.fspath(item) if isinstance(item, (str, Path)) else "<image>"
                results.append(Prediction(file=name, label=self.classes[best], score=float(row[best])))
        return results


@dataclass(frozen=True)
class Prediction:
    """One image's top class."""

    file: str
    label: str
    score: float


def _as_image(item: object) -> Path | str | Image.Image:
    """Paths and PIL images pass through; a uint8 H x W or H x W x {1,3,4} array becomes a PIL image."""
    if not isinstance(item, np.ndarray):
        return item  # type: ignore[return-value] - load_image reports anything else
    if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
        raise GraftError(
            f"an image array must be uint8 H x W or H x W x 3 (RGB), got {item.dtype} {item.shape}; "
            "convert with np.asarray(pil_image) or (x * 255).astype(np.uint8)"
        )
    return Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)


def _find_onnx(local: Path, uri: str) -> Path:
    candidates = [local] if local.is_file() else [p for p in sorted(local.rglob("*.onnx")) if p.name == "model.onnx"] or sorted(local.rglob("*.onnx"))
    if not candidates:
        raise GraftError(f"'{uri}' holds no .onnx file; is it a model Graft registered?")
    return candidates[0]


def resolve_model_path(model: str | Path, dst: Path | None = None) -> Path:
    """A local fp32 `.onnx` path for a file, a bundle folder, or an MLflow `models:/` / `runs:/` URI.

    Downloads go to `dst` (default: a new temporary folder the caller owns).
    """
    text = str(model)
    if "://" in text or text.startswith(("models:/", "runs:/")):
        target = dst or Path(tempfile.mkdtemp(prefix="graft-model-"))
        return _find_onnx(_download(text, target), text)
    path = Path(text)
    if path.is_dir():
        from components.bundle import open_bundle

        return open_bundle(path).file("fp32")
    if not path.is_file():
        raise GraftError(f"model file '{path}' not found: pass an .onnx file, a bundle folder or models:/NAME@champion")
    return path


def copy_variant_files(fp32_path: Path, names: Sequence[str], target_dir: Path) -> list[Path]:
    """Copy the fp32 file and the named variants beside it into `target_dir`, keeping their names."""
    target_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("fp32", *[n for n in names if n != "fp32"]):
        source = variant_path(fp32_path, name)
        copied.append(Path(shutil.copyfile(source, target_dir / source.name)))
    return copied
