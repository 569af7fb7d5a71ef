"""Stage 3, evaluate: validation metrics, a confusion-matrix picture, `metrics.json` for DVC."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import Params
from components.data import Split
from components.features import FeatureCache
from components.train import TrainResult, load_classifier
from components.zoo import get_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics and where their files went."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    metrics_path: Path
    confusion_path: Path
    seconds: float


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], top_k: int = 3) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Accuracy, balanced accuracy, macro-F1, top-k, log loss, ECE and per-class P/R/F1."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
    )

    indices = list(range(len(classes)))
    predicted = probs.argmax(axis=1)
    k = min(top_k, len(classes))
    top = np.argsort(-probs, axis=1)[:, :k]
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=indices, zero_division=0)),
        f"top{k}_accuracy": float((top == labels[:, None]).any(axis=1).mean()),
        "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=indices)),
        "ece": expected_calibration_error(probs, labels),
    }
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    return metrics, per_class


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> Path:
    """Save a confusion-matrix PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    side = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(path: Path, content: object) -> Path:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def predict_val(params: Params, split: Split, trained: TrainResult) -> np.ndarray:
    """Validation probabilities of the trained model (cached features + head)."""
    import torch

    model, _ = load_classifier(trained.checkpoint_path)
    cache = FeatureCache(params.data.cache_dir, get_spec(trained.backbone), trained.image_size, seed=params.train.seed)
    features = torch.from_numpy(cache.get([s.path for s in split.val], params.choose.batch_size, model.backbone))
    with torch.no_grad():
        return torch.softmax(model.head(features) / model.temperature, dim=1).numpy()


def evaluate(params: Params, split: Split, trained: TrainResult, run_dir: Path) -> EvalResult:
    """Score the trained model on the validation split and write its report files."""
    started = time.perf_counter()
    probs = predict_val(params, split, trained)
    labels = np.array([s.label for s in split.val])
    metrics, per_class = classification_metrics(probs, labels, split.classes, params.evaluate.top_k)
    log.info("validation: accuracy %.4f, macro-F1 %.4f", metrics["accuracy"], metrics["macro_f1"])
    confusion = plot_confusion(
        labels, probs.argmax(1), split.classes, run_dir / "confusion_matrix.png",
        f"{trained.backbone}: val accuracy {metrics['accuracy']:.3f}",
    )
    metrics_path = write_json(run_dir / "metrics.json", {"val": metrics})
    return EvalResult(metrics, per_class, metrics_path, confusion, time.perf_counter() - started)
