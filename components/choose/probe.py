"""A linear probe: how well a logistic regression on a candidate's features separates the classes.

The first round reports it beside LogME (and ranks by it with `choose.score: probe`): a multinomial
logistic regression with an L2 penalty (C = 0.5, the intercept not penalised) on standardised features,
fitted on two thirds of the sample and scored on the held-out third. It is fitted here directly with SciPy's
L-BFGS-B, the solver scikit-learn's `LogisticRegression` uses, on the objective it minimises, without
importing scikit-learn: the run would import it for this alone (1.5-2.8 s on 2 cores, in the middle of
the first round). tests/choose/test_probe.py compares the two.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

C = 0.5
"""Inverse strength of the L2 penalty, as scikit-learn's `C`: the loss summed over images plus |W|^2 / (2C)."""
HELD_OUT = 0.3
"""Share of the sample the probe is scored on (at least one image per class)."""


def stratified_holdout(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): about `size` rows held out, each class's share as in `labels`, and every
    class with at least one row on each side (each class needs two rows)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        take = int(np.clip(round(size * len(rows) / len(labels)), 1, len(rows) - 1))
        held.append(rows[:take])
        fit.append(rows[take:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, c: float = C) -> tuple[np.ndarray, np.ndarray]:
    """Weights (D x classes) and intercepts of the multinomial logistic regression minimising
    sum(cross-entropy) + |W|^2 / (2c), found with L-BFGS-B (SciPy's, as scikit-learn's default solver) to a
    projected gradient of 1e-6 on the objective divided by N. The problem is strictly convex: one optimum."""
    from scipy.optimize import minimize

    x = np.ascontiguousarray(x, dtype=np.float64)
    n, d = x.shape
    onehot = np.eye(classes)[y]
    penalty = 1.0 / (c * n)  # the objective divided by N: the same optimum, better scaled

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = flat[: d * classes].reshape(d, classes), flat[d * classes :]
        logits = x @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        probabilities = np.exp(logits - log_norm)
        loss = -np.sum(onehot * (logits - log_norm)) / n + 0.5 * penalty * np.sum(weights * weights)
        error = (probabilities - onehot) / n
        gradient = np.concatenate([(x.T @ error + penalty * weights).ravel(), error.sum(axis=0)])
        return float(loss), gradient

    found = minimize(objective, np.zeros(d * classes + classes), jac=True, method="L-BFGS-B",
                     options={"maxiter": 1000, "gtol": 1e-6, "ftol": 1e-12})
    return found.x[: d * classes].reshape(d, classes), found.x[d * classes :]


def span_coordinates(fit: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the `fit` and `other` rows in an orthonormal basis of the span of the centred fit rows.

    An L2-penalised linear model's weights lie in that span, so fitting on these coordinates (at most N-1 of
    them instead of D) gives the same predictions in fewer, cheaper steps. The basis comes from the N x N Gram
    matrix of the centred fit rows (their thin SVD's right singular vectors, without the D x D side).
    """
    centre = fit.mean(axis=0)
    fit, other = fit - centre, other - centre
    values, vectors = np.linalg.eigh(fit @ fit.T)
    keep = values > values.max(initial=0.0) * 1e-10
    basis = (fit.T @ vectors[:, keep]) / np.sqrt(values[keep])  # D x k, orthonormal columns
    return fit @ basis, other @ basis


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    """Accuracy of the probe on a held-out third of the sample (None if a class has fewer than two images)."""
    classes, encoded, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2 or len(labels) < 2 * len(classes):
        return None
    fit, held = stratified_holdout(encoded, max(len(classes), int(HELD_OUT * len(labels))), seed)
    x = np.asarray(features, dtype=np.float64)
    mean, scale = x[fit].mean(axis=0), x[fit].std(axis=0)
    scale[scale == 0] = 1.0
    x = (x - mean) / scale
    with threadpool_limits(1, user_api="blas"):  # small products: more BLAS threads only contend (1.0 s instead of 0.25)
        fit_x, held_x = span_coordinates(x[fit], x[held])
        weights, bias = fit_logistic(fit_x, encoded[fit], len(classes))
        predicted = np.argmax(held_x @ weights + bias, axis=1)
    return float(np.mean(predicted == encoded[held]))
