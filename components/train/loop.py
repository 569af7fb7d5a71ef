"""The epoch loop every strategy shares: early stopping, divergence, epoch checkpoints, resume.

A `Phase` is one stretch of training with one optimiser (two_stage has two).
`fit` runs it epoch by epoch: validate, keep the best weights by validation
loss, stop after `patience` epochs without improvement, and write a
checkpoint after every epoch (the weights that train, the best epoch's, optimiser,
scheduler, random-number state, history) atomically. Started again with the same inputs,
it continues from that checkpoint and ends with exactly the weights an
uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from components.core import progress
from components.core.config import TrainConfig
from components.core.errors import TrainingError
from components.core.files import atomic_write

log = logging.getLogger(__name__)


MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass
class Phase:
    """One stretch of training with one optimiser: what to step, and how to run and score an epoch."""

    name: str
    model: nn.Module
    """Whose weights are checkpointed and, at the end, reset to the best epoch's."""
    optimizer: torch.optim.Optimizer
    train_epoch: Callable[[], float]
    """Runs one epoch over the training data and returns its mean loss."""
    validate: Callable[[], tuple[float, float]]
    """Returns (validation loss, validation accuracy)."""
    epochs: int
    patience: int
    generator: torch.Generator
    """The shuffling generator; checkpointed with torch's global generator (augmentation, dropout)."""
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    lr_names: tuple[str, ...] = ("lr",)
    """Metric name of each optimiser parameter group's learning rate."""
    lr_setting: str = "train.lr"
    """The setting to lower when this phase diverges."""
    images_per_epoch: int = 0
    """Training images per epoch, for the `train/images_per_second` metric."""


