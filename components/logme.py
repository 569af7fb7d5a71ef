"""LogME transferability score (You et al., "LogME: Practical Assessment of
Pre-trained Models for Transfer Learning", ICML 2021).

For each class, LogME fits a Bayesian linear regression from the features to
the class's one-hot target, maximises the marginal likelihood (evidence) over
the prior precision alpha and noise precision beta by the paper's fixed-point
iteration, and averages the per-sample log evidence over classes. Higher is
better; it needs one eigendecomposition and no training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-5


@dataclass(frozen=True)
class Evidence:
    """The optimum found for one target."""

    log_evidence: float
    """log p(y | F, alpha, beta) / N at the optimum."""
    alpha: float
    beta: float


def _target_evidence(y: np.ndarray, features: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray) -> Evidence:
    n, d = features.shape
    alpha, beta = 1.0, 1.0
    lam = alpha / beta
    projected = eigvecs.T @ (features.T @ y)
    for _ in range(100):
        gamma = float((eigvals / (eigvals + lam)).sum())
        m = eigvecs @ (projected * beta / (alpha + beta * eigvals))
        alpha_de = float(m @ m)
        alpha = gamma / (alpha_de + _EPS)
        residual = float(((y - features @ m) ** 2).sum())
        beta = (n - gamma) / (residual + _EPS)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < 1e-4:
            lam = new_lam
            break
        lam = new_lam
    # evaluate at the final (alpha, beta) with the posterior mean that belongs to them
    m = eigvecs @ (projected * beta / (alpha + beta * eigvals))
    alpha_de = float(m @ m)
    residual = float(((y - features @ m) ** 2).sum())
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * np.sum(np.log(alpha + beta * eigvals))
        - beta / 2.0 * residual
        - alpha / 2.0 * alpha_de
        - n / 2.0 * np.log(2 * np.pi)
    )
    return Evidence(float(evidence) / n, float(alpha), float(beta))


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class LogME of `features` (N x D) for integer `labels` (N).

    Raises:
        ValueError: features contain NaN/inf, or shapes disagree.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    eigvals, eigvecs = np.linalg.eigh(features.T @ features)
    eigvals = np.clip(eigvals, 0.0, None)
    classes = np.unique(labels)
    scores = [
        _target_evidence((labels == c).astype(np.float64), features, eigvals, eigvecs).log_evidence for c in classes
    ]
    return float(np.mean(scores))


def evidence_for(features: np.ndarray, y: np.ndarray) -> Evidence:
    """The optimum (evidence, alpha, beta) for one real-valued target; exposed for tests."""
    features = np.asarray(features, dtype=np.float64)
    eigvals, eigvecs = np.linalg.eigh(features.T @ features)
    return _target_evidence(np.asarray(y, dtype=np.float64), features, np.clip(eigvals, 0.0, None), eigvecs)
