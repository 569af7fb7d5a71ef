"""Load a Graft ONNX model and classify images with onnxruntime only.

Importable without torch. A model loads from an `.onnx` file, a deploy bundle
folder or an MLflow URI such as `models:/NAME@champion`; whichever it is, the
file is checked against what registration recorded before onnxruntime opens
it (`components.runtime.trust`). The label list, input size and backbone are
read from the ONNX model's own metadata. Each model may come in variants
beside the fp32 file (`components.runtime.variant_files`); `variant="auto"`
picks the one that suits the execution provider and this CPU.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from components.core.errors import GraftError
from components.data.images import load_batch
from components.registry.versions import download_artifact, parse_registry_uri, registry_version
from components.runtime.bundle import open_bundle
from components.runtime.cpu import INT8_FOR_EVERY_CPU, int8_loss_here
from components.runtime.providers import GPU_PROVIDERS, choose_providers, session_options, session_providers
from components.runtime.safety import check_external_data
from components.runtime.trust import champion_warning, check_local_file, fetch_registered
from components.runtime.variant_files import (
    VARIANT_SUFFIXES,
    named_variant,
    pick_variant,
    published_variants,
    variant_filename,
    variant_path,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from: what was asked for, and what was resolved."""

    uri: str
    variant: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    sha256: str | None = None
    """The loaded file's sha256, once checked against what was recorded (None: nothing recorded to check)."""
    signed_by: str | None = None
    """Fingerprint of the key whose signature verified the model's folder (None: verification off)."""
    warning: str | None = None
    """Why this model should not be serving although it was asked for (champion moved onto a failed version)."""
    note: str | None = None
    """Why `variant="auto"` passed over the variant it would otherwise have loaded (INT8 built for VNNI, on a CPU without)."""

    def describe(self) -> str:
        where = f"{self.name} v{self.version}" if self.version else self.uri
        return f"{where} ({self.variant})"


class Stopped(Exception):
    """Raised in the worker whose caller stopped waiting for it (`Stop.stop`)."""


