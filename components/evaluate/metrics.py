"""Classification metrics from predicted probabilities: one implementation, numpy only.

The evaluate stage, the ONNX evaluation of `dvc repro` and the champion gate all
count with these functions.
"""

from __future__ import annotations

import numpy as np

from components.core.errors import DataError
from components.data.split import Split
from components.evaluate.calibration import expected_calibration_error


def confusion(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """numerator / denominator, `empty` where the denominator is 0 (scikit-learn's zero_division)."""
    numerator, denominator = numerator.astype(float), denominator.astype(float)
    return np.divide(numerator, denominator, out=np.full(numerator.shape, empty), where=denominator > 0)


def per_class_scores(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """Precision, recall, F1 and support per class; 0 where a class has no true or no predicted image."""
    matrix = confusion(predicted, labels, num_classes)
    tp, predicted_as, support = np.diag(matrix), matrix.sum(axis=0), matrix.sum(axis=1)
    f1 = _ratio(2 * tp, predicted_as + support)  # 2tp / (2tp + fp + fn)
    return _ratio(tp, predicted_as), _ratio(tp, support), f1, support


def score(predicted: np.ndarray, labels: np.ndarray, metric: str, num_classes: int) -> float:
    """Accuracy or macro-F1 (a class without true or predicted images counts as F1 0, as in scikit-learn)."""
    if metric == "accuracy":
        return float((predicted == labels).mean())
    return float(per_class_scores(predicted, labels, num_classes)[2].mean())


def class_recall(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class's images classified right (NaN for a class without images)."""
    matrix = confusion(predicted, labels, num_classes)
    return _ratio(np.diag(matrix), matrix.sum(axis=1), empty=np.nan)


LOG_LOSS_EPS = float(np.finfo(np.float32).eps)
"""Probabilities are clipped into [eps, 1 - eps] at float32's resolution, whatever their type: the exported model's
float32 output and the run's float64 softmax of the same logits then give the same log loss. Clipped at each one's
own type (as scikit-learn does), one confident mistake among 276 test images put the two 0.04 apart."""


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class), probabilities clipped into [`LOG_LOSS_EPS`, 1 - `LOG_LOSS_EPS`]."""
    clipped = np.clip(probs.astype(np.float64), LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    return float(-np.log(clipped[np.arange(len(labels)), labels]).mean())


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], top_k: int = 3, bins: int = 15
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Accuracy, balanced accuracy, macro-F1, top-k, log loss, ECE and per-class P/R/F1/support."""
    predicted = probs.argmax(axis=1)
    k = min(top_k, len(classes))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    precision, recall, f1, support = per_class_scores(predicted, labels, len(classes))
    metrics = {
        "accuracy": score(predicted, labels, "accuracy", len(classes)),
        "balanced_accuracy": float(recall[support > 0].mean()),  # classes with images only
        "macro_f1": float(f1.mean()),
        f"top{k}_accuracy": float((top == labels[:, None]).any(axis=1).mean()),
        "log_loss": log_loss(probs, labels),
        "ece": expected_calibration_error(probs, labels, bins),
    }
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    return metrics, per_class


def check_classes(split: Split, model_classes: tuple[str, ...], parts: tuple[str, ...] = ("val", "test")) -> None:
    """Make sure the held-out parts hold exactly the model's classes, each with images.

    Raises:
        DataError: naming the classes the held-out data lacks or the model does not know.
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
    counts = split.counts()
    for part in parts:
        empty = [name for name, count in counts[part].items() if count == 0 and name in model_classes]
        if empty and (part != "test" or not split.test_is_val):
            problems.append(f"its {part} split has no images of: {', '.join(empty)}")
    if problems:
        raise DataError(
            f"held-out data in {split.root} does not match the model: {'; '.join(problems)}; "
            f"add images of exactly the model's classes ({', '.join(model_classes)}), or retrain on this data"
        )


def most_confident_mistakes(probs: np.ndarray, labels: np.ndarray, limit: int) -> list[int]:
    """Indices of wrongly classified images, the most confidently wrong first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.argsort(-probs[wrong, predicted[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:limit]]
