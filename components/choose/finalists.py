"""The choose stage's second round: the best few candidates trained the way the fine-tune stage trains.

The first round scores every candidate on a sample (LogME, a probe). It is cheap, and on some data
it orders the candidates backwards (the choose benchmark, benchmarks/README.md). The `choose.finalists` best
eligible candidates by that score then go on: each extracts features of the whole training and
validation split through the feature cache the fine-tune stage reads (the sample's rows are reused,
and the winner's are not computed again when it trains), a head is trained on them with `train.*`'s
feature_extraction recipe, and the best validation accuracy wins.

The head trainer belongs to the fine-tune stage (`components.train.strategies.fit_finalist_head`),
which stage 1 does not import: the caller passes it in as a `FitHead`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from components.backbones.features import FeatureCache, OnnxFeatures
from components.choose.candidates import CandidateScore, resolve_spec
from components.core.config import Params
from components.core.errors import DataError, GraftError, TrainingError
from components.data.images import DecodedImages
from components.data.split import Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadTrial:
    """A head trained on one finalist's features of the whole training split, scored on validation."""

    val_accuracy: float
    """At the epoch early stopping kept, as the fine-tune stage reports it."""
    val_loss: float
    epochs: int


FitHead = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], HeadTrial]
"""Trains a head on (train features, train labels) and scores it on (val features, val labels)."""


TrainOne = Callable[[CandidateScore], CandidateScore]
"""`train_finalist` of one first-round row, e.g. as a cached task; default: trained here."""


SPLIT_IMAGES = DecodedImages(max_bytes=512 * 2**20)
"""The split's images, decoded once per image size for all finalists (1,800 images at 112 px hold
68 MB; past 512 MB the least recently used are dropped). `train_finalists` empties it when done."""


def pick_finalists(params: Params, ranked: tuple[CandidateScore, ...]) -> list[CandidateScore]:
    """The `choose.finalists` best eligible candidates of a first-round ranking (best first)."""
    eligible = [row for row in ranked if row.status == "ok" and row.score_rank is not None]
    return sorted(eligible, key=lambda row: row.score_rank or 0)[: params.choose.finalists]


def split_features(params: Params, split: Split, row: CandidateScore) -> tuple[np.ndarray, np.ndarray]:
    """One candidate's features of the whole training and validation split, from (and into) the feature cache."""
    spec = resolve_spec(params, row.name)
    cache = FeatureCache(params.data.cache_dir, spec, row.image_size or 0, seed=params.train.seed)
    onnx_path = Path(row.onnx_path) if row.onnx_path else None
    use_onnx = params.choose.onnx_features and onnx_path is not None and onnx_path.is_file()
    extractor = OnnxFeatures(onnx_path) if use_onnx else None
    paths = [sample.path for sample in split.train + split.val]
    features = cache.get(paths, params.choose.batch_size, extractor=extractor, decoded=SPLIT_IMAGES)
    return features[: len(split.train)], features[len(split.train) :]


def _labels(split: Split) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s.label for s in split.train], dtype=np.int64), np.array([s.label for s in split.val], dtype=np.int64)


def train_finalist(params: Params, split: Split, row: CandidateScore, fit_head: FitHead) -> CandidateScore:
    """Train one finalist's head on the whole training split and record its validation figures.

    A finalist-specific failure (features that cannot be extracted or are not finite, a head that
    diverges) marks that row and leaves the other finalists in the running; a bad image raises.
    """
    started = time.perf_counter()
    try:
        train_x, val_x = split_features(params, split, row)
    except DataError:
        raise
    except (GraftError, RuntimeError, ValueError) as exc:
        log.warning("finalist %s skipped: %s", row.name, exc)
        return replace(row, status=f"skipped: failed to extract the whole split's features ({exc.__class__.__name__}: {exc})")
    bad = int((~np.isfinite(train_x).all(axis=1)).sum() + (~np.isfinite(val_x).all(axis=1)).sum())
    if bad:
        log.warning("finalist %s skipped: NaN or inf features on %d images of the split", row.name, bad)
        return replace(row, status=f"skipped: its features contain NaN or inf on {bad} of {len(train_x) + len(val_x)} images of the split")
    train_y, val_y = _labels(split)
    try:
        trial = fit_head(train_x, train_y, val_x, val_y)
    except TrainingError as exc:
        log.warning("finalist %s skipped: %s", row.name, exc)
        return replace(row, status=f"skipped: its head did not train ({exc})")
    seconds = time.perf_counter() - started
    log.info(
        "finalist %s: validation accuracy %.4f (loss %.4f, %d epochs) with a head on %d training images (%.1fs)",
        row.name, trial.val_accuracy, trial.val_loss, trial.epochs, len(train_x), seconds,
    )
    return replace(row, val_accuracy=trial.val_accuracy, val_loss=trial.val_loss, train_seconds=round(seconds, 2))


def train_finalists(params: Params, split: Split, finalists: list[CandidateScore], fit_head: FitHead | None,
                    train_one: TrainOne | None = None) -> list[CandidateScore]:
    """`train_finalist` for each finalist in turn (they share the cores and the decoded images), or `train_one`
    for each when given (`graft run` passes a cached Prefect task: a rerun on the same images and settings
    takes each finalist's figures from the cache)."""
    if params.train.strategy != "feature_extraction" or params.train.augment:
        log.info(
            "choose, round 2: finalists are compared by a head on frozen, unaugmented features; "
            "train.strategy=%s%s then trains the winner alone", params.train.strategy,
            " with augmentation" if params.train.augment else "",
        )
    try:
        if train_one is None:
            return [train_finalist(params, split, row, fit_head) for row in finalists]
        return [train_one(row) for row in finalists]
    finally:
        SPLIT_IMAGES.clear()
