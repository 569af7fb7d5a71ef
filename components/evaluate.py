"""Stage 3, evaluate: validation metrics, calibration, pictures, and the files DVC reads.

Everything is computed by Graft from the model's validation probabilities:
MLflow's built-in evaluator gives PyTorch and ONNX models no
probability-based metrics (log loss, top-k, calibration).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.calibration import (
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    reliability_bins,
    softmax,
)
from components.config import Params
from components.data import Split
from components.errors import DataError
from components.train import TrainResult, predict_logits

log = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "check_classes",
    "classification_metrics",
    "evaluate",
    "expected_calibration_error",
    "most_confident_mistakes",
    "predict_val",
    "val_logits",
    "write_json",
]


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics, the fitted temperature, and where the report files went."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    metrics_path: Path
    confusion_path: Path
    seconds: float
    temperature: float = 1.0
    """Softmax temperature deploy exports the model with (1.0 unless `evaluate.temperature_scaling`)."""
    reliability_path: Path | None = None
    misclassified_path: Path | None = None
    plot_data: tuple[Path, ...] = field(default=())
    """Plot data for `dvc plots` (confusion pairs, reliability curve), one JSON file each."""

    @property
    def pictures(self) -> tuple[Path, ...]:
        """Every PNG of the report, for MLflow and the model card."""
        return tuple(p for p in (self.confusion_path, self.reliability_path, self.misclassified_path) if p is not None)


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], top_k: int = 3, bins: int = 15
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Accuracy, balanced accuracy, macro-F1, top-k, log loss, ECE and per-class P/R/F1/support."""
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
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=indices, zero_division=0)),
        f"top{k}_accuracy": float((top == labels[:, None]).any(axis=1).mean()),
        "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=indices)),
        "ece": expected_calibration_error(probs, labels, bins),
    }
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    return metrics, per_class


def check_classes(split: Split, model_classes: tuple[str, ...]) -> None:
    """Make sure the validation split holds exactly the model's classes, each with images.

    Raises:
        DataError: naming the classes the validation data lacks or the model does not know.
    """
    missing = [c for c in model_classes if c not in split.classes]
    unknown = [c for c in split.classes if c not in model_classes]
    problems = []
    if missing:
        problems.append(f"it lacks classes the model knows: {', '.join(missing)}")
    if unknown:
        problems.append(f"it has classes the model does not know: {', '.join(unknown)}")
    if not problems and split.classes != model_classes:
        problems.append(f"its class order {list(split.classes)} differs from the model's {list(model_classes)}")
    counts = split.counts()["val"]
    empty = [name for name, count in counts.items() if count == 0 and name in model_classes]
    if empty:
        problems.append(f"it has no images of: {', '.join(empty)}")
    if problems:
        raise DataError(
            f"validation data in {split.root} does not match the model: {'; '.join(problems)}; "
            f"add {split.root}/val/<class> folders for exactly the model's classes ({', '.join(model_classes)}), "
            "or retrain on this data"
        )


def most_confident_mistakes(probs: np.ndarray, labels: np.ndarray, limit: int) -> list[int]:
    """Indices of wrongly classified images, the most confidently wrong first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.argsort(-probs[wrong, predicted[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:limit]]


def _figure_path(path: Path, fig) -> Path:  # noqa: ANN001 - matplotlib figure
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    return _figure_path(path, fig)


def plot_mistakes(paths: list[Path], labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], indices: list[int], path: Path) -> Path:
    """Save a grid of the given validation images titled with their true and predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if not indices:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified images among {len(labels)} validation images", ha="center", va="center")
        return _figure_path(path, fig)
    columns = min(4, len(indices))
    rows = -(-len(indices) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(2.2 * columns, 4.5), 2.5 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices, strict=False):
        with Image.open(paths[index]) as image:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        guess = int(probs[index].argmax())
        ax.set_title(f"true {classes[labels[index]]}\npred {classes[guess]} ({probs[index, guess]:.2f})", fontsize=8, color="#b30000")
    fig.suptitle(f"most confidently wrong validation images ({len(indices)} shown)", fontsize=10)
    return _figure_path(path, fig)


def write_json(path: Path, content: object) -> Path:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def val_logits(params: Params, split: Split, trained: TrainResult) -> np.ndarray:
    """Validation logits (before softmax and temperature) of the trained model: from cached features
    while the backbone is the pre-trained one, through the trained backbone once fine-tuning changed it."""
    return predict_logits(params, trained, [s.path for s in split.val])


def predict_val(params: Params, split: Split, trained: TrainResult) -> np.ndarray:
    """Validation probabilities of the trained model as saved (temperature 1)."""
    return softmax(val_logits(params, split, trained))


def _plot_data(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], bins: int, plots_dir: Path) -> tuple[Path, ...]:
    """Rows for `dvc plots`: one per image (true vs predicted class) and one per confidence bin."""
    predicted = probs.argmax(axis=1)
    confusion = [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(labels, predicted, strict=True)]
    curve = [
        {"confidence": round(r.confidence, 6), "accuracy": round(r.accuracy, 6), "count": r.count}
        for r in reliability_bins(probs, labels, bins)
    ]
    return (
        write_json(plots_dir / "confusion.json", confusion),
        write_json(plots_dir / "reliability.json", curve),
    )


def evaluate(params: Params, split: Split, trained: TrainResult, run_dir: Path) -> EvalResult:
    """Score the trained model on the validation split and write its report files."""
    started = time.perf_counter()
    cfg = params.evaluate
    check_classes(split, trained.classes)
    logits = val_logits(params, split, trained)
    labels = np.array([s.label for s in split.val])
    temperature = fit_temperature(logits, labels) if cfg.temperature_scaling else 1.0
    probs = softmax(logits, temperature)
    metrics, per_class = classification_metrics(probs, labels, split.classes, cfg.top_k, cfg.calibration_bins)
    metrics["temperature"] = temperature
    if cfg.temperature_scaling:
        raw, _ = classification_metrics(softmax(logits), labels, split.classes, cfg.top_k, cfg.calibration_bins)
        metrics["ece_uncalibrated"], metrics["log_loss_uncalibrated"] = raw["ece"], raw["log_loss"]
    log.info(
        "validation: accuracy %.4f, macro-F1 %.4f, ECE %.4f (temperature %.3f)",
        metrics["accuracy"], metrics["macro_f1"], metrics["ece"], temperature,
    )

    log.info("drawing the confusion matrix, reliability diagram and misclassified images")
    title = f"{trained.backbone}: val accuracy {metrics['accuracy']:.3f}"
    confusion = plot_confusion(labels, probs.argmax(1), split.classes, run_dir / "confusion_matrix.png", title)
    reliability = plot_reliability(
        reliability_bins(probs, labels, cfg.calibration_bins), cfg.calibration_bins, metrics["ece"],
        run_dir / "reliability_diagram.png", f"{trained.backbone}, temperature {temperature:.2f}",
    )
    mistakes = plot_mistakes(
        [s.path for s in split.val], labels, probs, split.classes,
        most_confident_mistakes(probs, labels, cfg.misclassified_images), run_dir / "misclassified.png",
    )
    plot_data = _plot_data(labels, probs, split.classes, cfg.calibration_bins, run_dir / "plots")
    metrics_path = write_json(run_dir / "metrics.json", {"val": metrics, "per_class": per_class})
    return EvalResult(
        metrics=metrics,
        per_class=per_class,
        metrics_path=metrics_path,
        confusion_path=confusion,
        seconds=time.perf_counter() - started,
        temperature=temperature,
        reliability_path=reliability,
        misclassified_path=mistakes,
        plot_data=plot_data,
    )
