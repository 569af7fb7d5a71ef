"""Stage 1, choose: rank candidate backbones on a sample of the user's own data.

    plan_candidates -> score_candidate (per name; the flow maps it over Prefect tasks)
        -> measure_candidates (one at a time) -> rank

`choose_model` is that order, the one place it is written down: `graft run` passes a
`score_all` that maps the candidates over Prefect tasks, everything else scores them here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from components.choose.candidates import CandidateScore, plan_candidates, score_candidate
from components.choose.ranking import ChooseResult, measure_candidates, rank
from components.core.config import Params
from components.data.split import Split

ScoreAll = Callable[[Sequence[str]], list[CandidateScore]]
"""Scores every named candidate (in order), e.g. as parallel tasks; default: one after another here."""


def choose_model(params: Params, split: Split, score_all: ScoreAll | None = None) -> ChooseResult:
    """Score every candidate in `choose.candidates`, time the eligible ones, and rank them.

    Raises:
        ConfigError: an unknown candidate name.
        DataError: the training split cannot rank anything.
        ModelError: no candidate is eligible.
    """
    names = plan_candidates(params, split)
    started = time.perf_counter()
    if score_all is None:
        rows = [score_candidate(params, split, name) for name in names]
    else:
        rows = list(score_all(names))
    rows = measure_candidates(params, rows)
    return rank(params, rows, time.perf_counter() - started)
