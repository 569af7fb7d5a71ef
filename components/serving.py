"""Consumer side: load a Graft ONNX model and classify images with onnxruntime only.

Importable without torch. Models load from a file or an MLflow URI such as
`models:/NAME@champion`; the label list, input size and backbone are read
from the ONNX model's own metadata.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.errors import GraftError
from components.images import load_batch

log = logging.getLogger(__name__)


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


def resolve_model_path(model: str | Path) -> Path:
    """A local `.onnx` path for a file path or an MLflow `models:/` / `runs:/` URI."""
    text = str(model)
    if "://" in text or text.startswith("models:/") or text.startswith("runs:/"):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
            raise GraftError(f"cannot load '{text}' from MLflow ({exc}); check the name/alias in the MLflow UI") from exc
        candidates = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not candidates:
            raise GraftError(f"'{text}' holds no .onnx file; is it a model Graft registered?")
        return candidates[0]
    path = Path(text)
    if not path.is_file():
        raise GraftError(f"model file '{path}' not found: pass an .onnx file or models:/NAME@champion")
    return path


@dataclass(frozen=True)
class Prediction:
    """One image's top class."""

    file: str
    label: str
    score: float


class OnnxClassifier:
    """A Graft ONNX model ready to classify images."""

    def __init__(self, path: Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.path = Path(path)
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
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def load(cls, model: str | Path, providers: list[str] | None = None) -> OnnxClassifier:
        """Load from an `.onnx` file or an MLflow URI such as `models:/NAME@champion`."""
        return cls(resolve_model_path(model), providers)

    @property
    def provider(self) -> str:
        """The execution provider onnxruntime really uses (not just the one asked for)."""
        return self.session.get_providers()[0]

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for a uint8 N x S x S x 3 batch."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise GraftError(
                f"expected uint8 images of shape N x {self.image_size} x {self.image_size} x 3, "
                f"got {images.dtype} {images.shape}; use components.images.load_batch"
            )
        outputs = [
            self.session.run(None, {self.input_name: images[start : start + batch_size]})[0]
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, sources: list, batch_size: int = 32) -> list[Prediction]:
        """Top-1 label and probability for each path or PIL image."""
        results = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            probs = self.predict_proba(load_batch(chunk, self.image_size))
            for source, row in zip(chunk, probs, strict=True):
                best = int(row.argmax())
                name = os.fspath(source) if isinstance(source, (str, Path)) else "<image>"
                results.append(Prediction(file=name, label=self.classes[best], score=float(row[best])))
        return results
