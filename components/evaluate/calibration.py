"""Calibration: how far confidence is from accuracy, and a temperature that closes the gap.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one scalar
T fitted to minimise the negative log-likelihood on held-out data. It never
changes which class wins, only how sure the model says it is, so it can be
fitted after training and shipped inside the exported model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from components.core.errors import CalibrationError

log = logging.getLogger(__name__)


# Search range of T; outside it the fit is degenerate (all-correct or all-wrong validation sets).
MIN_TEMPERATURE = 0.05


MAX_TEMPERATURE = 20.0


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin of a reliability diagram."""

    low: float
    high: float
    confidence: float
    """Mean top-1 probability of the images in the bin."""
    accuracy: float
    """Share of those images whose top-1 class is right."""
    count: int


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`, stable for large logits."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[ReliabilityBin]:
    """Group images by top-1 confidence into `bins` equal-width bins (low, high]; empty bins are left out."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            rows.append(
                ReliabilityBin(
                    float(low), float(high), float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())
                )
            )
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| per confidence bin, averaged with the bins' sizes as weights."""
    total = len(labels)
    return float(sum(row.count / total * abs(row.accuracy - row.confidence) for row in reliability_bins(probs, labels, bins)))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(true class) of `softmax(logits / temperature)`."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the NLL of `softmax(logits / T)` on these labels.

    Raises:
        CalibrationError: there are no labelled rows, or the logits are not finite.
    """
    from scipy.optimize import minimize_scalar

    if len(labels) == 0 or logits.shape[0] != len(labels):
        raise CalibrationError(
            f"temperature scaling needs validation logits and labels of the same length, got {logits.shape[0]} "
            f"and {len(labels)}; add validation images or set evaluate.temperature_scaling=false"
        )
    if not np.isfinite(logits).all():
        raise CalibrationError(
            "validation logits contain NaN or infinity; the model is broken, so no temperature can be fitted "
            "(set evaluate.temperature_scaling=false to see its metrics anyway)"
        )
    # optimise log T: the NLL is smooth and unimodal in it for any fixed logits
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(np.exp(result.x))
    if not MIN_TEMPERATURE * 1.01 < temperature < MAX_TEMPERATURE * 0.99:
        log.warning(
            "temperature scaling hit its limit (T=%.3g): the validation predictions are all right or near chance, "
            "so the fitted temperature says little; check the model's accuracy", temperature,
        )
    log.info(
        "temperature scaling: T=%.3f, validation NLL %.4f -> %.4f",
        temperature, negative_log_likelihood(logits, labels), negative_log_likelihood(logits, labels, temperature),
    )
    return temperature
