"""How well the first-round score predicted the trained finalists: Kendall's tau-b against scipy's."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import kendalltau

from components.choose.report import kendall_tau_b


def test_kendall_tau_b_is_scipys_with_and_without_ties():
    rng = random.Random(0)
    for size in range(2, 9):
        for _ in range(40):
            x = [rng.randint(1, size) for _ in range(size)]  # ties in both rankings, often
            y = rng.sample(range(1, size + 1), size) if rng.random() < 0.5 else [rng.randint(1, 3) for _ in range(size)]
            expected = kendalltau(x, y).statistic
            got = kendall_tau_b(x, y)
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12), (x, y)


def test_kendall_tau_b_of_equal_and_reversed_rankings():
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
