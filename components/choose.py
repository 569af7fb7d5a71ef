"""Stage 1, choose: rank candidate backbones on a sample of the user's own data.

Each candidate is exported once to ONNX (cached), its features are
extracted once (cached) on a stratified sample of the training split, and
it is scored with LogME and a quick held-out linear probe (the sample's
images are decoded once per image size and shared by the candidates). Its
size and its latency per image on onnxruntime (the deployment runtime) are
measured one candidate at a time after scoring. A candidate that cannot
load, cannot be exported, or breaks a limit is listed with the reason and
not chosen; the others are still ranked.

    plan_candidates -> score_candidate (per name, may run in parallel)
        -> measure_candidates (one at a time) -> rank
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from components.config import Params
from components.data import Sample, Split
from components.errors import DataError, ExportError, GraftError, ModelError
from components.features import FeatureCache
from components.images import DecodedImages
from components.latency import OnnxFeatures, backbone_onnx_path, cached_latency, export_backbone, measure_latency, size_mb
from components.logme import logme
from components.zoo import ZOO, BackboneSpec, configure, configured_specs, count_params_m, get_spec

log = logging.getLogger(__name__)

BASELINE_STATUS = "baseline: reference only (choose.allow_baseline=false)"

SAMPLE_IMAGES = DecodedImages(max_bytes=256 * 2**20)
"""The choose sample, decoded once per image size and shared by the candidates scored in this
process (400 images at 224 px hold 60 MB; past 256 MB the least recently used are dropped).
`measure_candidates`, which runs once all scoring is done, empties it."""


@dataclass(frozen=True)
class CandidateScore:
    """One row of the ranking."""

    name: str
    pretrained: bool
    status: str
    """'ok', or why the candidate is not eligible ('over limit: ...', 'skipped: ...', 'baseline: ...')."""
    score: float | None = None
    logme: float | None = None
    probe_accuracy: float | None = None
    params_m: float | None = None
    image_size: int | None = None
    size_mb: float | None = None
    """The backbone's fp32 ONNX file (preprocessing included), in MB."""
    latency_ms: float | None = None
    """Median onnxruntime time per image at batch 1."""
    latency_batch_ms: float | None = None
    """Median onnxruntime time per image at `latency_batch_size`."""
    latency_batch_size: int | None = None
    onnx_path: str | None = None
    seconds: float = 0.0
    """Wall time to export (if not cached), extract features (if not cached) and score."""

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
    from threadpoolctl import threadpool_limits

    from sklearn.decomposition import PCA

    # An L2-regularised probe's weights lie in the span of the centred training rows, so projecting
    # onto that span first (at most N-1 dimensions, instead of D) gives the same fit, much faster.
    rank = min(len(x_fit) - 1, features.shape[1])
    probe = make_pipeline(StandardScaler(), PCA(rank, svd_solver="full"), LogisticRegression(max_iter=1000, C=0.5))
    with threadpool_limits(1, user_api="blas"):  # small problem: extra BLAS threads only contend
        probe.fit(x_fit, y_fit)
        return float(probe.score(x_test, y_test))


def resolve_spec(params: Params, name: str) -> BackboneSpec:
    """The spec `name` has in this run (zoo, `choose.weights`, `choose.custom`), without global state."""
    return configured_specs(params.choose).get(name) or get_spec(name)


def check_sample(sample: list[Sample], split: Split, params: Params) -> None:
    """Refuse a choose sample that cannot rank anything.

    Raises:
        DataError: fewer than two classes, or a class with fewer than two images in the sample.
    """
    counts = {label: 0 for label in range(len(split.classes))}
    for item in sample:
        counts[item.label] = counts.get(item.label, 0) + 1
    present = [label for label, count in counts.items() if count]
    if len(present) < 2:
        raise DataError(
            f"the choose sample holds {len(present)} class(es) ({', '.join(split.classes[i] for i in present) or 'none'}); "
            "ranking backbones needs at least two classes with images in the training split"
        )
    thin = [f"{split.classes[label]} ({count})" for label, count in counts.items() if count < 2]
    if thin:
        raise DataError(
            f"classes with fewer than two images in the choose sample: {', '.join(thin)}; "
            f"add images to those class folders or raise choose.sample_size (now {params.choose.sample_size})"
        )


