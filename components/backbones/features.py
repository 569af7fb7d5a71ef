"""Backbone features, computed once per image and cached on disk.

The cache is keyed by backbone, weights (the file's sha256), image size and preprocessing; inside
a cache file each row is keyed by the image's md5, so any subset of any
folder (the choose sample, the training split) reuses what was computed.
Rows come from eager PyTorch or from the same backbone exported to ONNX
(`OnnxFeatures` below); the two agree to float32 rounding.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from components.backbones.classifier import Preprocess
from components.backbones.spec import BackboneSpec
from components.core.files import atomic_write, cached_sha256, file_md5
from components.core.progress_lines import ProgressLines
from components.data.images import DecodedImages, load_batch
from components.runtime.providers import open_session

log = logging.getLogger(__name__)


PREPROCESSING_VERSION = "rgb-bilinear-v1"


Extractor = Callable[[np.ndarray], np.ndarray]
"""uint8 N x S x S x 3 images -> float features N x D."""


def cache_key(spec: BackboneSpec, image_size: int, seed: int) -> str:
    """Name of the cache file for one backbone at one image size."""
    weights = spec.weights_path()
    # the file's content, not its name and size: a torch.hub file replaced by other weights of the same architecture
    # keeps both (its sha256 is read once per process, see cached_sha256)
    tag = f"sha256:{cached_sha256(weights)[:16]}" if weights is not None else f"random-seed{seed}-bn-settled"
    code = spec.code_file()  # a user backbone's factory: its code is part of what it computes
    if code is not None:
        tag += f"|code:{cached_sha256(code)[:16]}"
    raw = f"{spec.name}|{spec.family}|{tag}|{image_size}|{PREPROCESSING_VERSION}|torch{torch.__version__}"
    return f"{spec.slug}-{image_size}px-{hashlib.sha1(raw.encode()).hexdigest()[:12]}"


def torch_extractor(backbone: torch.nn.Module, spec: BackboneSpec) -> Extractor:
    """Eager PyTorch: normalise with the backbone's mean/std and run it."""
    preprocess = Preprocess(spec.mean, spec.std)

    @torch.inference_mode()
    def extract(images: np.ndarray) -> np.ndarray:
        return backbone(preprocess(torch.from_numpy(images))).float().numpy()

    return extract


def compute_features(
    backbone: torch.nn.Module | None,
    spec: BackboneSpec,
    paths: Sequence[Path],
    image_size: int,
    batch_size: int = 64,
    desc: str = "features",
    extractor: Extractor | None = None,
    decoded: DecodedImages | None = None,
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Run `extractor` (or eager `backbone`) over images, returning float32 features N x D.

    With `decoded` and `keys` (a digest of each file's bytes), images already decoded at
    `image_size` by an earlier call are taken from that memo instead of being decoded again.
    """
    if decoded is not None and (keys is None or len(keys) != len(paths)):
        raise ValueError("compute_features(decoded=...) needs one key (the file's md5) per path in keys")
    extract = extractor if extractor is not None else torch_extractor(backbone, spec)
    chunks = []
    with ProgressLines(log, desc, len(paths)) as bar:
        for start in range(0, len(paths), batch_size):
            part = list(paths[start : start + batch_size])
            if decoded is not None:
                batch = decoded.batch(part, list(keys[start : start + batch_size]), image_size)
            else:
                batch = load_batch(part, image_size)
            chunks.append(np.asarray(extract(batch), dtype=np.float32))
            bar.update(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


class FeatureCache:
    """Features of one backbone at one size, stored as `<key>.npz` (md5s + matrix)."""

    def __init__(self, cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int = 0) -> None:
        self.spec = spec
        self.image_size = image_size
        self.seed = seed
        self.path = Path(cache_dir) / "features" / f"{cache_key(spec, image_size, seed)}.npz"
        self.hits = 0
        self.misses = 0

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                return dict(zip(stored["md5"].tolist(), stored["features"], strict=True))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated, or damaged (zip's CRC)
            log.warning("feature cache %s is unreadable (%s); recomputing it", self.path, exc)
            return {}

    def _write(self, table: dict[str, np.ndarray]) -> None:
        """Replace the file in one rename; a full disk is a `DiskFullError` naming it, with no temporary file left."""
        with atomic_write(self.path) as tmp, open(tmp, "wb") as out:  # a file object: np.savez adds no extension
            np.savez(out, md5=np.array(list(table)), features=np.stack(list(table.values())))

    def get(
        self,
        paths: Sequence[Path],
        batch_size: int = 64,
        backbone: torch.nn.Module | None = None,
        extractor: Extractor | None = None,
        decoded: DecodedImages | None = None,
    ) -> np.ndarray:
        """Features of `paths`, computing (and storing) only the rows not cached yet.

        Args:
            paths: Images, in the order of the returned rows.
            batch_size: Images per forward pass.
            backbone: The built backbone, if the caller has it (else it is built on a miss).
            extractor: Computes rows instead of eager PyTorch, e.g. the ONNX-exported backbone.
            decoded: Decoded images shared with other backbones' caches (keyed by md5), so
                several backbones at one image size decode each image once.
        """
        md5s = [file_md5(p) for p in paths]
        table = self._read()
        todo = sorted({m: p for m, p in zip(md5s, paths, strict=True) if m not in table}.items())
        self.hits += len(paths) - len(todo)
        self.misses += len(todo)
        if todo:
            if extractor is None and backbone is None:
                backbone = self.spec.build(self.image_size, seed=self.seed)
            fresh = compute_features(
                backbone, self.spec, [p for _, p in todo], self.image_size, batch_size,
                desc=f"{self.spec.name} features", extractor=extractor,
                decoded=decoded, keys=[m for m, _ in todo],
            )
            table.update({m: row for (m, _), row in zip(todo, fresh, strict=True)})
            self._write(table)
        log.info("%s: %d images, %d from cache, %d computed", self.spec.name, len(paths), len(paths) - len(todo), len(todo))
        return np.stack([table[m] for m in md5s]).astype(np.float32)


class OnnxFeatures:
    """Features of uint8 image batches from an exported backbone; a drop-in extractor for `FeatureCache`.

    The onnxruntime session (about 0.1 s to create, graph optimisation included) is created
    on first use, so a `FeatureCache` that finds every row cached never pays for it.
    """

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.path = Path(path)
        self.threads = threads
        """onnxruntime intra-op threads; 0 is its default (one per physical core)."""
        self._session = None
        self._input_name = ""

    @property
    def session(self):  # noqa: ANN201 - onnxruntime.InferenceSession
        """The onnxruntime session, created on first use."""
        if self._session is None:
            self._session = open_session(self.path, self.threads)
            self._input_name = self._session.get_inputs()[0].name
        return self._session

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: images})[0]
