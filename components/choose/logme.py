"""LogME transferability score (You et al., "LogME: Practical Assessment of
Pre-trained Models for Transfer Learning", ICML 2021).

For each class, LogME fits a Bayesian linear regression from the features to
the class's one-hot target, maximises the marginal likelihood (evidence) over
the prior precision alpha and noise precision beta by the paper's fixed-point
iteration, and averages the per-sample log evidence over classes. Higher is
better; it needs one eigendecomposition and no training. With fewer samples
than feature dimensions (the usual case: a few hundred images, 1,280-2,048
features) the decomposition comes from the thin SVD of the N x D features,
O(N^2 D) instead of O(D^3); the D - N zero eigenvalues enter in closed form.
The fixed-point iteration runs in the eigenbasis: with F = U S V^T the posterior
mean is m = V c, so |m|^2 = |c|^2 and F m = (U S) c, and each step costs O(N k)
instead of O(N D) (k = min(N, D)); the values are the same to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

_EPS = 1e-5


@dataclass(frozen=True)
class Evidence:
    """The optimum found for one target."""

    log_evidence: float
    """log p(y | F, alpha, beta) / N at the optimum."""
    alpha: float
    beta: float


def _spectrum(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-trivial eigenvalues (k) of F^T F and the features in its eigenbasis, F V (N x k).

    The other D - k eigenvalues are 0. For N < D, F V = U S from the thin SVD.
    """
    n, d = features.shape
    if n < d:
        left, singular, _ = np.linalg.svd(features, full_matrices=False)
        return singular**2, left * singular
    eigvals, eigvecs = np.linalg.eigh(features.T @ features)
    return np.clip(eigvals, 0.0, None), features @ eigvecs


def _target_evidence(y: np.ndarray, dims: int, eigvals: np.ndarray, mapped: np.ndarray) -> Evidence:
    """The evidence optimum for target `y`, given `_spectrum`'s eigenvalues and F V of D = `dims` features.

    The posterior mean is m = V c with c = beta (alpha + beta eigvals)^-1 (F V)^T y, so
    m^T m = c^T c (V is orthonormal) and F m = (F V) c: m itself is never formed.
    """
    n, d = len(y), dims
    zeros = d - len(eigvals)  # eigenvalues of F^T F outside the computed spectrum, all exactly 0
    alpha, beta = 1.0, 1.0
    lam = alpha / beta
    projected = mapped.T @ y
    for _ in range(100):
        gamma = float((eigvals / (eigvals + lam)).sum())
        c = projected * beta / (alpha + beta * eigvals)
        alpha_de = float(c @ c)
        alpha = gamma / (alpha_de + _EPS)
        residual = float(((y - mapped @ c) ** 2).sum())
        beta = (n - gamma) / (residual + _EPS)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < 1e-4:
            lam = new_lam
            break
        lam = new_lam
    # evaluate at the final (alpha, beta) with the posterior mean that belongs to them
    c = projected * beta / (alpha + beta * eigvals)
    alpha_de = float(c @ c)
    residual = float(((y - mapped @ c) ** 2).sum())
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * (np.sum(np.log(alpha + beta * eigvals)) + zeros * np.log(alpha))
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
    # these matrices are small: one BLAS thread avoids OpenBLAS spin-waiting on busy cores (20x slower measured)
    with threadpool_limits(1, user_api="blas"):
        eigvals, mapped = _spectrum(features)
        classes = np.unique(labels)
        scores = [
            _target_evidence((labels == c).astype(np.float64), features.shape[1], eigvals, mapped).log_evidence
            for c in classes
        ]
    return float(np.mean(scores))


def evidence_for(features: np.ndarray, y: np.ndarray) -> Evidence:
    """The optimum (evidence, alpha, beta) for one real-valued target; exposed for tests."""
    features = np.asarray(features, dtype=np.float64)
    eigvals, mapped = _spectrum(features)
    return _target_evidence(np.asarray(y, dtype=np.float64), features.shape[1], eigvals, mapped)
