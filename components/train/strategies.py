"""Every transfer strategy, one setting each (`train.strategy`).

- feature_extraction: the backbone frozen, a new linear head trained on cached
  features (each epoch is a pass over a small matrix). With augmentation on,
  the cache is bypassed and the head trains through the frozen backbone.
- fine_tune: the last `train.unfreeze` blocks train with the head, at
  `train.backbone_lr_ratio` of the head's learning rate, BatchNorm statistics
  frozen, warm-up then cosine decay. The frozen blocks run once per image
  (the cached trunk, `components.train.trunk`) wherever they are a fixed function.
- two_stage: the head first (frozen backbone, cached features), then the
  unfrozen blocks and the head together at a low learning rate (on the cached trunk too).
- scratch: the same architecture randomly initialised, everything trained;
  BatchNorm statistics are recomputed on the training images before each
  validation, since running averages lag far behind fast-moving weights.

Every strategy shares one loop (`components.train.loop`): early stopping on
validation loss with the best weights restored, an atomic checkpoint every
epoch, resume after a crash, divergence stopped with a clear message. The
final checkpoint holds tensors and plain values only (`weights_only=True`),
and the backbone's weights whenever training changed them.

A head on fixed features is a pure function of its inputs (the features, the labels and `train.*`,
seeded, on one thread). The choose stage's finalists train exactly the head the feature_extraction
stage then trains for the winner, so `train_head` keeps the last few heads it trained in this process
and hands one back, with its history replayed, when the same inputs come again.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from components.backbones.classifier import GraftClassifier
from components.backbones.export import exported_extractor
from components.backbones.features import FeatureCache, OnnxFeatures
from components.backbones.spec import BackboneSpec
from components.backbones.unfreeze import Trainable, select_trainable
from components.backbones.zoo import get_spec
from components.choose.finalists import HeadTrial
from components.core.config import Params, TrainConfig
from components.core.errors import TrainingError
from components.data.split import Split
from components.train.collectives import weights_digest
from components.train.loop import (
    FitResult,
    MetricsCallback,
    Phase,
    ResumeStore,
    adamw,
    batch_indices,
    fit,
    make_criterion,
    optimizer_step,
    seed_everything,
    warn_if_imbalanced,
)
from components.train.network import NetworkSetup, build_model, labels_of, load_images, train_network
from components.train.trunk import training_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TrainedHead:
    head: dict[str, torch.Tensor]
    result: FitResult
    random_states: tuple[object, object, torch.Tensor]
    """Python's, numpy's and torch's global generators after training: a head handed back leaves them as
    training it again would have."""
    finished: tuple[str, dict] | None
    """The phase's finished checkpoint (phase name, content), which a head handed back writes to its own
    `ResumeStore`, as training would have: a stop in a later stage then does not train it again."""


class _KeepsFinished:
    """`fit`'s store for a head: writes through to the run's `ResumeStore` (when there is one) and keeps a copy
    of the finished checkpoint."""

    def __init__(self, store: ResumeStore | None) -> None:
        self.store, self.finished = store, None

    def path(self, phase: str) -> Path:
        return self.store.path(phase) if self.store is not None else Path(f"{phase}.pt")

    def load(self, phase: str) -> dict | None:
        return self.store.load(phase) if self.store is not None else None

    def save(self, phase: str, content: dict) -> None:
        if content["finished"]:
            self.finished = (phase, copy.deepcopy(content))
        if self.store is not None:
            self.store.save(phase, content)

    def clear(self) -> None:
        if self.store is not None:
            self.store.clear()


KEPT_HEADS = 4
"""Heads `train_head` keeps in this process (a linear head on 1,280 features and 10 classes: 51 KB)."""
_kept_heads: OrderedDict[str, _TrainedHead] = OrderedDict()
_kept_lock = threading.Lock()


def forget_trained_heads() -> None:
    """Empty the heads `train_head` keeps, so that the next one trains (a test's independent ground truth)."""
    with _kept_lock:
        _kept_heads.clear()


def _head_inputs(cfg: TrainConfig, *arrays: np.ndarray) -> str:
    """sha256 of everything `train_head` reads: the train settings and each array's type, shape and bytes."""
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    for array in arrays:
        digest.update(f"{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _trained_before(key: str, on_epoch: MetricsCallback | None,
                    store: ResumeStore | None) -> tuple[dict[str, torch.Tensor], FitResult] | None:
    with _kept_lock:
        kept = _kept_heads.get(key)
        if kept is not None:
            _kept_heads.move_to_end(key)
    if kept is None:
        return None
    log.info("head: the same features, labels and train settings as a head trained before in this process (in a run, "
             "the choose stage's winning finalist); its weights and %d epochs reused", len(kept.result.history))
    python_state, numpy_state, torch_state = kept.random_states
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if store is not None and kept.finished is not None:
        store.save(*kept.finished)
    if on_epoch:
        for epoch, row in enumerate(kept.result.history, 1):
            on_epoch(row, epoch)
    return {name: tensor.clone() for name, tensor in kept.head.items()}, kept.result


def _keep(key: str, head: dict[str, torch.Tensor], result: FitResult, finished: tuple[str, dict] | None) -> None:
    kept = _TrainedHead({name: tensor.clone() for name, tensor in head.items()}, result,
                        (random.getstate(), np.random.get_state(), torch.get_rng_state()), finished)
    with _kept_lock:
        _kept_heads[key] = kept
        while len(_kept_heads) > KEPT_HEADS:
            _kept_heads.popitem(last=False)


def train_head(
    params: Params,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    on_epoch: MetricsCallback | None = None,
    store: ResumeStore | None = None,
) -> tuple[dict[str, torch.Tensor], FitResult]:
    """Train a linear head on fixed features with early stopping on validation loss.

    A head trained before in this process on the same inputs (the module docstring) is handed back
    instead, its epochs replayed to `on_epoch`.

    Returns:
        The best head's state dict (standardisation folded in, so it takes raw features) and how
        training went.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    key = _head_inputs(params.train, train_x, train_y, val_x, val_y)
    trained = _trained_before(key, on_epoch, store)
    if trained is not None:
        return trained
    cfg = params.train
    seed_everything(cfg.seed)
    mean, scale = feature_standardisation(train_x)
    x, y = (torch.from_numpy(train_x) - mean) / scale, torch.from_numpy(train_y).long()
    vx, vy = (torch.from_numpy(val_x) - mean) / scale, torch.from_numpy(val_y).long()
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    warn_if_imbalanced(y, num_classes, cfg)
    head = nn.Linear(x.shape[1], num_classes)
    optimizer = adamw(head.parameters(), cfg.lr, cfg.weight_decay)
    criterion = make_criterion(cfg, y, num_classes)
    generator = torch.Generator().manual_seed(cfg.seed)

    def train_epoch() -> float:
        head.train()
        total = 0.0
        for index in batch_indices(y, num_classes, cfg, generator):
            loss = criterion(head(x[index]), y[index])
            optimizer_step(loss, optimizer, cfg, None)
            total += loss.item() * len(index)
        return total / len(x)

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        head.eval()
        logits = head(vx)
        return float(nn.functional.cross_entropy(logits, vy)), float((logits.argmax(1) == vy).float().mean())

    phase = Phase("head", head, optimizer, train_epoch, validate, cfg.epochs, cfg.patience, generator, images_per_epoch=len(x))
    # A batch through a linear head is a few small matrix products: extra threads only wait for each
    # other, far longer on a busy machine (2 cores with other work: 12 ms an epoch on one thread, 580 ms
    # on two). One thread also makes the head independent of the machine's core count.
    keeps = _KeepsFinished(store)
    with threadpool_limits(1):
        result = fit(phase, keeps, on_epoch)
    folded = fold_standardisation(head.state_dict(), mean, scale)
    _keep(key, folded, result, keeps.finished)
    return folded, result


def fit_finalist_head(params: Params, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> HeadTrial:
    """The choose stage's second round (`components.choose.finalists`): `train_head` on one finalist's
    features, so its validation accuracy is the one feature_extraction will reach with the same settings.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    _, result = train_head(params, train_x, train_y, val_x, val_y)
    best = result.history[result.best_epoch - 1]
    return HeadTrial(val_accuracy=float(best["val/accuracy"]), val_loss=result.best_val_loss, epochs=len(result.history))


def feature_standardisation(features: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale that standardise features for a well-conditioned head (folded in at the end).

    Features that never vary on the training images (dead units, common at small image sizes) get an
    infinite scale: the head cannot learn anything about them, so it ignores them rather than
    amplifying whatever value they take on new images. Other scales are floored at a tenth of the
    typical feature spread, so a nearly constant feature cannot be blown up either.
    """
    mean = torch.from_numpy(features.mean(axis=0)).float()
    std = torch.from_numpy(features.std(axis=0)).float()
    alive = std > 1e-6
    typical = std[alive].square().mean().sqrt() if alive.any() else torch.tensor(1.0)
    scale = torch.where(alive, std.clamp_min(0.1 * float(typical)), torch.tensor(math.inf))
    return mean, scale


def fold_standardisation(head: dict[str, torch.Tensor], mean: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rewrite W((f - mean) / scale) + b as W'f + b', so the deployed head takes raw features."""
    weight = head["weight"] / scale
    bias = head["bias"] - weight @ mean
    return {"weight": weight.contiguous(), "bias": bias}


@dataclass(frozen=True)
class Outcome:
    """What a strategy trained (the weights) and how the training went."""

    head: dict[str, torch.Tensor]
    backbone: dict[str, torch.Tensor] | None
    """The backbone's weights when training changed them; None when it is the pre-trained one."""
    fit: FitResult
    cached: int = 0
    """Feature rows read from the cache (0 when the cache was bypassed)."""
    computed: int = 0
    frozen_blocks: int = 0
    """Leading backbone blocks (the stem counted as one) that never trained while the rest did: scoring the
    model can then start from the cached trunk. 0 when the whole backbone trained or none of it did."""

    @property
    def digest(self) -> str:
        """A hash of the trained weights (the processes of a distributed run must agree on it)."""
        state = {f"head.{name}": tensor for name, tensor in self.head.items()}
        state.update({f"backbone.{name}": tensor for name, tensor in (self.backbone or {}).items()})
        return weights_digest(state)

    def to_dict(self) -> dict[str, object]:
        """Tensors and plain values only, so a distributed run can hand it over as a checkpoint."""
        out: dict[str, object] = {
            "head": self.head, "fit": self.fit.to_dict(), "cached": self.cached, "computed": self.computed, "frozen_blocks": self.frozen_blocks,
        }
        if self.backbone is not None:
            out["backbone"] = self.backbone
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> Outcome:
        return cls(raw["head"], raw.get("backbone"), FitResult.from_dict(raw["fit"]), raw["cached"], raw["computed"], raw.get("frozen_blocks", 0))


def feature_extractor(params: Params, spec: BackboneSpec, size: int) -> OnnxFeatures | None:
    """What computes the pre-trained backbone's missing feature rows: its exported graph on onnxruntime, as in
    the choose stage (`choose.onnx_features`), when that graph is cached; else eager PyTorch (None)."""
    if not params.choose.onnx_features:
        return None
    return exported_extractor(params.data.cache_dir, spec, size, params.train.seed, params.deploy.opset)


def _cached_head(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> Outcome:
    cache = FeatureCache(params.data.cache_dir, spec, size, seed=params.train.seed)
    extractor = feature_extractor(params, spec, size)
    train_x = cache.get([s.path for s in split.train], params.choose.batch_size, extractor=extractor)
    val_x = cache.get([s.path for s in split.val], params.choose.batch_size, extractor=extractor)
    if not (np.isfinite(train_x).all() and np.isfinite(val_x).all()):
        raise TrainingError(f"{spec.name} features contain NaN or inf at {size}px; choose another backbone or data.image_size")
    head, result = train_head(params, train_x, labels_of(split.train), val_x, labels_of(split.val), on_epoch, store)
    return Outcome(head, None, result, cache.hits, cache.misses)


def _outcome(model: GraftClassifier, result: FitResult, trainable: Trainable | None, previous: FitResult | None = None) -> Outcome:
    """The trained weights; `trainable` is what trained of the backbone (None: nothing)."""
    head = {k: v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}
    backbone = {k: v.detach().clone().contiguous() for k, v in model.backbone.state_dict().items()} if trainable else None
    frozen = trainable.total_blocks - trainable.blocks if trainable else 0
    return Outcome(head, backbone, result if previous is None else previous.then(result), frozen_blocks=frozen)


def _augmented_extraction(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> Outcome:
    log.info(
        "augmentation is on, so the feature cache is bypassed: every epoch sees new random crops, whose "
        "features must come from the frozen backbone each time (set train.augment=false for cached epochs)"
    )
    cfg = params.train
    data = load_images(split, size)
    model = build_model(spec, size, data.num_classes, cfg.seed)
    model.backbone.requires_grad_(False)
    seed_everything(cfg.seed)
    setup = NetworkSetup("head (frozen backbone)", None, cfg.lr, 0.0, True, schedule=False)
    result = train_network(model, data, params, setup, store, on_epoch)
    return _outcome(model, result, None)


def _fine_tune(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> Outcome:
    cfg = params.train
    model = build_model(spec, size, len(split.classes), cfg.seed)
    trainable = select_trainable(model.backbone, cfg.unfreeze, spec.name)
    data = training_data(params, split, spec, size, model, trainable)
    seed_everything(cfg.seed)
    setup = NetworkSetup("fine-tune", trainable, cfg.lr, cfg.lr * cfg.backbone_lr_ratio, cfg.freeze_bn, schedule=True)
    result = train_network(model, data, params, setup, store, on_epoch)
    return _outcome(model, result, trainable)


def _two_stage(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> Outcome:
    cfg = params.train
    model = build_model(spec, size, len(split.classes), cfg.seed)
    trainable = select_trainable(model.backbone, cfg.unfreeze, spec.name)  # a train.unfreeze it cannot meet: before stage 1
    log.info("two_stage, stage 1: the head alone on the frozen backbone")
    first = (_augmented_extraction if cfg.augment else _cached_head)(params, split, spec, size, store, on_epoch)
    model.head.load_state_dict(first.head)
    data = training_data(params, split, spec, size, model, trainable)
    seed_everything(cfg.seed + 1)
    low = cfg.lr * cfg.backbone_lr_ratio
    log.info("two_stage, stage 2: %s backbone blocks unfrozen, every trainable layer at lr %g", cfg.unfreeze, low)
    setup = NetworkSetup("stage 2 (unfrozen)", trainable, low, low, cfg.freeze_bn, schedule=True)
    result = train_network(model, data, params, setup, store, on_epoch, step_offset=len(first.fit.history))
    outcome = _outcome(model, result, trainable, previous=first.fit)
    if result.best_val_loss >= first.fit.best_val_loss:
        # early stopping's promise holds across both stages: the best weights seen are the ones kept
        log.warning(
            "two_stage: stage 2 never beat stage 1's val loss (%.4f >= %.4f); keeping the stage-1 model "
            "(pre-trained backbone, trained head). Try a lower train.backbone_lr_ratio or fewer train.unfreeze blocks",
            result.best_val_loss, first.fit.best_val_loss,
        )
        kept = replace(outcome.fit, best_epoch=first.fit.best_epoch, best_val_loss=first.fit.best_val_loss)
        return Outcome(first.head, None, kept, first.cached, first.computed)
    return replace(outcome, cached=first.cached, computed=first.computed)


def _scratch(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> Outcome:
    cfg = params.train
    data = load_images(split, size)
    model = build_model(spec, size, data.num_classes, cfg.seed)
    trainable = select_trainable(model.backbone, "all")
    seed_everything(cfg.seed)
    # random BatchNorm statistics mean nothing: they must be learned
    setup = NetworkSetup("scratch", trainable, cfg.lr, cfg.lr, freeze_bn=False, schedule=True)
    result = train_network(model, data, params, setup, store, on_epoch)
    return _outcome(model, result, trainable)


Strategy = Callable[[Params, Split, BackboneSpec, int, ResumeStore, MetricsCallback | None], Outcome]


def _strategy(cfg: TrainConfig) -> Strategy:
    if cfg.strategy == "feature_extraction":
        return _augmented_extraction if cfg.augment else _cached_head
    return {"fine_tune": _fine_tune, "two_stage": _two_stage, "scratch": _scratch}[cfg.strategy]


def run_strategy(params: Params, split: Split, backbone: str, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> Outcome:
    """Train `backbone` with `train.strategy` in this process (one of the processes of a distributed run)."""
    return _strategy(params.train)(params, split, get_spec(backbone), size, store, on_epoch)


def trains_through_network(cfg: TrainConfig) -> bool:
    """Whether epochs run images through the backbone (and so can be shared by several processes)."""
    return cfg.strategy != "feature_extraction" or cfg.augment
