"""Ranking the scored candidates: latency and size limits, then the best eligible one.
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


def _over_limits(params: Params, row: CandidateScore) -> list[str]:
    cfg = params.choose
    over = []
    if cfg.max_size_mb is not None and row.size_mb is not None and row.size_mb > cfg.max_size_mb:
        over.append(f"{row.size_mb:.1f} MB > choose.max_size_mb={cfg.max_size_mb:g}")
    if cfg.max_latency_ms is not None and row.latency_ms is not None:
        worst = max(row.latency_ms, row.latency_batch_ms or 0.0)
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
                timing, measured_at = cached_latency(Path(row.onnx_path), row.image_size or 0, cfg.latency_batch_size, cfg.latency_runs)
            else:
                timing = measure_latency(Path(row.onnx_path), row.image_size or 0, cfg.latency_batch_size, cfg.latency_runs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            out.append(replace(row, status=f"skipped: onnxruntime cannot run its export ({exc})"))
            continue
        log.info(
            "%s: %.2f ms/image at batch 1, %.2f ms/image at batch %d on %s, %.1f MB%s",
            row.name, timing.batch1_ms, timing.batch_ms, timing.batch_size, timing.provider, row.size_mb or 0.0,
            f" (timed {measured_at} on this machine, same file and runtime; choose.latency_cache=false times it again)"
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
    """Order candidates best first and pick the best eligible one.

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
    best = eligible[0]
    score_name = "LogME" if params.choose.score == "logme" else "linear-probe accuracy"
    reason = f"highest {score_name} ({best.score:.4f}){_limits_text(params)} among {len(eligible)} eligible candidates"
    return ChooseResult(
        chosen=best.name,
        image_size=best.image_size or 0,
        score_name=params.choose.score,
        reason=reason,
        candidates=tuple(sorted(eligible + others, key=lambda r: (r.score is None, -(r.score or 0.0)))),
        seconds=seconds,
    )


def _cell(value: object, fmt: str, width: int) -> str:
    return f"{value:{fmt}}" if value is not None else f"{'-':>{width}}"


def ranking_table(rows: list[dict]) -> str:
    """The ranking (rows as in `CandidateScore.to_dict`) as a fixed-width text table for the terminal."""
    lines = [
        f"{'#':>2}  {'backbone':<28} {'pretrained':<10} {'score':>9} {'probe':>6} {'params':>7} {'MB':>6} {'ms/img':>7}  status"
    ]
    for index, row in enumerate(rows, 1):
        params_m = f"{row['params_m']:6.1f}M" if row.get("params_m") is not None else f"{'-':>7}"
        lines.append(
            f"{index:>2}  {row['name']:<28} {str(row['pretrained']):<10} {_cell(row['score'], '9.4f', 9)} "
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
        if row.get("image_size"):
            by_size.setdefault(row["image_size"], []).append(row["name"])
    return "scored at " + "; ".join(f"{size}px: {', '.join(names)}" for size, names in by_size.items())
