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
from components.data.split import Sample, Split
from components.evaluate.calibration import fit_temperature, reliability_bins, softmax
from components.evaluate.metrics import check_classes, classification_metrics, most_confident_mistakes
from components.evaluate.plots import plot_confusion, plot_mistakes, plot_reliability, write_plot_data
from components.train.stage import TrainResult, predict_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Validation and test metrics, the fitted temperature, and where the report files went."""

    val: dict[str, float]
    """On the validation split, which chose the epoch and fitted the temperature: optimistic."""
    test: dict[str, float]
    """On the test split, which nothing looked at before: what the gate and the reports use."""
    per_class: dict[str, dict[str, float]]
    """Per-class precision, recall, F1 and support on the test split."""
    metrics_path: Path
    confusion_path: Path
    seconds: float
    temperature: float = 1.0
    """Softmax temperature deploy exports the model with (1.0 unless `evaluate.temperature_scaling`)."""
    reliability_path: Path | None = None
    misclassified_path: Path | None = None
    plot_data: tuple[Path, ...] = field(default=())
    """Plot data for `dvc plots` (confusion pairs, reliability curve), one JSON file each."""
    test_is_val: bool = False
    """No separate test split (data.test_fraction=0): the test metrics are validation metrics."""

    @property
    def pictures(self) -> tuple[Path, ...]:
        """Every PNG of the report, for MLflow and the model card."""
        return tuple(p for p in (self.confusion_path, self.reliability_path, self.misclassified_path) if p is not None)

    @property
    def test_label(self) -> str:
        """How reports name the test split: 'test', or what it really is when there is none."""
        return "test (= validation: data.test_fraction=0)" if self.test_is_val else "test"


def logits_of(params: Params, trained: TrainResult, samples: tuple[Sample, ...]) -> np.ndarray:
    """Logits (before softmax and temperature) of the trained model: from cached features while the
    backbone is the pre-trained one, through the trained backbone once fine-tuning changed it."""
    return predict_logits(params, trained, [s.path for s in samples])


def _metrics(params: Params, classes: tuple[str, ...], logits: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[dict, dict]:
    cfg = params.evaluate
    metrics, per_class = classification_metrics(softmax(logits, temperature), labels, classes, cfg.top_k, cfg.calibration_bins)
    metrics["temperature"] = temperature
    if cfg.temperature_scaling:
        raw, _ = classification_metrics(softmax(logits), labels, classes, cfg.top_k, cfg.calibration_bins)
        metrics["ece_uncalibrated"], metrics["log_loss_uncalibrated"] = raw["ece"], raw["log_loss"]
    return metrics, per_class


def evaluate(params: Params, split: Split, trained: TrainResult, run_dir: Path) -> EvalResult:
    """Fit the temperature on validation, score the trained model on validation and test, write the test report."""
    started = time.perf_counter()
    cfg = params.evaluate
    check_classes(split, trained.classes)
    val_logits, val_labels = logits_of(params, trained, split.val), np.array([s.label for s in split.val])
    temperature = fit_temperature(val_logits, val_labels) if cfg.temperature_scaling else 1.0
    val, _ = _metrics(params, split.classes, val_logits, val_labels, temperature)
    tested = split.evaluation
    logits = val_logits if split.test_is_val else logits_of(params, trained, tested)
    labels = np.array([s.label for s in tested])
    test, per_class = _metrics(params, split.classes, logits, labels, temperature)
    part = "validation (no test split)" if split.test_is_val else "test"
    log.info("validation: accuracy %.4f, macro-F1 %.4f; %s: accuracy %.4f, macro-F1 %.4f, ECE %.4f (temperature %.3f)",
             val["accuracy"], val["macro_f1"], part, test["accuracy"], test["macro_f1"], test["ece"], temperature)

    log.info("drawing the confusion matrix, reliability diagram and misclassified images of the %s split", part)
    probs = softmax(logits, temperature)
    title = f"{trained.backbone}: {part} accuracy {test['accuracy']:.3f}"
    confusion = plot_confusion(labels, probs.argmax(1), split.classes, run_dir / "confusion_matrix.png", title)
    reliability = plot_reliability(
        reliability_bins(probs, labels, cfg.calibration_bins), cfg.calibration_bins, test["ece"],
        run_dir / "reliability_diagram.png", f"{trained.backbone}, {part}, temperature {temperature:.2f}",
    )
    mistakes = plot_mistakes(
        [s.path for s in tested], labels, probs, split.classes,
        most_confident_mistakes(probs, labels, cfg.misclassified_images), run_dir / "misclassified.png", part,
    )
    plot_data = write_plot_data(labels, probs, split.classes, cfg.calibration_bins, run_dir / "plots")
    metrics_path = write_json(run_dir / "metrics.json", {"val": val, "test": test, "per_class": per_class,
                                                         "test_is_val": split.test_is_val})
    return EvalResult(
        val=val, test=test, per_class=per_class, metrics_path=metrics_path, confusion_path=confusion,
        seconds=time.perf_counter() - started, temperature=temperature, reliability_path=reliability,
        misclassified_path=mistakes, plot_data=plot_data, test_is_val=split.test_is_val,
    )
