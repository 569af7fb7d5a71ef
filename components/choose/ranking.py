"""Ranking the scored candidates: latency and size limits, the first round's order by score,
and the winner: the best-trained finalist (`settle`), or the best score when nothing was trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from components.choose.candidates import SAMPLE_IMAGES, CandidateScore
from components.choose.latency import cached_latency, measure_latency
from components.core.config import Params
from components.core.errors import ModelError

log = logging.getLogger(__name__)


BASELINE_STATUS = "baseline: reference only (choose.allow_baseline=false)"


@dataclass(frozen=True)
class ChooseResult:
    """The ranking and the winner."""

    chosen: str
    image_size: int
    score_name: str
    reason: str
    candidates: tuple[CandidateScore, ...]
    seconds: float
    score_pick: str | None = None
    """What the first-round score alone would have chosen (the same as `chosen` when nothing was trained)."""

    @property
    def trained(self) -> tuple[CandidateScore, ...]:
        """The finalists whose heads were trained, best validation accuracy first."""
        return tuple(sorted((r for r in self.candidates if r.trained_rank is not None), key=lambda r: r.trained_rank or 0))

    @property
    def score_regret(self) -> float | None:
        """Validation accuracy the first-round pick loses against the chosen finalist (0 when it is the
        chosen one), or None when the score's pick was not trained."""
        by_name = {row.name: row for row in self.trained}
        if not by_name or self.score_pick not in by_name:
            return None
        return round((by_name[self.chosen].val_accuracy or 0.0) - (by_name[self.score_pick].val_accuracy or 0.0), 6)


def _over_limits(params: Params, row: CandidateScore) -> list[str]:
    cfg = params.choose
    over = []
    if cfg.max_size_mb is not None and row.size_mb is not None and row.size_mb > cfg.max_size_mb:
        over.append(f"{row.size_mb:.1f} MB > choose.max_size_mb={cfg.max_size_mb:g}")
    worst = row.worst_latency_ms
    if cfg.max_latency_ms is not None and worst is not None:
        if worst > cfg.max_latency_ms:
            over.append(f"{worst:.1f} ms/image > choose.max_latency_ms={cfg.max_latency_ms:g}")
    return over


