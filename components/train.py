"""Stage 2, fine-tune: every transfer strategy, one setting each (`train.strategy`).

- feature_extraction: the backbone frozen, a new linear head trained on cached
  features (each epoch is a pass over a small matrix). With augmentation on,
  the cache is bypassed and the head trains through the frozen backbone.
- fine_tune: the last `train.unfreeze` blocks train with the head, at
  `train.backbone_lr_ratio` of the head's learning rate, BatchNorm statistics
  frozen, warm-up then cosine decay.
- two_stage: the head first (frozen backbone, cached features), then the
  unfrozen blocks and the head together at a low learning rate.
- scratch: the same architecture randomly initialised, everything trained;
  BatchNorm statistics are recomputed on the training images before each
  validation, since running averages lag far behind fast-moving weights.

Every strategy shares one loop (`components.loop`): early stopping on
validation loss with the best weights restored, an atomic checkpoint every
epoch, resume after a crash, divergence stopped with a clear message. The
final checkpoint holds tensors and plain values only (`weights_only=True`),
and the backbone's weights whenever training changed them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.choose import ChooseResult
from components.config import Params, TrainConfig
from components.data import Split, file_md5
from components.distributed import run_distributed, weights_digest
from components.errors import TrainingError
from components.features import FeatureCache, cache_key, compute_features
from components.loop import (
    FitResult,
    MetricsCallback,
    Phase,
    ResumeStore,
    batch_indices,
    fit,
    make_criterion,
    optimizer_step,
    save_checkpoint,
    seed_everything,
    warn_if_imbalanced,
)
from components.model import GraftClassifier
from components.network import NetworkSetup, build_model, labels_of, load_images, resolve_precision, train_network
from components.unfreeze import select_trainable
from components.zoo import BackboneSpec, get_spec

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainResult:
    """Where the trained model is and how training went."""

    checkpoint_path: Path
    backbone: str
    image_size: int
    classes: tuple[str, ...]
    strategy: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    seconds: float
    backbone_trained: bool = False
    """True when training changed the backbone's weights (fine_tune, two_stage, scratch): features
    cached for the pre-trained backbone no longer describe this model."""
    resumed_from_epoch: int = 0
    """The epoch an interrupted run continued after; 0 when it ran from the start."""
    features_cached: int = 0
    """Feature rows read from the cache (0 when the cache was bypassed)."""
    features_computed: int = 0
    history: tuple[dict[str, float], ...] = ()
    """Per-epoch metrics, as logged (`train/loss`, `val/loss`, `val/accuracy`, `lr`, ...)."""


# --- feature extraction on cached features ----------------------------------------------------------


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

    Returns:
        The best head's state dict (standardisation folded in, so it takes raw features) and how
        training went.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    cfg = params.train
    seed_everything(cfg.seed)
    mean, scale = feature_standardisation(train_x)
    x, y = (torch.from_numpy(train_x) - mean) / scale, torch.from_numpy(train_y).long()
    vx, vy = (torch.from_numpy(val_x) - mean) / scale, torch.from_numpy(val_y).long()
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    warn_if_imbalanced(y, num_classes, cfg)
    head = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    result = fit(phase, store, on_epoch)
    return fold_standardisation(head.state_dict(), mean, scale), result


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
class _Outcome:
    head: dict[str, torch.Tensor]
    backbone: dict[str, torch.Tensor] | None
    history: tuple[dict[str, float], ...]
    best_epoch: int
    best_val_loss: float
    resumed_from: int
    cached: int = 0
    computed: int = 0

    @property
    def digest(self) -> str:
        """A hash of the trained weights (the processes of a distributed run must agree on it)."""
        state = {f"head.{name}": tensor for name, tensor in self.head.items()}
        state.update({f"backbone.{name}": tensor for name, tensor in (self.backbone or {}).items()})
        return weights_digest(state)

    def to_dict(self) -> dict[str, object]:
        """Tensors and plain values only, so a distributed run can hand it over as a checkpoint."""
        out = dict(self.__dict__)
        out["history"] = list(self.history)
        if self.backbone is None:
            del out["backbone"]
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> _Outcome:
        return cls(**{**raw, "backbone": raw.get("backbone"), "history": tuple(raw["history"])})


def _cached_head(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> _Outcome:
    cache = FeatureCache(params.data.cache_dir, spec, size, seed=params.train.seed)
    train_x = cache.get([s.path for s in split.train], params.choose.batch_size)
    val_x = cache.get([s.path for s in split.val], params.choose.batch_size)
    if not (np.isfinite(train_x).all() and np.isfinite(val_x).all()):
        raise TrainingError(f"{spec.name} features contain NaN or inf at {size}px; choose another backbone or data.image_size")
    head, result = train_head(params, train_x, labels_of(split.train), val_x, labels_of(split.val), on_epoch, store)
    return _Outcome(head, None, result.history, result.best_epoch, result.best_val_loss, result.resumed_from, cache.hits, cache.misses)


def _outcome(model: GraftClassifier, result: FitResult, backbone_trained: bool, previous: FitResult | None = None) -> _Outcome:
    history = (previous.history if previous else ()) + result.history
    head = {k: v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}
    backbone = {k: v.detach().clone().contiguous() for k, v in model.backbone.state_dict().items()} if backbone_trained else None
    if previous is None:
        resumed = result.resumed_from
    else:
        resumed = len(previous.history) + result.resumed_from if result.resumed_from else previous.resumed_from
    return _Outcome(head, backbone, history, result.best_epoch + (len(previous.history) if previous else 0), result.best_val_loss, resumed)


# --- the strategies ----------------------------------------------------------------------------------


def _augmented_extraction(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> _Outcome:
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
    result = train_network(model, data, params, setup, resolve_precision(cfg), store, on_epoch)
    return _outcome(model, result, backbone_trained=False)


def _fine_tune(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> _Outcome:
    cfg = params.train
    data = load_images(split, size)
    model = build_model(spec, size, data.num_classes, cfg.seed)
    trainable = select_trainable(model.backbone, cfg.unfreeze)
    seed_everything(cfg.seed)
    setup = NetworkSetup("fine-tune", trainable, cfg.lr, cfg.lr * cfg.backbone_lr_ratio, cfg.freeze_bn, schedule=True)
    result = train_network(model, data, params, setup, resolve_precision(cfg), store, on_epoch)
    return _outcome(model, result, backbone_trained=True)


def _two_stage(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> _Outcome:
    cfg = params.train
    log.info("two_stage, stage 1: the head alone on the frozen backbone")
    first = (_augmented_extraction if cfg.augment else _cached_head)(params, split, spec, size, store, on_epoch)
    data = load_images(split, size)
    model = build_model(spec, size, data.num_classes, cfg.seed)
    model.head.load_state_dict(first.head)
    trainable = select_trainable(model.backbone, cfg.unfreeze)
    seed_everything(cfg.seed + 1)
    low = cfg.lr * cfg.backbone_lr_ratio
    log.info("two_stage, stage 2: %s backbone blocks unfrozen, every trainable layer at lr %g", cfg.unfreeze, low)
    setup = NetworkSetup("stage 2 (unfrozen)", trainable, low, low, cfg.freeze_bn, schedule=True)
    stage1 = FitResult(first.history, first.best_epoch, first.best_val_loss, first.resumed_from)
    result = train_network(model, data, params, setup, resolve_precision(cfg), store, on_epoch, step_offset=len(first.history))
    outcome = _outcome(model, result, backbone_trained=True, previous=stage1)
    if result.best_val_loss >= first.best_val_loss:
        # early stopping's promise holds across both stages: the best weights seen are the ones kept
        log.warning(
            "two_stage: stage 2 never beat stage 1's val loss (%.4f >= %.4f); keeping the stage-1 model "
            "(pre-trained backbone, trained head). Try a lower train.backbone_lr_ratio or fewer train.unfreeze blocks",
            result.best_val_loss, first.best_val_loss,
        )
        return _Outcome(first.head, None, outcome.history, first.best_epoch, first.best_val_loss, outcome.resumed_from, first.cached, first.computed)
    return _Outcome(**{**outcome.__dict__, "cached": first.cached, "computed": first.computed})


def _scratch(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> _Outcome:
    cfg = params.train
    data = load_images(split, size)
    model = build_model(spec, size, data.num_classes, cfg.seed)
    trainable = select_trainable(model.backbone, "all")
    seed_everything(cfg.seed)
    # random BatchNorm statistics mean nothing: they must be learned
    setup = NetworkSetup("scratch", trainable, cfg.lr, cfg.lr, freeze_bn=False, schedule=True)
    result = train_network(model, data, params, setup, resolve_precision(cfg), store, on_epoch)
    return _outcome(model, result, backbone_trained=True)


Strategy = Callable[[Params, Split, BackboneSpec, int, ResumeStore, MetricsCallback | None], _Outcome]


def _strategy(cfg: TrainConfig) -> Strategy:
    if cfg.strategy == "feature_extraction":
        return _augmented_extraction if cfg.augment else _cached_head
    return {"fine_tune": _fine_tune, "two_stage": _two_stage, "scratch": _scratch}[cfg.strategy]


def run_strategy(params: Params, split: Split, backbone: str, size: int, store: ResumeStore, on_epoch: MetricsCallback | None) -> _Outcome:
    """Train `backbone` with `train.strategy` in this process (one of the processes of a distributed run)."""
    return _strategy(params.train)(params, split, get_spec(backbone), size, store, on_epoch)


def trains_through_network(cfg: TrainConfig) -> bool:
    """Whether epochs run images through the backbone (and so can be shared by several processes)."""
    return cfg.strategy != "feature_extraction" or cfg.augment


def _train(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, run_dir: Path, on_epoch: MetricsCallback | None) -> _Outcome:
    """Train here, or in `train.processes` processes under torchrun (`components.distributed`)."""
    cfg = params.train
    if cfg.processes == 1:
        return run_strategy(params, split, spec.name, size, store, on_epoch)
    if not trains_through_network(cfg):
        log.info(
            "train.processes=%d is not used by feature_extraction on cached features: a linear head on a feature "
            "matrix trains in seconds in one process", cfg.processes,
        )
        return run_strategy(params, split, spec.name, size, store, on_epoch)
    if cfg.strategy == "two_stage" and not cfg.augment:
        # stage 1 reads cached features in every process; compute them once, here, first
        cache = FeatureCache(params.data.cache_dir, spec, size, seed=cfg.seed)
        cache.get([s.path for s in split.train + split.val], params.choose.batch_size)
    raw = run_distributed(params, split, spec.name, size, store.key, run_dir / "distributed", on_epoch)
    return _Outcome.from_dict(raw)


def training_spec(strategy: str, chosen: str) -> BackboneSpec:
    """The backbone a strategy trains: the chosen one, or its random twin for scratch."""
    if strategy == "scratch":
        return get_spec(f"random_{chosen.removeprefix('random_')}")
    return get_spec(chosen)


def resume_key(params: Params, split: Split, spec: BackboneSpec, size: int) -> str:
    """A name for this run's inputs: the images and labels (by md5), the backbone and the train settings."""
    settings = params.train.model_dump(mode="json")
    settings.pop("resume")
    payload = {
        "train_settings": settings,
        "backbone": cache_key(spec, size, params.train.seed),
        "classes": list(split.classes),
        "train": [[file_md5(s.path), s.label] for s in split.train],
        "val": [[file_md5(s.path), s.label] for s in split.val],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec.name}-{params.train.strategy}-{size}px-{digest}"


