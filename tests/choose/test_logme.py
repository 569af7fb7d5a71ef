"""LogME against an independent computation: the Gaussian marginal likelihood of
Bayesian linear regression, y ~ N(0, I/beta + F F^T / alpha), evaluated directly."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from components.choose.logme import evidence_for, logme


def _direct_log_evidence(features, y, alpha, beta):
    n = len(y)
    cov = np.eye(n) / beta + features @ features.T / alpha
    return multivariate_normal(mean=np.zeros(n), cov=cov).logpdf(y) / n


@pytest.fixture
def regression():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 5))
    weights = np.array([1.5, -2.0, 0.0, 0.5, 1.0])
    y = features @ weights + rng.normal(scale=0.3, size=60)
    return features, y


def test_evidence_equals_the_direct_gaussian_marginal_likelihood(regression):
    features, y = regression
    found = evidence_for(features, y)
    assert found.log_evidence == pytest.approx(_direct_log_evidence(features, y, found.alpha, found.beta), rel=1e-6)


def test_fixed_point_is_a_maximum_of_the_evidence(regression):
    features, y = regression
    found = evidence_for(features, y)
    best = _direct_log_evidence(features, y, found.alpha, found.beta)
    for a_factor, b_factor in [(0.5, 1), (2, 1), (1, 0.5), (1, 2), (0.7, 1.4)]:
        assert _direct_log_evidence(features, y, found.alpha * a_factor, found.beta * b_factor) < best


def test_recovers_the_noise_level(regression):
    features, y = regression
    # noise sd 0.3 -> precision ~ 11; the posterior estimate should be in that neighbourhood
    assert 5 < evidence_for(features, y).beta < 25


def test_informative_features_outscore_noise():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 25)
    informative = np.eye(4)[labels] * 3 + rng.normal(scale=0.5, size=(100, 4))
    informative = np.hstack([informative, rng.normal(size=(100, 12))])
    noise = rng.normal(size=(100, 16))
    assert logme(informative, labels) > logme(noise, labels) + 0.1


def test_nan_features_are_rejected():
    features = np.ones((4, 2))
    features[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        logme(features, np.array([0, 0, 1, 1]))


def test_fewer_samples_than_dimensions_matches_the_direct_likelihood():
    """N < D takes the thin-SVD path; its evidence must still be the exact Gaussian marginal likelihood."""
    rng = np.random.default_rng(2)
    features = rng.normal(size=(30, 80))
    y = features[:, :3] @ np.array([1.0, -1.0, 0.5]) + rng.normal(scale=0.2, size=30)
    found = evidence_for(features, y)
    assert found.log_evidence == pytest.approx(_direct_log_evidence(features, y, found.alpha, found.beta), rel=1e-6)


def test_svd_and_eigh_paths_agree_on_the_same_subspace():
    """Padding features with zero columns (N < D afterwards) changes nothing but the path taken."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 10)
    narrow = np.eye(3)[labels] + rng.normal(scale=0.5, size=(30, 3))
    wide = np.hstack([narrow, np.zeros((30, 40))])
    assert logme(wide, labels) == pytest.approx(logme(narrow, labels), rel=1e-6)
