"""Stage 3, evaluate: `evaluate` scores the trained model on the validation split.

Metrics (`components.evaluate.metrics`), calibration and the optional temperature
(`components.evaluate.calibration`), the pictures and the files DVC reads
(`components.evaluate.plots`). Everything is computed by Graft from the model's
validation probabilities: MLflow's built-in evaluator gives PyTorch and ONNX models no
probability-based metrics (log loss, top-k, calibration).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.core.config import Params
from components.core.files import write_json
from components.data.split import Split
from components.evaluate.calibration import fit_temperature, reliability_bins, softmax
from components.evaluate.metrics import check_classes, classification_metrics, most_confident_mistakes
from components.evaluate.plots import plot_confusion, plot_mistakes, plot_reliability, write_plot_data
from components.train.stage import TrainResult, predict_logits

log = logging.getLogger(__name__)


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


def val_logits(params: Params, split: Split, trained: TrainResult) -> np.ndarray:
    """Validation logits (before softmax and temperature) of the trained model: from cached features
    while the backbone is the pre-trained one, through the trained backbone once fine-tuning changed it."""
    return predict_logits(params, trained, [s.path for s in split.val])


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
    plot_data = write_plot_data(labels, probs, split.classes, cfg.calibration_bins, run_dir / "plots")
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