def plan_candidates(params: Params, split: Split) -> tuple[str, ...]:
    """Check the names and the sample before any work starts; return the names to score.

    Registers `choose.weights` / `choose.custom` for the later stages, and adds a
    random twin of the first pre-trained zoo candidate when `choose.baseline` is
    set and no baseline is listed.

    Raises:
        ConfigError: an unknown name (listing the valid ones and the closest).
        DataError: the sample cannot rank anything (see `check_sample`).
    """
    configure(params.choose)
    names = list(dict.fromkeys(params.choose.candidates))
    specs = [get_spec(name) for name in names]
    if params.choose.baseline and all(spec.pretrained for spec in specs):
        twin = next((f"random_{n}" for n in names if f"random_{n}" in ZOO), None)
        if twin:
            log.info("adding the random baseline %s (choose.baseline=true)", twin)
            names.append(twin)
    check_sample(stratified_sample(split.train, params.choose.sample_size, params.data.seed), split, params)
    return tuple(names)


def _export_cached(params: Params, spec: BackboneSpec, size: int, backbone) -> Path:  # noqa: ANN001 - nn.Module or None
    path = backbone_onnx_path(params.data.cache_dir, spec, size, params.train.seed)
    if not path.is_file():
        net = backbone if backbone is not None else spec.build(size, seed=params.train.seed)
        export_backbone(net, spec, size, path, params.deploy.opset)
    return path


def score_candidate(params: Params, split: Split, name: str) -> CandidateScore:
    """Export one candidate (cached), extract its features on the choose sample (cached), score them.

    Never raises for a candidate-specific problem (weights missing or unfit,
    a failing factory, a failed export, NaN features): the row records it and
    the other candidates are still ranked. A bad image is a data problem and raises.
    """
    spec = resolve_spec(params, name)
    size = spec.resolve_size(params.data.image_size)
    base = {"name": name, "pretrained": spec.pretrained, "params_m": spec.params_m, "image_size": size}
    limit = params.choose.max_params_m
    if limit is not None and spec.params_m is not None and spec.params_m > limit:
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
        onnx_path = backbone_onnx_path(params.data.cache_dir, spec, size, params.train.seed)
        backbone = None
        if spec.params_m is None or not onnx_path.is_file():
            backbone = spec.build(size, seed=params.train.seed)
        if spec.params_m is None:  # a user backbone: count what was built
            base["params_m"] = round(count_params_m(backbone), 6)
            if limit is not None and base["params_m"] > limit:
                return CandidateScore(**base, status=f"over limit: {base['params_m']:.1f}M params > choose.max_params_m={limit}")
        onnx_path = _export_cached(params, spec, size, backbone)
        extractor = OnnxFeatures(onnx_path) if params.choose.onnx_features else None
        features = cache.get([s.path for s in sample], params.choose.batch_size, backbone, extractor, SAMPLE_IMAGES)
    except DataError:
        raise
    except ExportError as exc:
        log.warning("%s skipped: %s", name, exc)
        return CandidateScore(**base, status=f"skipped: cannot export to ONNX, so it could not be deployed ({exc})")
    except ModelError as exc:
        log.warning("%s skipped: %s", name, exc)
        return CandidateScore(**base, status=f"skipped: failed to load ({exc})")
    except (GraftError, RuntimeError, ValueError, TypeError) as exc:
        log.warning("%s failed to score: %s", name, exc)
        return CandidateScore(**base, status=f"skipped: failed to score ({exc.__class__.__name__}: {exc})")
    base.update(size_mb=round(size_mb(onnx_path), 2), onnx_path=str(onnx_path))
    bad = int((~np.isfinite(features).all(axis=1)).sum())
    if bad:
        log.warning("%s skipped: NaN or inf features on %d of %d images", name, bad, len(features))
        return CandidateScore(
            **base, status=f"skipped: its features contain NaN or inf on {bad} of {len(features)} sample images"
        )
    evidence = logme(features, labels)
    probe = probe_accuracy(features, labels, params.data.seed)
    score = evidence if params.choose.score == "logme" else probe
    seconds = time.perf_counter() - started
    log.info("%s: LogME %.4f, probe accuracy %s (%.1fs)", name, evidence, probe, seconds)
    return CandidateScore(**base, status="ok", score=score, logme=evidence, probe_accuracy=probe, seconds=round(seconds, 2))


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


def choose_model(params: Params, split: Split) -> ChooseResult:
    """Score every candidate in `choose.candidates` and return the ranking (the flow maps the same steps)."""
    names = plan_candidates(params, split)
    started = time.perf_counter()
    rows = [score_candidate(params, split, name) for name in names]
    rows = measure_candidates(params, rows)
    return rank(params, rows, time.perf_counter() - started)


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
    return "\n".join(lines)