def measure_candidates(params: Params, rows: list[CandidateScore]) -> list[CandidateScore]:
    """Time every exported candidate on onnxruntime, one at a time, and mark those over a limit.

    Latency is measured here, after all scoring, because candidates scored in
    parallel would slow each other down and every figure would be wrong. Scoring
    is over by now, so the decoded sample (`SAMPLE_IMAGES`) is released first.
    """
    SAMPLE_IMAGES.clear()
    cfg = params.choose
    out = []
    for row in rows:
        if row.onnx_path is None or not Path(row.onnx_path).is_file():
            out.append(row)
            continue
        measured_at = None
        try:
            if cfg.latency_cache:
                timing, measured_at = cached_latency(Path(row.onnx_path), row.image_size or 0, cfg.latency_batch_size, cfg.latency_runs,
                                                     cfg.latency_quiet_cores)
            else:
                timing = measure_latency(Path(row.onnx_path), row.image_size or 0, cfg.latency_batch_size, cfg.latency_runs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            out.append(replace(row, status=f"skipped: onnxruntime cannot run its export ({exc})"))
            continue
        log.info(
            "%s: %.2f ms/image at batch 1, %.2f ms/image at batch %d on %s, %.1f MB%s",
            row.name, timing.batch1_ms, timing.batch_ms, timing.batch_size, timing.provider, row.size_mb or 0.0,
            f" (timed {measured_at} on this machine, same graph and runtime; choose.latency_cache=false times it again)"
            if measured_at else "",
        )
        row = replace(
            row, latency_ms=timing.batch1_ms, latency_batch_ms=timing.batch_ms, latency_batch_size=timing.batch_size
        )
        over = _over_limits(params, row)
        if over and row.status == "ok":
            row = replace(row, status="over limit: " + "; ".join(over))
        out.append(row)
    return out


def _limits_text(params: Params) -> str:
    cfg = params.choose
    parts = [
        f"{cfg.max_latency_ms:g} ms/image" if cfg.max_latency_ms is not None else "",
        f"{cfg.max_size_mb:g} MB" if cfg.max_size_mb is not None else "",
        f"{cfg.max_params_m:g}M params" if cfg.max_params_m is not None else "",
    ]
    parts = [p for p in parts if p]
    return f" within {', '.join(parts)}" if parts else ""


def rank(params: Params, rows: list[CandidateScore], seconds: float = 0.0) -> ChooseResult:
    """The first round: order candidates by score, number the eligible ones (`score_rank`) and pick the
    best eligible one (the winner when no finalists are trained, else `score_pick`).

    Raises:
        ModelError: no candidate could be scored within the limits.
    """
    scored = sorted((r for r in rows if r.status == "ok" and r.score is not None), key=lambda r: -r.score)
    eligible = [r for r in scored if r.pretrained or params.choose.allow_baseline]
    baselines = [r for r in scored if r not in eligible]
    if baselines and eligible and baselines[0].score > eligible[0].score:
        log.warning(
            "the random baseline %s outscores every pre-trained candidate (%.4f > %.4f): "
            "pre-training buys little on this data; consider other backbones or training from scratch",
            baselines[0].name, baselines[0].score, eligible[0].score,
        )
    baselines = [replace(r, status=BASELINE_STATUS) for r in baselines]
    others = baselines + [r for r in rows if r.status != "ok" or r.score is None]
    if not eligible:
        reasons = "; ".join(f"{r.name}: {r.status}" for r in rows)
        raise ModelError(
            f"no candidate backbone is eligible ({reasons}); fix one of them, relax a choose.max_* limit "
            "or change choose.candidates"
        )
    eligible = [replace(row, score_rank=place) for place, row in enumerate(eligible, 1)]
    best = eligible[0]
    reason = f"highest {score_label(params)} ({best.score:.4f}){_limits_text(params)} among {len(eligible)} eligible candidates"
    return ChooseResult(
        chosen=best.name,
        image_size=best.image_size or 0,
        score_name=params.choose.score,
        reason=reason,
        candidates=tuple(sorted(eligible + others, key=lambda r: (r.score is None, -(r.score or 0.0)))),
        seconds=seconds,
        score_pick=best.name,
    )


def score_label(params: Params) -> str:
    """How reports name the first-round score."""
    return "LogME" if params.choose.score == "logme" else "linear-probe accuracy"


def _ordinal(place: int) -> str:
    suffix = "th" if 10 <= place % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(place % 10, "th")
    return f"{place}{suffix}"


def settle(params: Params, ranking: ChooseResult, finalists: list[CandidateScore], seconds: float) -> ChooseResult:
    """The winner of the second round: the finalist with the best validation accuracy (ties: the lower
    validation loss, then the better score). Rows list the trained finalists first, best first.

    Raises:
        ModelError: no finalist could be trained.
    """
    trained = sorted(
        (row for row in finalists if row.val_accuracy is not None),
        key=lambda r: (-(r.val_accuracy or 0.0), r.val_loss if r.val_loss is not None else float("inf"), r.score_rank or 0),
    )
    if not trained:
        reasons = "; ".join(f"{r.name}: {r.status}" for r in finalists)
        raise ModelError(f"no finalist could be trained ({reasons}); fix one of them or set choose.finalists=1")
    trained = [replace(row, trained_rank=place) for place, row in enumerate(trained, 1)]
    settled = {row.name: row for row in trained + [r for r in finalists if r.val_accuracy is None]}
    rest = [row for row in ranking.candidates if row.name not in settled]
    best, others = trained[0], trained[1:]
    runners_up = f" ({', '.join(f'{r.name} {r.val_accuracy:.3f}' for r in others)})" if others else ""
    heads = f"the {len(trained)} finalists' heads" if others else "the only finalist's head that trained"
    reason = (
        f"validation accuracy {best.val_accuracy:.3f} after training {heads} on the whole training split{runners_up}; "
        f"{score_label(params)} ranked it {_ordinal(best.score_rank or 0)}{_limits_text(params)}"
    )
    log.info("chose %s: %s", best.name, reason)
    return replace(
        ranking,
        chosen=best.name,
        image_size=best.image_size or 0,
        reason=reason,
        candidates=tuple(list(settled.values()) + rest),
        seconds=seconds,
    )


def _cell(value: object, fmt: str, width: int) -> str:
    return f"{value:{fmt}}" if value is not None else f"{'-':>{width}}"


def ranking_table(rows: list[dict]) -> str:
    """The ranking (rows as in `CandidateScore.to_dict`) as a fixed-width text table for the terminal.

    `val acc` is a finalist's trained head on validation; `score #` is where the first-round score placed it.
    """
    lines = [
        f"{'#':>2}  {'backbone':<28} {'pretrained':<10} {'val acc':>7} {'score':>9} {'score #':>7} {'probe':>6} "
        f"{'params':>7} {'MB':>6} {'ms/img':>7}  status"
    ]
    for index, row in enumerate(rows, 1):
        params_m = f"{row['params_m']:6.1f}M" if row.get("params_m") is not None else f"{'-':>7}"
        lines.append(
            f"{index:>2}  {row['name']:<28} {str(row['pretrained']):<10} {_cell(row.get('val_accuracy'), '7.3f', 7)} "
            f"{_cell(row['score'], '9.4f', 9)} {_cell(row.get('score_rank'), '7d', 7)} "
            f"{_cell(row['probe_accuracy'], '6.3f', 6)} {params_m} {_cell(row.get('size_mb'), '6.1f', 6)} "
            f"{_cell(row.get('latency_ms'), '7.2f', 7)}  {row['status']}"
        )
    lines.append(sizes_line(rows))
    return "\n".join(lines)


def sizes_line(rows: list[dict]) -> str:
    """At which image side each candidate was scored, e.g. 'scored at 224px: resnet50, efficientnet_lite0; 160px: ...'
    (each backbone's own input size when data.image_size is null)."""
    by_size: dict[int, list[str]] = {}
    for row in rows:
        if row.get("image_size") and not str(row.get("status", "")).startswith("skipped"):  # a skipped one was never scored
            by_size.setdefault(row["image_size"], []).append(row["name"])
    return "scored at " + "; ".join(f"{size}px: {', '.join(names)}" for size, names in by_size.items())