class Stop:
    """Ends work whose caller stopped waiting (a request past its time limit): checked between images and batches,
    and it ends a run onnxruntime has in flight (`RunOptions.terminate`), so the worker thread is free again."""

    def __init__(self) -> None:
        import onnxruntime as ort

        self.run_options = ort.RunOptions()

    def stop(self) -> None:
        self.run_options.terminate = True

    @property
    def stopped(self) -> bool:
        return self.run_options.terminate

    def check(self) -> None:
        if self.stopped:
            raise Stopped


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

        options = session_options()  # spin-waiting as the process chose (off in `graft serve`)
        self.path = Path(path)
        check_external_data(self.path)  # refuse weights files outside the model's folder before onnxruntime reads them
        try:
            chosen = session_providers(providers or choose_providers(), self.path, source.sha256 if source else None)
            self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
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

    @property
    def accuracy_warning(self) -> str | None:
        """Why this model would score below what its deploy stage measured on this machine's CPU, or None
        (`components.runtime.cpu.int8_loss_here`: an INT8 file with 8-bit weights on a CPU without VNNI)."""
        return int8_loss_here(self.metadata) if self.provider == "CPUExecutionProvider" else None

    @classmethod
    def load(cls, model: str | Path, providers: list[str] | None = None, variant: str = "fp32") -> OnnxClassifier:
        """Load from an `.onnx` file, a deploy bundle folder, or an MLflow URI such as `models:/NAME@champion`.

        Args:
            model: Where the model is.
            providers: Execution providers; default `choose_providers()`.
            variant: fp32, optimized, fp16, int8, or auto (fp16 on a GPU, int8 on a CPU, when published and when it
                keeps its accuracy on this CPU: see `accuracy_warning`).
        """
        providers = providers or choose_providers()
        loaded = cls._load(model, providers, variant)
        problem = loaded.accuracy_warning
        if problem is None:
            return loaded
        if variant != "auto":
            log.warning("%s; load variant 'auto' or 'fp32' for the accuracy the deploy stage measured, or %s", problem, INT8_FOR_EVERY_CPU)
            return loaded
        fallback = cls._load(model, providers, variant, skip=(loaded.source.variant,))
        note = f"{problem}; loaded {fallback.source.variant} instead ({INT8_FOR_EVERY_CPU})"
        log.warning("%s", note)
        fallback.source = replace(fallback.source, note=note)
        return fallback

    @classmethod
    def _load(cls, model: str | Path, providers: list[str], variant: str, skip: Sequence[str] = ()) -> OnnxClassifier:
        text = str(model)
        registry = parse_registry_uri(text)
        if registry is not None:
            return cls._from_registry(text, *registry, providers, variant, skip)
        if text.startswith("models:/"):  # another form of a registry address: its files would go unchecked
            raise GraftError(
                f"'{text}' names no registered version Graft can check the files of against the registry's sha256 tags; "
                "name a version (models:/NAME/3) or an alias (models:/NAME@champion)"
            )
        if "://" in text or text.startswith("runs:/"):
            with tempfile.TemporaryDirectory(prefix="graft-model-") as tmp:  # the session holds the model once made
                return cls._from_plain(_find_onnx(download_artifact(text, Path(tmp)), text), providers, variant, skip, text)
        path = Path(text)
        if path.is_dir():
            bundle = open_bundle(path)
            chosen = pick_variant(variant, bundle.variants, providers, skip)
            file = bundle.file(chosen)
            source = ModelSource(text, chosen, bundle.name, bundle.version, sha256=bundle.sha256[file.name], signed_by=bundle.signed_by)
            return cls(file, providers, source)
        if not path.is_file():
            raise GraftError(f"model file '{path}' not found: pass an .onnx file, a bundle folder or models:/NAME@champion")
        return cls._from_plain(path, providers, variant, skip, text)

    @classmethod
    def _from_plain(cls, path: Path, providers: list[str], variant: str, skip: Sequence[str], uri: str) -> OnnxClassifier:
        """An .onnx file, or the variant asked for among the variant files beside it."""
        fp32_path, named = named_variant(path)  # `model.int8.onnx` named: that file, labelled int8, unless another variant is asked for
        available = [name for name in VARIANT_SUFFIXES if variant_path(fp32_path, name).is_file()]
        return cls._from_file(fp32_path, providers, pick_variant(named if variant == "fp32" else variant, available, providers, skip), uri)

    @classmethod
    def _from_file(cls, fp32_path: Path, providers: list[str], variant: str, uri: str) -> OnnxClassifier:
        """A plain file (or one variant beside it): its sidecar, and its folder's signature when verification is on."""
        file = variant_path(fp32_path, variant)
        checked = check_local_file(file)
        return cls(file, providers, ModelSource(uri, variant, sha256=checked.sha256.get(file.name), signed_by=checked.signed_by))

    @classmethod
    def _from_registry(cls, uri: str, name: str, alias: str | None, version: str | None, providers: list[str], variant: str,
                       skip: Sequence[str] = ()) -> OnnxClassifier:
        from mlflow import MlflowClient

        found = registry_version(name, alias, version)
        chosen = pick_variant(variant, published_variants(found.tags), providers, skip)
        filename = variant_filename(chosen)
        # the session holds the model in memory, so the downloaded copy can go at once
        with tempfile.TemporaryDirectory(prefix="graft-model-") as tmp:
            checked = fetch_registered(MlflowClient(), found, [filename], Path(tmp))
            warning = champion_warning(name, str(found.version), alias, found.tags)
            source = ModelSource(uri, chosen, name, str(found.version), alias, checked.sha256[filename], checked.signed_by, warning)
            loaded = cls(checked.paths[filename], providers, source)
        if warning:
            log.warning("%s", warning)
        return loaded

    @property
    def provider(self) -> str:
        """The execution provider onnxruntime really uses (not just the one asked for)."""
        return self.session.get_providers()[0]

    def _run(self, batch: np.ndarray, stop: Stop | None = None) -> np.ndarray:
        options = stop.run_options if stop else None
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch}, options)[0]
        # I/O binding: the uint8 batch is copied to the device once and the output is
        # allocated there, instead of onnxruntime staging both through extra host copies
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        binding.bind_output(self.output_name, self._device)
        self.session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()[0]

    def predict_proba(self, images: np.ndarray, batch_size: int = 64, stop: Stop | None = None) -> np.ndarray:
        """Class probabilities for a uint8 N x S x S x 3 batch; `stop` ends the work early (`Stopped`)."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise GraftError(
                f"expected uint8 images of shape N x {self.image_size} x {self.image_size} x 3, "
                f"got {images.dtype} {images.shape}; use components.data.images.load_batch"
            )
        outputs = []
        for start in range(0, len(images), batch_size):
            if stop:
                stop.check()
            outputs.append(self._run(images[start : start + batch_size], stop))
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