@dataclass(frozen=True)
class FitResult:
    """How one phase went; its model holds the best epoch's weights."""

    history: tuple[dict[str, float], ...]
    best_epoch: int
    best_val_loss: float
    resumed_from: int
    """The epoch the run continued after, 0 when it started fresh."""

    def then(self, later: FitResult) -> FitResult:
        """This phase followed by `later` (two_stage): one history, epochs counted from this phase's first."""
        offset = len(self.history)
        resumed = offset + later.resumed_from if later.resumed_from else self.resumed_from
        return FitResult(self.history + later.history, later.best_epoch + offset, later.best_val_loss, resumed)

    def to_dict(self) -> dict[str, object]:
        """Plain values only (a checkpoint loads with `weights_only=True`)."""
        return {"history": list(self.history), "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss, "resumed_from": self.resumed_from}

    @classmethod
    def from_dict(cls, raw: dict) -> FitResult:
        return cls(tuple(raw["history"]), raw["best_epoch"], raw["best_val_loss"], raw["resumed_from"])


@dataclass
class ResumeStore:
    """Epoch checkpoints of one training run under `directory`, named by the run's input key."""

    directory: Path
    key: str
    enabled: bool = True
    config: dict = field(default_factory=dict)
    writer: bool = True
    """False in every training process but the first of a distributed run: it reads, never writes."""

    def path(self, phase: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", phase).strip("-")
        return self.directory / f"{self.key}-{slug}.pt"

    def load(self, phase: str) -> dict | None:
        """The phase's last checkpoint, or None (none yet, resume off, or unreadable)."""
        path = self.path(phase)
        if not self.enabled or not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means starting fresh
            log.warning("checkpoint %s is unreadable (%s); training from the start", path, exc)
            return None
        if state.get("key") != self.key:
            log.warning("checkpoint %s belongs to other inputs; training from the start", path)
            return None
        progress.checkpoint_kept()
        return state

    def save(self, phase: str, content: dict) -> Path:
        if not self.writer:
            return self.path(phase)
        saved = save_checkpoint(self.path(phase), key=self.key, config=self.config, **content)
        if self.enabled:  # a later run resumes from it (the interrupt's line says so)
            progress.checkpoint_kept()
        return saved

    def clear(self) -> None:
        """Remove this run's checkpoints (after success, or when it diverged)."""
        if not self.writer:
            return
        for path in self.directory.glob(f"{self.key}-*.pt"):
            path.unlink(missing_ok=True)


def save_checkpoint(path: Path, **content: object) -> Path:
    """Write a checkpoint atomically (tmp file + rename), so a crash never leaves a torn file; the tmp file is this
    process's own, since two runs with the same inputs (a manual run beside a scheduled one) share the checkpoint's key."""
    with atomic_write(path) as tmp, open(tmp, "wb") as file:  # a file object, so a full disk surfaces as OSError
        torch.save(content, file)
    return path


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's weights and buffers."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def frozen_parameters(model: nn.Module) -> list[str]:
    """Names of the model's parameters that do not train: they keep the values the model was built with."""
    return [name for name, parameter in model.named_parameters() if not parameter.requires_grad]


def _trained_part(weights: dict[str, torch.Tensor], frozen: list[str]) -> dict[str, torch.Tensor]:
    skip = set(frozen)
    return {name: tensor for name, tensor in weights.items() if name not in skip}


def _load_trained(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load checkpoint weights that may leave out the frozen parameters (those keep the values the model was
    built with: the same pre-trained weights, as the checkpoint's key says)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    untrained = set(frozen_parameters(model))
    if unexpected or not set(missing) <= untrained:
        raise TrainingError(
            f"checkpoint weights do not fit the model: missing {sorted(set(missing) - untrained)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}; delete the checkpoint (data.cache_dir/resume/) or set train.resume=false"
        )


def _snapshot(phase: Phase, frozen: list[str], epoch: int, best: dict, best_loss: float, best_epoch: int, history: list,
              finished: bool) -> dict:
    # the `frozen` parameters are left out: they are the pre-trained weights the rerun builds again (EfficientNet-Lite0
    # with `unfreeze: 3`: 24.6 MB a checkpoint instead of 39.7, written in 46 ms instead of 72; 2026-11-29 03:48 UTC)
    return {
        "phase": phase.name,
        "epoch": epoch,
        "finished": finished,
        "frozen": frozen,
        "model": _trained_part(phase.model.state_dict(), frozen),
        "best_model": _trained_part(best, frozen),
        "best_val_loss": best_loss,
        "best_epoch": best_epoch,
        "history": history,
        "optimizer": phase.optimizer.state_dict(),
        "scheduler": phase.scheduler.state_dict() if phase.scheduler else None,
        "scaler": phase.scaler.state_dict() if phase.scaler else None,
        "torch_rng": torch.get_rng_state(),
        "generator": phase.generator.get_state(),
    }


def _restore(phase: Phase, state: dict) -> None:
    _load_trained(phase.model, state["model"])
    phase.optimizer.load_state_dict(state["optimizer"])
    if phase.scheduler is not None and state["scheduler"] is not None:
        phase.scheduler.load_state_dict(state["scheduler"])
    if phase.scaler is not None and state["scaler"] is not None:
        phase.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    phase.generator.set_state(state["generator"])


def _diverged(phase: Phase, epoch: int, train_loss: float, val_loss: float) -> TrainingError:
    lr = phase.optimizer.param_groups[0]["lr"]
    return TrainingError(
        f"training diverged at epoch {epoch} of {phase.name} (train loss {train_loss}, val loss {val_loss}, "
        f"lr {lr:g}); nothing was registered: lower {phase.lr_setting}, e.g. --set {phase.lr_setting}="
        f"{_lower(lr)}, or set train.grad_clip"
    )


def _lower(lr: float) -> str:
    return f"{lr / 10:g}"


def fit(phase: Phase, store: ResumeStore | None = None, on_epoch: MetricsCallback | None = None, step_offset: int = 0) -> FitResult:
    """Train `phase` with early stopping; its model ends with the best epoch's weights.

    Args:
        phase: What to train.
        store: Where epoch checkpoints go (and a previous run's are resumed from); None for none.
        on_epoch: Called with each epoch's metrics and its step (`step_offset` + epoch), after the
            epoch's checkpoint is written; a resumed run first replays the epochs it skips.
        step_offset: Added to epoch numbers for `on_epoch` (two_stage's second stage continues the first).

    Raises:
        TrainingError: the loss became NaN or infinite; the message names the epoch and a lower lr.
    """
    history: list[dict[str, float]] = []
    best_loss, best_epoch, start = math.inf, 0, 1
    best = copy_state(phase.model)
    state = store.load(phase.name) if store else None
    frozen = frozen_parameters(phase.model)
    if state is not None and state.get("frozen", frozen) != frozen:
        log.warning("checkpoint %s froze other parameters than this run; training from the start", store.path(phase.name))
        state = None
    if state is not None:
        _restore(phase, state)
        history, best, best_loss, best_epoch = list(state["history"]), state["best_model"], state["best_val_loss"], state["best_epoch"]
        start = state["epoch"] + 1
        log.info(
            "resumed %s from its epoch-%d checkpoint %s (same data, backbone and train settings)",
            phase.name, state["epoch"], store.path(phase.name),
        )
        if on_epoch:
            for epoch, row in enumerate(history, 1):
                on_epoch(row, step_offset + epoch)
        if state["finished"]:
            _load_trained(phase.model, best)
            return FitResult(tuple(history), best_epoch, best_loss, state["epoch"])
    resumed_from = start - 1
    bar = tqdm(range(start, phase.epochs + 1), desc=phase.name, unit="epoch", leave=False, disable=None)
    last_logged = -math.inf
    for epoch in bar:
        progress.note(f"epoch {epoch} of {phase.epochs}" + (f" ({phase.name})" if phase.name not in ("head", "fine-tune", "scratch") else ""))
        lrs = [group["lr"] for group in phase.optimizer.param_groups]
        epoch_start = time.perf_counter()
        train_loss = phase.train_epoch()
        train_seconds = time.perf_counter() - epoch_start
        val_loss, val_acc = phase.validate()
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            if store:
                store.clear()
            raise _diverged(phase, epoch, train_loss, val_loss)
        row = {"train/loss": train_loss, "val/loss": val_loss, "val/accuracy": val_acc}
        row.update(zip(phase.lr_names, lrs, strict=True))
        row["train/images_per_second"] = phase.images_per_epoch / max(train_seconds, 1e-9)
        row["time/epoch_seconds"] = time.perf_counter() - epoch_start
        history.append(row)
        improved = val_loss < best_loss - 1e-6
        if improved:
            best_loss, best_epoch, best = val_loss, epoch, copy_state(phase.model)
        stop = not improved and epoch - best_epoch >= phase.patience
        if store:
            store.save(phase.name, _snapshot(phase, frozen, epoch, best, best_loss, best_epoch, history, stop or epoch == phase.epochs))
        if on_epoch:
            on_epoch(row, step_offset + epoch)
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        last_logged = _log_epoch(phase, epoch, row, last_logged, stop)
        if stop:
            log.info("%s: early stop at epoch %d, no better val loss since epoch %d", phase.name, epoch, best_epoch)
            break
    bar.close()
    _load_trained(phase.model, best)
    return FitResult(tuple(history), best_epoch, best_loss, resumed_from)


EPOCH_LOG_SECONDS = 1.0
"""Epoch lines are logged at most this often (a head on cached features runs hundreds of epochs a second)."""


def _log_epoch(phase: Phase, epoch: int, row: dict[str, float], last_logged: float, final: bool) -> float:
    """One log line per epoch, also where tqdm is off (output not a terminal); returns when it last logged."""
    now = time.monotonic()
    if not (final or epoch == phase.epochs or now - last_logged >= EPOCH_LOG_SECONDS):
        return last_logged
    log.info(
        "%s: epoch %d of %d, train loss %.4f, val loss %.4f, val accuracy %.3f, %.1f s, %.0f images/s",
        phase.name, epoch, phase.epochs, row["train/loss"], row["val/loss"], row["val/accuracy"],
        row["time/epoch_seconds"], row["train/images_per_second"],
    )
    return now


def seed_everything(seed: int) -> None:
    """Seed every generator training draws from (CPU results are then repeatable)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, n / (k * count), so every class weighs the same in the loss."""
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
    return len(labels) / (num_classes * counts)


def make_criterion(cfg: TrainConfig, labels: torch.Tensor, num_classes: int, device: str = "cpu") -> nn.CrossEntropyLoss:
    """Training loss: cross-entropy with the configured class weights and label smoothing."""
    weight = class_weights(labels, num_classes).to(device) if cfg.balance == "class_weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def batch_indices(labels: torch.Tensor, num_classes: int, cfg: TrainConfig, generator: torch.Generator, min_batch: int = 2) -> list[torch.Tensor]:
    """One epoch's mini-batches: a shuffle, or class-balanced draws with replacement (`balance: sampler`).

    A last batch smaller than `min_batch` joins the one before: BatchNorm cannot train on a single image,
    so with several processes each needs two images of every batch (`min_batch` = 2 x processes).
    """
    if cfg.balance == "sampler":
        per_class = torch.bincount(labels, minlength=num_classes).clamp_min(1).double()
        order = torch.multinomial(1.0 / per_class[labels], len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    batches = list(order.split(cfg.batch_size))
    if len(batches) > 1 and len(batches[-1]) < min_batch:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def warn_if_imbalanced(labels: torch.Tensor, num_classes: int, cfg: TrainConfig) -> None:
    counts = torch.bincount(labels, minlength=num_classes)
    if cfg.balance == "none" and counts.max() > 3 * counts.min().clamp_min(1):
        log.warning(
            "classes are imbalanced (%d to %d training images); consider --set train.balance=class_weights "
            "(or sampler)", int(counts.min()), int(counts.max()),
        )


def adamw(params: Iterable[torch.Tensor] | list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as every strategy trains with it, in PyTorch's fused implementation: one kernel updates all the
    parameters instead of a loop of small operations per parameter. A step of the cached trunk's tail (1.5M
    parameters of EfficientNet-Lite0) took 1.5 ms against 5.0 ms for the default and 4.5 ms for `foreach`
    (2 cores, 2026-11-29 02:59 UTC). `params` may be parameter groups with their own `lr`."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: TrainConfig, scaler: torch.amp.GradScaler | None) -> None:
    """Backward, optional gradient clipping (`train.grad_clip`), step; with loss scaling for float16."""
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr over `warmup_steps`, then cosine decay towards 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
