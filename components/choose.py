"""Stage 1, choose: rank candidate backbones on a sample of the user's own data.

Each candidate's features are extracted once (and cached) on a stratified
sample of the training split, then scored with LogME and a quick held-out
linear probe. A candidate that cannot load, or breaks a limit, is listed with
the reason and not chosen; the others are still ranked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from components.config import Params
from components.data import Sample, Split
from components.errors import DataError, GraftError, ModelError
from components.features import FeatureCache
from components.logme import logme
from components.zoo import get_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateScore:
    """One row of the ranking."""

    name: str
    pretrained: bool
    status: str
    """'ok', or why the candidate was not eligible ('over limit: ...', 'skipped: ...')."""
    score: float | None = None
    logme: float | None = None
    probe_accuracy: float | None = None
    params_m: float | None = None
    image_size: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["params"] = int(self.params_m * 1e6) if self.params_m is not None else None
        return out


@dataclass(frozen=True)
class ChooseResult:
    """The ranking and the winner."""

    chosen: str
    image_size: int
    score_name: str
    reason: str
    candidates: tuple[CandidateScore, ...]
    seconds: float


def stratified_sample(samples: tuple[Sample, ...], size: int, seed: int) -> list[Sample]:
    """Up to `size` samples with every class represented in proportion (at least 2 each when possible)."""
    if len(samples) <= size:
        return list(samples)
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    picked: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(len(members), max(2, round(size * len(members) / len(samples))))
        picked += rng.choice(members, size=take, replace=False).tolist()
    return [samples[i] for i in sorted(picked)]


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    """Accuracy of a logistic-regression probe on a held-out third of the sample (None if too small)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2 or len(labels) < 2 * len(counts):
        return None
    x_fit, x_test, y_fit, y_test = train_test_split(
        features, labels, test_size=max(len(counts), int(0.3 * len(labels))), stratify=labels, random_state=seed
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.5))
    probe.fit(x_fit, y_fit)
    return float(probe.score(x_test, y_test))


def score_candidate(params: Params, split: Split, name: str) -> CandidateScore:
    """Extract features for one candidate on the choose sample and score them.

    Never raises for a candidate-specific problem: the row records it instead.
    """
    spec = get_spec(name)
    size = spec.resolve_size(params.data.image_size)
    base = {"name": name, "pretrained": spec.pretrained, "params_m": spec.params_m, "image_size": size}
    limit = params.choose.max_params_m
    if limit is not None and spec.params_m > limit:
        return CandidateScore(**base, status=f"over limit: {spec.params_m:.1f}M params > choose.max_params_m={limit}")
    missing = spec.missing_weights()
    if missing:
        log.warning("%s skipped: %s", name, missing)
        return CandidateScore(**base, status=f"skipped: {missing}")
    started = time.perf_counter()
    sample = stratified_sample(split.train, params.choose.sample_size, params.data.seed)
    labels = np.array([s.label for s in sample])
    try:
        cache = FeatureCache(params.data.cache_dir, spec, size, seed=params.train.seed)
        features = cache.get([s.path for s in sample], batch_size=params.choose.batch_size)
        if not np.isfinite(features).all():
            return CandidateScore(**base, status="skipped: its features contain NaN or inf")
        evidence = logme(features, labels)
        probe = probe_accuracy(features, labels, params.data.seed)
    except (ModelError, DataError):
        raise
    except (GraftError, RuntimeError, ValueError) as exc:
        log.warning("%s failed to score: %s", name, exc)
        return CandidateScore(**base, status=f"skipped: failed to score ({exc})")
    score = evidence if params.choose.score == "logme" else probe
    seconds = time.perf_counter() - started
    log.info("%s: LogME %.4f, probe accuracy %s (%.1fs)", name, evidence, probe, seconds)
    return CandidateScore(**base, status="ok", score=score, logme=evidence, probe_accuracy=probe, seconds=seconds)


def rank(params: Params, rows: list[CandidateScore], seconds: float = 0.0) -> ChooseResult:
    """Order candidates best first and pick the best eligible one.

    Raises:
        ModelError: no candidate could be scored.
    """
    scored = sorted((r for r in rows if r.status == "ok" and r.score is not None), key=lambda r: -r.score)
    eligible = [r for r in scored if r.pretrained or params.choose.allow_baseline]
    baselines = [r for r in scored if r not in eligible]
    if baselines and eligible and baselines[0].score > eligible[0].score:
        log.warning(
            "the random baseline %s outscores every pre-trained candidate (%.4f > %.4f): "
            "pre-training buys little on this data; consider `train.strategy` scratch or other backbones",
            baselines[0].name, baselines[0].score, eligible[0].score,
        )
    baselines = [
        CandidateScore(**{**r.__dict__, "status": "baseline: reference only (choose.allow_baseline=false)"}) for r in baselines
    ]
    others = baselines + [r for r in rows if r.status != "ok" or r.score is None]
    if not eligible:
        reasons = "; ".join(f"{r.name}: {r.status}" for r in rows)
        raise ModelError(f"no candidate backbone could be scored ({reasons}); fix one of them or change choose.candidates")
    best = eligible[0]
    score_name = "LogME" if params.choose.score == "logme" else "linear-probe accuracy"
    limits = f" within {params.choose.max_params_m}M params" if params.choose.max_params_m else ""
    reason = f"highest {score_name}{limits} ({best.score:.4f}) among {len(eligible)} scored candidates"
    return ChooseResult(
        chosen=best.name,
        image_size=best.image_size or 0,
        score_name=params.choose.score,
        reason=reason,
        candidates=tuple(sorted(eligible + others, key=lambda r: (r.score is None, -(r.score or 0.0)))),
        seconds=seconds,
    )


def choose_model(params: Params, split: Split) -> ChooseResult:
    """Score every candidate in `choose.candidates` and return the ranking."""
    for name in params.choose.candidates:
        get_spec(name)  # unknown names fail before any work starts
    started = time.perf_counter()
    rows = [score_candidate(params, split, name) for name in params.choose.candidates]
    return rank(params, rows, time.perf_counter() - started)


def ranking_table(rows: list[dict]) -> str:
    """The ranking (rows as in `CandidateScore.to_dict`) as a fixed-width text table for the terminal."""
    lines = [f"{'#':>2}  {'backbone':<28} {'pretrained':<10} {'score':>9} {'probe':>6} {'params':>7}  status"]
    for index, row in enumerate(rows, 1):
        score = f"{row['score']:9.4f}" if row["score"] is not None else f"{'-':>9}"
        probe = f"{row['probe_accuracy']:6.3f}" if row["probe_accuracy"] is not None else f"{'-':>6}"
        params_m = f"{row['params_m']:6.1f}M" if row["params_m"] is not None else f"{'-':>7}"
        lines.append(f"{index:>2}  {row['name']:<28} {str(row['pretrained']):<10} {score} {probe} {params_m}  {row['status']}")
    return "\n".join(lines)