def fine_tune(params: Params, split: Split, choice: ChooseResult, run_dir: Path, on_epoch: MetricsCallback | None = None) -> TrainResult:
    """Train the chosen backbone with `train.strategy` and save the checkpoint `load_classifier` reads.

    Raises:
        TrainingError: training diverged (nothing is saved), or the setup is impossible.
    """
    started = time.perf_counter()
    cfg = params.train
    spec = training_spec(cfg.strategy, choice.chosen)
    size = choice.image_size
    precision = resolve_precision(cfg)
    log.info("fine-tune: %s at %dpx, strategy %s, on %s", spec.name, size, cfg.strategy, precision.describe())
    store = ResumeStore(params.data.cache_dir / "resume", resume_key(params, split, spec, size), cfg.resume, params.model_dump(mode="json"))
    outcome = _train(params, split, spec, size, store, run_dir, on_epoch)
    content: dict[str, object] = {
        "backbone": spec.name,
        "image_size": size,
        "seed": cfg.seed,
        "classes": list(split.classes),
        "head": outcome.head,
        "strategy": cfg.strategy,
        "history": list(outcome.history),
        "config": params.model_dump(mode="json"),
    }
    if outcome.backbone is not None:
        content["backbone_state"] = outcome.backbone
    path = save_checkpoint(run_dir / "model.pt", **content)
    store.clear()
    best = outcome.history[outcome.best_epoch - 1] if outcome.best_epoch else {}
    log.info(
        "fine-tune done: %d epochs, best epoch %d (val loss %.4f, val accuracy %.3f)",
        len(outcome.history), outcome.best_epoch, outcome.best_val_loss, best.get("val/accuracy", float("nan")),
    )
    return TrainResult(
        checkpoint_path=path,
        backbone=spec.name,
        image_size=size,
        classes=split.classes,
        strategy=cfg.strategy,
        epochs_run=len(outcome.history),
        best_epoch=outcome.best_epoch,
        best_val_loss=outcome.best_val_loss,
        seconds=time.perf_counter() - started,
        backbone_trained=outcome.backbone is not None,
        resumed_from_epoch=outcome.resumed_from,
        features_cached=outcome.cached,
        features_computed=outcome.computed,
        history=outcome.history,
    )


