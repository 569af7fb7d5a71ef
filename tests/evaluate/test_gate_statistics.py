"""The gate's McNemar p-value, computed in exact integers, against scipy's binomial test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from components.evaluate.gate import mcnemar_p


def _pairs(only_challenger: int, only_champion: int, both: int = 7) -> tuple[np.ndarray, np.ndarray]:
    challenger = np.array([True] * only_challenger + [False] * only_champion + [True] * both + [False] * 3)
    champion = np.array([False] * only_challenger + [True] * only_champion + [True] * both + [False] * 3)
    return challenger, champion


@pytest.mark.parametrize("only_challenger", [0, 1, 2, 5, 9, 10, 17, 40, 300])
@pytest.mark.parametrize("only_champion", [0, 1, 3, 10, 11, 40, 290])
def test_mcnemar_p_is_scipys_exact_binomial_test(only_challenger, only_champion):
    p = mcnemar_p(*_pairs(only_challenger, only_champion))
    n = only_challenger + only_champion
    expected = 1.0 if n == 0 else binomtest(only_challenger, n, 0.5).pvalue
    assert p == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_models_that_err_on_the_same_images_are_not_told_apart():
    assert mcnemar_p(*_pairs(0, 0)) == 1.0
    assert mcnemar_p(*_pairs(6, 6)) == 1.0  # as many wins as losses
