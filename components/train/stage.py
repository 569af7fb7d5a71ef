"""Stage 2, fine-tune: `fine_tune` trains the chosen backbone with `train.strategy` and saves the checkpoint.

It trains here or, with `train.processes` above 1, under torchrun (`components.train.launcher`);
`load_classifier` rebuilds the trained model from the checkpoint and `predict_logits` scores images with it.
The strategies themselves are in `components.train.strategies`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.backbones.classifier import GraftClassifier
from components.backbones.features import FeatureCache, cache_key, compute_features
from components.backbones.spec import BackboneSpec
from components.backbones.unfreeze import block_count, select_trainable
from components.backbones.zoo import get_spec
from components.choose.candidates import resolve_spec
from components.choose.ranking import ChooseResult
from components.core.config import Params
from components.core.errors import ConfigError, ModelError
from components.data.split import Split
from components.train.launcher import run_distributed
from components.train.loop import (
    MetricsCallback,
    ResumeStore,
    save_checkpoint,
)
from components.train.network import build_model, resolve_precision
from components.train.strategies import Outcome, feature_extractor, run_strategy, trains_through_network
from components.train.trunk import prepare_trunk_cache, trunk_features

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
    resume_key: str = ""
    """Names this run's epoch checkpoints: kept until the whole run succeeds (`forget_checkpoints`), so a run
    interrupted after training resumes without training again."""
    resumed_from_epoch: int = 0
    """The epoch an interrupted run continued after; 0 when it ran from the start."""
    features_cached: int = 0
    """Feature rows read from the cache (0 when the cache was bypassed)."""
    features_computed: int = 0
    history: tuple[dict[str, float], ...] = ()
    """Per-epoch metrics, as logged (`train/loss`, `val/loss`, `val/accuracy`, `lr`, ...)."""


def _train(params: Params, split: Split, spec: BackboneSpec, size: int, store: ResumeStore, run_dir: Path, on_epoch: MetricsCallback | None) -> Outcome:
    """Train here, or in `train.processes` processes under torchrun (`components.train.launcher`)."""
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
        cache.get([s.path for s in split.train + split.val], params.choose.batch_size, extractor=feature_extractor(params, spec, size))
    if cfg.strategy in ("fine_tune", "two_stage"):
        # likewise the cached trunk, when it applies: every process then reads it, none writes it
        model = build_model(spec, size, len(split.classes), cfg.seed)
        prepare_trunk_cache(params, split, spec, size, model, select_trainable(model.backbone, cfg.unfreeze, spec.name))
    raw = run_distributed(params, split, spec.name, size, store.key, run_dir / "distributed", on_epoch)
    return Outcome.from_dict(raw)


def check_unfreeze(params: Params) -> None:
    """Refuse a `train.unfreeze` that a candidate backbone cannot meet, before the run starts: found by the
    fine-tune stage, it would come after the whole choose stage. The stage checks the chosen one again.

    Raises:
        ConfigError: naming each candidate with fewer blocks, and the largest number every candidate meets.
    """
    cfg = params.train
    if cfg.strategy not in ("fine_tune", "two_stage") or cfg.unfreeze == "all":
        return
    counts = {}
    for name in dict.fromkeys(params.choose.candidates):
        spec = resolve_spec(params, name)
        counts[name] = block_count(spec, spec.resolve_size(params.data.image_size))
    short = {name: count for name, count in counts.items() if count is not None and count < cfg.unfreeze}
    if short:
        listed = ", ".join(f"{name} has {count}" for name, count in short.items())
        fits = min(count for count in counts.values() if count is not None)
        raise ConfigError(
            f"train.unfreeze={cfg.unfreeze} but {listed} blocks (stem included); "
            f"use a number up to {fits} (every candidate has that many) or --set train.unfreeze=all"
        )


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
        "train": [[s.digest, s.label] for s in split.train],
        "val": [[s.digest, s.label] for s in split.val],
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
    device = resolve_precision(cfg).device
    log.info("fine-tune: %s at %dpx, strategy %s, on %s", spec.name, size, cfg.strategy, device)
    store = ResumeStore(params.data.resume_dir, resume_key(params, split, spec, size), cfg.resume, params.model_dump(mode="json"))
    outcome = _train(params, split, spec, size, store, run_dir, on_epoch)
    content: dict[str, object] = {
        "backbone": spec.name,
        "image_size": size,
        "seed": cfg.seed,
        "classes": list(split.classes),
        "head": outcome.head,
        "strategy": cfg.strategy,
        "history": list(outcome.fit.history),
        "config": params.model_dump(mode="json"),
    }
    if outcome.backbone is not None:
        content["backbone_state"] = outcome.backbone
        content["frozen_blocks"] = outcome.frozen_blocks
    path = save_checkpoint(run_dir / "model.pt", **content)
    fitted = outcome.fit
    best = fitted.history[fitted.best_epoch - 1] if fitted.best_epoch else {}
    log.info(
        "fine-tune done: %d epochs, best epoch %d (val loss %.4f, val accuracy %.3f)",
        len(fitted.history), fitted.best_epoch, fitted.best_val_loss, best.get("val/accuracy", float("nan")),
    )
    return TrainResult(
        checkpoint_path=path,
        backbone=spec.name,
        image_size=size,
        classes=split.classes,
        strategy=cfg.strategy,
        epochs_run=len(fitted.history),
        best_epoch=fitted.best_epoch,
        best_val_loss=fitted.best_val_loss,
        seconds=time.perf_counter() - started,
        backbone_trained=outcome.backbone is not None,
        resume_key=store.key,
        resumed_from_epoch=fitted.resumed_from,
        features_cached=outcome.cached,
        features_computed=outcome.computed,
        history=fitted.history,
    )


def forget_checkpoints(params: Params, trained: TrainResult) -> None:
    """Remove the epoch checkpoints of a run that finished (registered): nothing is left to resume."""
    ResumeStore(params.data.resume_dir, trained.resume_key, params.train.resume).clear()


def predict_logits(params: Params, trained: TrainResult, paths: Sequence[Path]) -> np.ndarray:
    """Logits (before softmax and temperature) of the trained model on images.

    While the backbone is the pre-trained one (feature_extraction) its features come from the
    feature cache; once training changed it, they are computed through the trained backbone, from
    the cached trunk where its first blocks never trained (`train.cache_trunk`).
    """
    spec = get_spec(trained.backbone)
    if trained.backbone_trained:
        model, ckpt = load_classifier(trained.checkpoint_path)
        head = model.head
        features = _trained_features(params, model, spec, paths, trained.image_size, int(ckpt.get("frozen_blocks", 0)))
    else:  # the pre-trained backbone: only the head is read; the cache builds the backbone should it miss a row
        head = load_head(trained.checkpoint_path)
        cache = FeatureCache(params.data.cache_dir, spec, trained.image_size, seed=params.train.seed)
        features = cache.get(paths, params.choose.batch_size, extractor=feature_extractor(params, spec, trained.image_size))
    with torch.no_grad():
        return head(torch.from_numpy(features)).double().numpy()


def _trained_features(params: Params, model: GraftClassifier, spec: BackboneSpec, paths: Sequence[Path], size: int, frozen_blocks: int) -> np.ndarray:
    if frozen_blocks and params.train.cache_trunk:
        try:
            return trunk_features(params, model, spec, paths, size, frozen_blocks)
        except ModelError as exc:
            log.info("scoring through the whole trained backbone: %s", exc)
    return compute_features(model.backbone, spec, paths, size, params.choose.batch_size, "trained features")


def load_head(checkpoint_path: Path) -> torch.nn.Linear:
    """The trained head alone (features in, logits out), without building the backbone."""
    weights = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["head"]
    head = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    head.load_state_dict(weights)
    return head.eval()


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