def predict_logits(params: Params, trained: TrainResult, paths: Sequence[Path]) -> np.ndarray:
    """Logits (before softmax and temperature) of the trained model on images.

    While the backbone is the pre-trained one (feature_extraction) its features come from the
    feature cache; once training changed it, they are computed through the trained backbone.
    """
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    if trained.backbone_trained:
        features = compute_features(model.backbone, spec, paths, trained.image_size, params.choose.batch_size, "trained features")
    else:
        cache = FeatureCache(params.data.cache_dir, spec, trained.image_size, seed=params.train.seed)
        features = cache.get(paths, params.choose.batch_size, model.backbone)
    with torch.no_grad():
        return model.head(torch.from_numpy(features)).double().numpy()


def load_classifier(checkpoint_path: Path) -> tuple[GraftClassifier, dict[str, object]]:
    """Rebuild the full classifier (backbone, trained where the strategy trained it, and head)."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    spec = get_spec(ckpt["backbone"])
    backbone = spec.build(ckpt["image_size"], seed=ckpt["seed"])
    if "backbone_state" in ckpt:
        backbone.load_state_dict(ckpt["backbone_state"])
    head = ckpt["head"]
    model = GraftClassifier(backbone, head["weight"].shape[1], head["weight"].shape[0], spec.mean, spec.std)
    model.head.load_state_dict(head)
    return model.eval(), ckpt
