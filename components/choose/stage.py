"""Stage 1, choose: rank candidate backbones on the user's own data, then train the best few.

    plan_candidates -> score_candidate (per name, on a sample; the flow maps it over Prefect tasks)
        -> measure_candidates (one at a time) -> rank (by score, within the limits)
        -> train_finalists (the `choose.finalists` best: a head on the whole split) -> settle

`choose_model` is that order, the one place it is written down: `graft run` passes a
`score_all` that maps the candidates over Prefect tasks, everything else scores them here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from components.choose.candidates import CandidateScore, plan_candidates, score_candidate
from components.choose.finalists import FitHead, TrainOne, pick_finalists, train_finalists
from components.choose.ranking import ChooseResult, measure_candidates, rank, settle
from components.core.config import Params
from components.data.split import Split

log = logging.getLogger(__name__)


ScoreAll = Callable[[Sequence[str]], list[CandidateScore]]
"""Scores every named candidate (in order), e.g. as parallel tasks; default: one after another here."""


def choose_model(
    params: Params, split: Split, score_all: ScoreAll | None = None, fit_head: FitHead | None = None,
    train_one: TrainOne | None = None,
) -> ChooseResult:
    """Score every candidate in `choose.candidates` on a sample, time the eligible ones, rank them, and
    train the `choose.finalists` best: the best validation accuracy wins.

    Args:
        params: The run's parameters.
        split: The training and validation images.
        score_all: Scores the named candidates (default: one after another in this process).
        fit_head: The fine-tune stage's head trainer for the finalists
            (`functools.partial(components.train.strategies.fit_finalist_head, params)`); needed
            whenever more than one eligible candidate reaches the second round, unless `train_one` is given.
        train_one: Trains one finalist's head (`components.choose.finalists.train_finalist` with `fit_head`),
            e.g. as a cached task; default: here, one after another.

    Raises:
        ConfigError: an unknown candidate name.
        DataError: the training split cannot rank anything.
        ModelError: no candidate is eligible, or no finalist could be trained.
        ValueError: finalists are to be trained and neither `fit_head` nor `train_one` was given.
    """
    names = plan_candidates(params, split)
    started = time.perf_counter()
    log.info("choose, round 1: scoring %d candidates on a sample of the training split", len(names))
    rows = [score_candidate(params, split, name) for name in names] if score_all is None else list(score_all(names))
    rows = measure_candidates(params, rows)
    ranking = rank(params, rows, time.perf_counter() - started)
    finalists = pick_finalists(params, ranking.candidates)
    if len(finalists) < 2:
        return ranking
    if fit_head is None and train_one is None:
        raise ValueError(
            f"choose.finalists={params.choose.finalists} trains finalists' heads: pass "
            "fit_head=functools.partial(components.train.strategies.fit_finalist_head, params), or a train_one that "
            "trains with it, as flows.training does"
        )
    log.info("choose, round 2: training the heads of %s on the whole training split", ", ".join(r.name for r in finalists))
    trained = train_finalists(params, split, finalists, fit_head, train_one)
    return settle(params, ranking, trained, time.perf_counter() - started)
