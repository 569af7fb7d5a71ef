"""The cached trunk: fine-tuning epochs that run only the blocks that train.

With `train.unfreeze: N` the stem and the blocks before the last N are frozen and stay in eval mode;
without augmentation they compute the same output for an image in every epoch (BatchNorm
statistics too: frozen blocks never update theirs, `train.freeze_bn` or not). So the trunk runs
once per image (`TrunkCache`, kept under `data.cache_dir/trunk/` and keyed like the feature cache:
backbone, weights, image size, preprocessing and torch version, then the cut, one row per image
md5), and every epoch trains the tail (the unfrozen blocks and the head) on those rows: the same
computation as through the whole backbone, to float rounding. Many images at once run on onnxruntime,
through the backbone's exported graph that choose left in the cache, cut where the frozen blocks end
(`components.backbones.onnx_trunk`; found by value on a probe batch, else PyTorch runs them).

`training_data` decides which path runs and logs it: the cached trunk, or decoded images through
the whole backbone, with the reason (augmentation on, nothing frozen, an architecture
`components.backbones.trunk` cannot cut, `train.cache_trunk: false`, or over the budget).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from components.backbones.classifier import GraftClassifier
from components.backbones.export import cached_backbone_onnx
from components.backbones.features import cache_key
from components.backbones.onnx_trunk import OnnxTrunk, cut_at_trunk
from components.backbones.spec import BackboneSpec
from components.backbones.trunk import TrunkSplit, split_backbone
from components.backbones.unfreeze import Trainable
from components.core.config import Params
from components.core.errors import ModelError
from components.core.files import atomic_write, file_md5, write_json
from components.core.progress_lines import ProgressLines
from components.data.images import load_batch
from components.data.split import Split
from components.train.network import TrainingData, labels_of, load_images

log = logging.getLogger(__name__)


ONNX_TRUNK_MIN_IMAGES = 64
"""From this many images to compute, the frozen blocks run on onnxruntime (the backbone's exported graph, cut at
their end: `components.backbones.onnx_trunk`) instead of PyTorch. EfficientNet-Lite0's first 15 blocks at 112 px,
512 digits in batches of 64 (00:40 UTC): 734 images/s against 169, the same rows to 4e-6 of their largest value;
cutting the graph takes 0.24 s, what PyTorch spends on about 40 images."""

TRUNK_BUDGET_BYTES = 4 << 30
"""Trunk rows one run trains on (train + val, float32) are kept in memory; above this, training runs
through the whole backbone instead (the decoded images it then keeps are 3 bytes a pixel)."""


READ_ATTEMPTS = 3
"""Reads of the index when the rows file it names is gone (replaced by another run's commit in the meantime)."""


class TrunkCache:
    """The trunk's output for one backbone, image size and cut: `<key>.json`, the image md5 of each row and the name
    of the rows file it describes, `<key>-<writer>.npy` (float32 rows, memory-mapped).

    Rows are computed outside any lock; adding them takes `<key>.lock` for as long as it takes to copy the rows
    committed so far and the new ones into a new file and commit it by replacing the index in one rename. So a
    reader, which takes no lock, always finds an index and the rows written for it (should a commit replace them
    between its reading the index and opening the rows, it reads the new index), and two runs adding rows at once
    (a manual run beside a scheduled one) both keep theirs.
    """

    def __init__(self, cache_dir: Path, spec: BackboneSpec, image_size: int, seed: int, frozen_blocks: int, opset: int) -> None:
        self.spec, self.image_size = spec, image_size
        self.cache_dir, self.seed, self.opset = Path(cache_dir), seed, opset  # the opset: which exported graph to cut
        self.stem = Path(cache_dir) / "trunk" / f"{cache_key(spec, image_size, seed)}-frozen{frozen_blocks}"
        self.index_path = self._beside(".json")
        self.hits = 0
        self.misses = 0

    def _beside(self, suffix: str) -> Path:
        """`<key><suffix>`: appended, never `with_suffix`, which would cut a key at a dot in the backbone's name
        (`resnet18.v2`) and give every size, seed and cut of it one file."""
        return self.stem.with_name(self.stem.name + suffix)

    def _read(self) -> tuple[list[str], np.ndarray | None]:
        """(md5 of each row, the rows) as the index last committed them; ([], None) when there are none."""
        for attempt in range(READ_ATTEMPTS):
            if not self.index_path.is_file():
                return [], None
            try:
                index = json.loads(self.index_path.read_text())
                if "rows" not in index:  # Graft before 2026-12-07: one `<key>.npy` beside it, replaced in place
                    log.info("trunk cache %s is in an older layout; computing it again", self.index_path)
                    return [], None
                md5s = index["md5"]
                rows = np.load(self.index_path.parent / index["rows"], mmap_mode="r")
                if len(rows) != len(md5s):
                    raise ValueError(f"{len(md5s)} md5s for {len(rows)} rows")
                return md5s, rows
            except FileNotFoundError as exc:
                if attempt + 1 < READ_ATTEMPTS:  # another run committed newer rows and removed these since the index
                    continue                     # was read: its index names the new ones
                problem: Exception = exc
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problem = exc
            log.warning("trunk cache %s is unreadable (%s); recomputing it", self.index_path, problem)
            return [], None
        return [], None  # pragma: no cover - the loop returns

    def _add(self, md5s: list[str], fresh: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Commit `fresh` rows (of images `md5s`) after the rows committed so far, and return what is committed then:
        every md5 and its rows, memory-mapped."""
        import fcntl

        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._beside(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            known, rows = self._read()
            if rows is not None and tuple(rows.shape[1:]) != tuple(fresh.shape[1:]):
                known, rows = [], None  # another torch or model build: start over
            seen = set(known)
            new = [i for i, m in enumerate(md5s) if m not in seen]  # another writer may have added some meanwhile
            committed = known + [md5s[i] for i in new]
            writer = f"{os.getpid()}-{threading.get_ident()}-{time.time_ns()}"
            rows_path = self.stem.parent / f"{self.stem.name}-{writer}.npy"
            with atomic_write(rows_path, ".npy") as tmp:  # a full disk: DiskFullError naming the folder
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(committed), *fresh.shape[1:]))
                if known:
                    out[: len(known)] = rows
                out[len(known) :] = fresh[new]
                out.flush()
                del out
            write_json(self.index_path, {"md5": committed, "rows": rows_path.name})
            for old in [*self.stem.parent.glob(f"{self.stem.name}-*.npy"), self._beside(".npy")]:
                if old != rows_path:
                    old.unlink(missing_ok=True)  # superseded (or the older layout's); a reader that maps it keeps its pages
            return committed, np.load(rows_path, mmap_mode="r")

    def get(self, paths: Sequence[Path], trunk: TrunkSplit, preprocess: torch.nn.Module, batch_size: int) -> np.ndarray:
        """Trunk rows of `paths` (in that order), computing and storing only those not cached yet."""
        md5s = [file_md5(p) for p in paths]
        known, rows = self._read()
        position = {m: i for i, m in enumerate(known)}
        todo = sorted({m: p for m, p in zip(md5s, paths, strict=True) if m not in position}.items())
        if rows is not None and todo and tuple(rows.shape[1:]) != tuple(self._shape(trunk, preprocess)):
            known, rows, position = [], None, {}  # another torch or model build: start over
            todo = sorted({m: p for m, p in zip(md5s, paths, strict=True)}.items())
        self.hits += len(paths) - sum(1 for m in md5s if m not in position)
        self.misses += len(todo)
        if todo:
            log.info("running the %d frozen blocks of %s over %d images (once; cached in %s)", trunk.frozen_blocks, self.spec.name, len(todo), self.index_path.parent)
            started = time.perf_counter()
            todo_paths, desc = [p for _, p in todo], f"{self.spec.name} frozen blocks"
            on_onnx = self._onnx_trunk(trunk, preprocess, todo_paths)
            fresh = None
            if on_onnx is not None:
                try:
                    fresh = _run_batches(on_onnx, todo_paths, self.image_size, batch_size, desc)
                except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors; PyTorch computes the same
                    log.warning("frozen blocks on onnxruntime failed (%s); running them in PyTorch", exc)
                    on_onnx = None
            if fresh is None:
                fresh = _run_batches(_in_pytorch(trunk, preprocess), todo_paths, self.image_size, batch_size, desc)
            seconds = time.perf_counter() - started
            log.info("frozen blocks: %d images in %.1f s (%.0f images/s) on %s", len(todo), seconds, len(todo) / max(seconds, 1e-9),
                     "onnxruntime" if on_onnx is not None else "PyTorch")
            known, rows = self._add([m for m, _ in todo], fresh)  # with what another run committed meanwhile
            position = {m: i for i, m in enumerate(known)}
        return np.asarray(rows[[position[m] for m in md5s]], dtype=np.float32)

    def _onnx_trunk(self, trunk: TrunkSplit, preprocess: torch.nn.Module, paths: list[Path]) -> OnnxTrunk | None:
        """The backbone's exported graph cut at the trunk's end, when choose left it in the cache and there are
        enough images to repay the cut (about a quarter of a second); None: run the trunk in PyTorch."""
        if len(paths) < ONNX_TRUNK_MIN_IMAGES:
            return None
        graph = cached_backbone_onnx(self.cache_dir, self.spec, self.image_size, self.seed, self.opset)
        if graph is None:
            return None
        probe = load_batch(paths[:2], self.image_size)
        expected = _in_pytorch(trunk, preprocess)(probe)
        try:
            found = cut_at_trunk(graph, probe, expected)
        except Exception as exc:  # noqa: BLE001 - onnx and onnxruntime raise many types; PyTorch computes the same
            log.info("frozen blocks in PyTorch: cutting %s failed (%s)", graph.name, exc)
            return None
        if found is None:
            log.info("frozen blocks in PyTorch: no tensor of %s matches their output", graph.name)
            return None
        log.info("frozen blocks on onnxruntime: %s cut at %s (%.0e of the largest value from PyTorch's output on a probe)",
                 graph.name, found.tensor, found.max_difference)
        return found

    def _shape(self, trunk: TrunkSplit, preprocess: torch.nn.Module) -> tuple[int, ...]:
        with torch.inference_mode():
            probe = torch.zeros((1, self.image_size, self.image_size, 3), dtype=torch.uint8)
            return tuple(trunk.trunk(preprocess(probe)).shape[1:])


def _in_pytorch(trunk: TrunkSplit, preprocess: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """The frozen blocks in PyTorch, as a function of uint8 images (what `OnnxTrunk` is on onnxruntime)."""

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return trunk.trunk(preprocess(torch.from_numpy(images))).float().numpy()

    return run


def _run_batches(run: Callable[[np.ndarray], np.ndarray], paths: list[Path], size: int, batch_size: int, desc: str) -> np.ndarray:
    """`run` over the decoded images of `paths`, `batch_size` at a time, with a progress bar: float32 rows."""
    chunks = []
    with ProgressLines(log, desc, len(paths)) as bar:
        for start in range(0, len(paths), batch_size):
            images = load_batch(paths[start : start + batch_size], size)
            chunks.append(np.asarray(run(images), dtype=np.float32))
            bar.update(len(images))
    return np.concatenate(chunks)


def _why_not_cached(params: Params, trainable: Trainable) -> str | None:
    cfg = params.train
    if not cfg.cache_trunk:
        return "train.cache_trunk is false"
    if cfg.augment:
        return "augmentation is on, so the frozen blocks see new pixels every epoch and their output cannot be cached"
    if trainable.blocks >= trainable.total_blocks:
        return "train.unfreeze trains every block, so nothing is fixed to compute once"
    return None


def trunk_split(model: GraftClassifier, trainable: Trainable, image_size: int) -> TrunkSplit:
    """The model's backbone cut where `trainable` begins (see `components.backbones.trunk.split_backbone`)."""
    return split_backbone(model.backbone, trainable.total_blocks - trainable.blocks, image_size)


def _usable_cut(params: Params, split: Split, size: int, model: GraftClassifier, trainable: Trainable) -> TrunkSplit | str:
    """The cut to cache, or why training must run through the whole backbone."""
    reason = _why_not_cached(params, trainable)
    if reason is not None:
        return reason
    try:
        cut = trunk_split(model, trainable, size)
    except ModelError as exc:
        return str(exc)
    needed = (len(split.train) + len(split.val)) * _row_bytes(cut, model, size)
    if needed > TRUNK_BUDGET_BYTES:
        return (f"the frozen blocks' output for {len(split.train) + len(split.val)} images needs {needed / 2**30:.1f} GiB, "
                f"over the {TRUNK_BUDGET_BYTES / 2**30:.0f} GiB budget")
    return cut


def training_data(params: Params, split: Split, spec: BackboneSpec, size: int, model: GraftClassifier, trainable: Trainable) -> TrainingData:
    """What the epochs of a strategy that trains `trainable` read: the cached trunk's rows when the frozen
    part is a fixed function, else the decoded images (the log says which, and why).

    Raises:
        TrainingError: the decoded images would not fit the memory budget (the full path only).
    """
    cut = _usable_cut(params, split, size, model, trainable)
    if isinstance(cut, str):
        log.info("training through the whole backbone every epoch: %s", cut)
        return load_images(split, size)
    return cached_trunk_data(params, split, spec, size, model, cut)


def prepare_trunk_cache(params: Params, split: Split, spec: BackboneSpec, size: int, model: GraftClassifier, trainable: Trainable) -> None:
    """Fill the trunk cache for this run, where it applies (before several training processes read it)."""
    cut = _usable_cut(params, split, size, model, trainable)
    if not isinstance(cut, str):
        cached_trunk_data(params, split, spec, size, model, cut)


def _row_bytes(cut: TrunkSplit, model: GraftClassifier, size: int) -> int:
    with torch.inference_mode():
        return 4 * int(np.prod(cut.trunk(model.preprocess(torch.zeros((1, size, size, 3), dtype=torch.uint8))).shape[1:]))


def cached_trunk_data(params: Params, split: Split, spec: BackboneSpec, size: int, model: GraftClassifier, cut: TrunkSplit) -> TrainingData:
    """The trunk's rows of the training and validation images, from the cache (computing what is missing)."""
    cache = TrunkCache(params.data.cache_dir, spec, size, params.train.seed, cut.frozen_blocks, params.deploy.opset)
    model.eval()
    rows = cache.get([s.path for s in split.train + split.val], cut, model.preprocess, params.choose.batch_size)
    train, val = torch.from_numpy(rows[: len(split.train)]), torch.from_numpy(rows[len(split.train) :])
    log.info(
        "cached trunk: %d frozen blocks of %s ran once per image (%d cached, %d computed; %s per image, %s); "
        "each epoch runs only the blocks that train and the head",
        cut.frozen_blocks, spec.name, cache.hits, cache.misses, "x".join(map(str, train.shape[1:])), cache.index_path,
    )
    return TrainingData(train, torch.from_numpy(labels_of(split.train)), val, torch.from_numpy(labels_of(split.val)), len(split.classes), cut)


def trunk_features(params: Params, model: GraftClassifier, spec: BackboneSpec, paths: Sequence[Path], size: int, frozen_blocks: int) -> np.ndarray:
    """Pooled features of a trained model whose first `frozen_blocks` never trained: cached trunk rows, then its tail.

    Raises:
        ModelError: the backbone cannot be cut there, or its trunk is not the pre-trained one the cache holds.
    """
    cut = split_backbone(model.backbone, frozen_blocks, size)
    pretrained = split_backbone(spec.build(size, seed=params.train.seed), frozen_blocks, size)
    ours, theirs = cut.trunk.state_dict(), pretrained.trunk.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise ModelError(f"the first {frozen_blocks} blocks of the trained {spec.name} differ from its pre-trained weights")
    model.eval()
    rows = TrunkCache(params.data.cache_dir, spec, size, params.train.seed, frozen_blocks, params.deploy.opset).get(paths, cut, model.preprocess, params.choose.batch_size)
    with torch.inference_mode():
        return np.concatenate([
            cut.tail(torch.from_numpy(rows[start : start + params.choose.batch_size])).float().numpy()
            for start in range(0, len(rows), params.choose.batch_size)
        ]) if len(rows) else np.zeros((0, 0), dtype=np.float32)
