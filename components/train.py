"""Stage 2, fine-tune: feature extraction (frozen backbone, new linear head).

The frozen backbone's features come from the feature cache, so each epoch
is a pass over a small matrix. Early stopping watches the validation loss
and the best head is kept. The checkpoint holds tensors and plain values
only, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from components.choose import ChooseResult
from components.config import Params
from components.data import Split
from components.errors import TrainingError
from components.features import FeatureCache
from components.model import GraftClassifier
from components.zoo import get_spec

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _epoch(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator) -> float:
    head.train()
    order = torch.randperm(len(x), generator=generator)
    total = 0.0
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(x[index]), y[index])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
    return total / len(x)


@torch.no_grad()
def _validate(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    head.eval()
    logits = head(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_head(
    params: Params,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    on_epoch: MetricsCallback | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train a linear head with early stopping on validation loss.

    Returns:
        The best head's state dict and the per-epoch history.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    cfg = params.train
    _seed_everything(cfg.seed)
    # standardise features for a well-conditioned problem; folded into the head at the end
    mean = torch.from_numpy(train_x.mean(axis=0))
    scale = torch.from_numpy(train_x.std(axis=0)).clamp_min(1e-6)
    x, y = (torch.from_numpy(train_x) - mean) / scale, torch.from_numpy(train_y).long()
    vx, vy = (torch.from_numpy(val_x) - mean) / scale, torch.from_numpy(val_y).long()
    head = nn.Linear(x.shape[1], int(max(train_y.max(), val_y.max())) + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_epoch, history = math.inf, 0, []
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    bar = tqdm(range(1, cfg.epochs + 1), desc="training head", unit="epoch", leave=False, disable=None)
    for epoch in bar:
        train_loss = _epoch(head, x, y, optimizer, cfg.batch_size, generator)
        val_loss, val_acc = _validate(head, vx, vy)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise TrainingError(
                f"training diverged at epoch {epoch} (train loss {train_loss}, val loss {val_loss}); "
                f"lower train.lr (now {cfg.lr}), e.g. --set train.lr={cfg.lr / 10:g}"
            )
        row = {"train/loss": train_loss, "val/loss": val_loss, "val/accuracy": val_acc, "lr": cfg.lr}
        history.append(row)
        if on_epoch:
            on_epoch(row, epoch)
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            log.info("early stop at epoch %d: no better val loss since epoch %d", epoch, best_epoch)
            break
    bar.close()
    return fold_standardisation(best_state, mean, scale), history


def fold_standardisation(head: dict[str, torch.Tensor], mean: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rewrite W((f - mean) / scale) + b as W'f + b', so the deployed head takes raw features."""
    weight = head["weight"] / scale
    bias = head["bias"] - weight @ mean
    return {"weight": weight.contiguous(), "bias": bias}


def save_checkpoint(path: Path, **content: object) -> Path:
    """Write a checkpoint atomically (tmp file + rename), so a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(content, tmp)
    tmp.replace(path)
    return path


def load_classifier(checkpoint_path: Path) -> tuple[GraftClassifier, dict[str, object]]:
    """Rebuild the full classifier (backbone + trained head) from a checkpoint."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    spec = get_spec(ckpt["backbone"])
    backbone = spec.build(ckpt["image_size"], seed=ckpt["seed"])
    head = ckpt["head"]
    model = GraftClassifier(backbone, head["weight"].shape[1], head["weight"].shape[0], spec.mean, spec.std)
    model.head.load_state_dict(head)
    return model.eval(), ckpt


def fine_tune(params: Params, split: Split, choice: ChooseResult, run_dir: Path, on_epoch: MetricsCallback | None = None) -> TrainResult:
    """Train a new head on the chosen backbone's cached features and save the checkpoint."""
    started = time.perf_counter()
    spec = get_spec(choice.chosen)
    size = choice.image_size
    log.info("fine-tune: %s at %dpx, strategy %s", spec.name, size, params.train.strategy)
    cache = FeatureCache(params.data.cache_dir, spec, size, seed=params.train.seed)
    backbone = spec.build(size, seed=params.train.seed)
    train_x = cache.get([s.path for s in split.train], params.choose.batch_size, backbone)
    val_x = cache.get([s.path for s in split.val], params.choose.batch_size, backbone)
    train_y = np.array([s.label for s in split.train])
    val_y = np.array([s.label for s in split.val])
    head_state, history = train_head(params, train_x, train_y, val_x, val_y, on_epoch)
    best = min(range(len(history)), key=lambda i: history[i]["val/loss"])
    path = save_checkpoint(
        run_dir / "model.pt",
        backbone=spec.name,
        image_size=size,
        seed=params.train.seed,
        classes=list(split.classes),
        head=head_state,
        strategy=params.train.strategy,
        history=history,
        config=params.model_dump(mode="json"),
    )
    return TrainResult(
        checkpoint_path=path,
        backbone=spec.name,
        image_size=size,
        classes=split.classes,
        strategy=params.train.strategy,
        epochs_run=len(history),
        best_epoch=best + 1,
        best_val_loss=history[best]["val/loss"],
        seconds=time.perf_counter() - started,
    )
