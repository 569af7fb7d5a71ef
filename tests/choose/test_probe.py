"""The first round's linear probe against scikit-learn's logistic regression, on real digit images."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from components.choose.probe import HELD_OUT, C, fit_logistic, probe_accuracy, span_coordinates, stratified_holdout
from tests.conftest import REPO


def _digits(rows: int, upscale: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `rows` of scikit-learn's 8x8 digits, each pixel repeated `upscale` x `upscale` times (more
    dimensions than images when upscale > 2, as backbone features on a sample are)."""
    images, labels = load_digits(return_X_y=True)
    images = images[:rows].reshape(-1, 8, 8)
    return np.stack([np.kron(image, np.ones((upscale, upscale))).ravel() for image in images]), labels[:rows]


def _standardised(features: np.ndarray, fit: np.ndarray) -> np.ndarray:
    mean, scale = features[fit].mean(axis=0), features[fit].std(axis=0)
    scale[scale == 0] = 1.0
    return (features - mean) / scale


@pytest.mark.parametrize(("rows", "upscale"), [(600, 1), (200, 3)])
@pytest.mark.parametrize("seed", [0, 42])
def test_probe_fits_what_scikit_learn_fits(rows, upscale, seed):
    features, labels = _digits(rows, upscale)
    fit, held = stratified_holdout(labels, int(HELD_OUT * len(labels)), seed)
    x = _standardised(features, fit)
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=20_000).fit(x[fit], labels[fit]).predict(x[held])

    fit_x, held_x = span_coordinates(x[fit], x[held])
    assert fit_x.shape[1] <= min(len(fit) - 1, features.shape[1])
    weights, bias = fit_logistic(fit_x, labels[fit], 10)
    assert np.array_equal(np.argmax(held_x @ weights + bias, axis=1), reference)
    assert probe_accuracy(features.astype(np.float32), labels, seed) == pytest.approx(np.mean(reference == labels[held]))


def test_holdout_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [40, 30, 20, 5, 2])
    fit, held = stratified_holdout(labels, 29, seed=3)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(labels)))
    assert set(labels[fit]) == set(labels[held]) == set(range(5))
    assert [int((labels[held] == c).sum()) for c in range(5)] == [12, 9, 6, 1, 1]
    again = stratified_holdout(labels, 29, seed=3)
    assert np.array_equal(again[1], held) and not np.array_equal(stratified_holdout(labels, 29, seed=4)[1], held)


def test_probe_needs_two_images_per_class():
    features, labels = _digits(60, 1)
    labels = labels.copy()
    labels[0] = 11  # a class with one image
    assert probe_accuracy(features, labels, 0) is None


def test_constant_features_give_the_majority_class():
    labels = np.repeat([0, 1], [30, 10])
    assert probe_accuracy(np.ones((40, 16), dtype=np.float32), labels, 0) == pytest.approx(0.75)


def test_scoring_a_candidate_does_not_import_scikit_learn():
    code = ("import sys, numpy as np; from components.choose.candidates import probe_accuracy;"
            " x, y = np.random.default_rng(0).normal(size=(40, 8)), np.repeat([0, 1], 20);"
            " assert probe_accuracy(x, y, 0) is not None; print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
