"""Scoring one candidate backbone on a sample of the user's own data (the choose stage's first round).

Each candidate is exported once to ONNX (cached in the project, and for the
zoo's backbones on this machine too: another project copies the graph instead
of exporting it again), its features are
extracted once (cached) on a stratified sample of the training split, and
it is scored with LogME and a quick held-out linear probe (the sample's
images are decoded once per image size and shared by the candidates). A
candidate that cannot load or be exported is listed with the reason and not
chosen; the others are still ranked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.backbones.export import backbone_onnx_path, export_backbone, size_mb, unchanged_since_export
from components.backbones.features import FeatureCache, OnnxFeatures
from components.backbones.spec import BackboneSpec, count_params_m
from components.backbones.zoo import configured_specs, get_spec, random_twin, register_backbones
from components.choose.logme import logme
from components.choose.probe import probe_accuracy
from components.core.build_cache import BuildCache, build_key
from components.core.config import Params
from components.core.errors import DataError, ExportError, GraftError, ModelError
from components.core.files import user_cache_dir
from components.data.images import DecodedImages
from components.data.split import Sample, Split, stratified_sample
from components.runtime.cpu import cpu_facts
from components.runtime.trust import write_sidecar

log = logging.getLogger(__name__)


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
    score_rank: int | None = None
    """Its place by `score` among the eligible candidates (1 = first): the first round's prediction."""
    val_accuracy: float | None = None
    """Finalists only: validation accuracy of its head trained on the whole training split (second round)."""
    val_loss: float | None = None
    """Finalists only: validation loss of that head, at the epoch early stopping kept."""
    trained_rank: int | None = None
    """Finalists only: its place by `val_accuracy` among the finalists: the realised ranking."""
    train_seconds: float | None = None
    """Finalists only: wall time to extract the whole split's features (rows not cached) and train the head."""

    @property
    def worst_latency_ms(self) -> float | None:
        """The figure `choose.max_latency_ms` is checked against: the slower of the two per-image times."""
        return None if self.latency_ms is None else max(self.latency_ms, self.latency_batch_ms or 0.0)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["params"] = int(self.params_m * 1e6) if self.params_m is not None else None
        return out


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


def candidate_names(params: Params) -> list[str]:
    """`choose.candidates` without repeats, and with `choose.baseline`, a random twin of the first pre-trained
    zoo candidate when none of them is random already."""
    names = list(dict.fromkeys(params.choose.candidates))
    specs = [resolve_spec(params, name) for name in names]  # an unknown name raises here, before any work
    if params.choose.baseline and all(spec.pretrained for spec in specs):
        twin = next((random_twin(n) for n in names if random_twin(n)), None)
        if twin:
            names.append(twin)
    return names


def check_candidates(params: Params) -> None:
    """Refuse an unknown `choose.candidates` name (or a bad `choose.weights` / `choose.custom`) before a run starts
    anything: no MLflow run, no run folder, no data scanned.

    Raises:
        ConfigError: listing the valid names and the closest one.
    """
    register_backbones(params.choose)
    candidate_names(params)
    unused = [name for name in params.choose.weights if name not in params.choose.candidates]
    if unused:
        log.warning("choose.weights names %s, which choose.candidates (%s) does not: that file is not used; key it by "
                    "the candidate's name as choose.candidates writes it", ", ".join(unused), ", ".join(params.choose.candidates))


def plan_candidates(params: Params, split: Split) -> tuple[str, ...]:
    """Check the names and the sample before any work starts; return the names to score.

    Registers `choose.weights` / `choose.custom` for the later stages, and adds a
    random twin of the first pre-trained zoo candidate when `choose.baseline` is
    set and no baseline is listed.

    Raises:
        ConfigError: an unknown name (listing the valid ones and the closest).
        DataError: the sample cannot rank anything (see `check_sample`).
    """
    register_backbones(params.choose)
    names = candidate_names(params)
    if len(names) > len(set(params.choose.candidates)):
        log.info("adding the random baseline %s (choose.baseline=true)", names[-1])
    check_sample(stratified_sample(split.train, params.choose.sample_size, params.data.seed), split, params)
    return tuple(names)


def side_by_side_threads(params: Params) -> int:
    """onnxruntime threads for one candidate's sample features: the flow scores the candidates side by side,
    so they share the cores instead of each session spinning a thread on every core (on 2 cores, four
    candidates' features took 3.0 s with one thread each and 4.3 s with two each)."""
    return max(1, cpu_facts().cores // len(candidate_names(params)))


MACHINE_EXPORTS_KEEP = 8
"""Exported zoo backbones kept in `$XDG_CACHE_HOME/graft/backbones` for every project (13-19 MB each for the
EfficientNet-Lites at 112 px)."""


def machine_exports() -> BuildCache:
    """The zoo backbones' exported graphs, shared by the projects on this machine."""
    return BuildCache(user_cache_dir() / "backbones", MACHINE_EXPORTS_KEEP)


def _shares_export(params: Params, spec: BackboneSpec) -> bool:
    """Whether the backbone's export goes through this machine's cache: only the zoo's backbones (known parameter
    count), as a user's backbone is its factory's code, which no key here names; and `choose.shared_exports`."""
    return spec.params_m is not None and params.choose.shared_exports


def _machine_key(params: Params, path: Path) -> str:
    """The machine cache's key for a project's exported backbone `path`: its name (the weights file, the size, the
    seed, the preprocessing and torch versions), the opset, and Graft's own code (`build_key`)."""
    return build_key("backbone-onnx", path.name, params.deploy.opset)


def _copy_machine_export(params: Params, spec: BackboneSpec, path: Path) -> None:
    """Copy the backbone's exported graph from this machine's cache into the project, when `_shares_export` and
    it is there; the copy is checked against the sha256 recorded when it was kept."""
    if path.is_file() or not _shares_export(params, spec):
        return
    started, shared = time.perf_counter(), machine_exports()
    if shared.fetch(_machine_key(params, path), path):
        write_sidecar(path)  # checked against the machine cache's record: what `unchanged_since_export` compares with
        log.info("%s: exported graph %s copied from this machine's cache %s (%.1fs)", spec.name, path.name,
                 shared.root, time.perf_counter() - started)


def _export_cached(params: Params, spec: BackboneSpec, size: int, backbone) -> Path:  # noqa: ANN001 - nn.Module or None
    path = backbone_onnx_path(params.data.cache_dir, spec, size, params.train.seed, params.deploy.opset)
    if not (path.is_file() and unchanged_since_export(path)):
        net = backbone if backbone is not None else spec.build(size, seed=params.train.seed)
        export_backbone(net, spec, size, path, params.deploy.opset)
        if _shares_export(params, spec):
            machine_exports().keep(_machine_key(params, path), path)
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
    missing = spec.ensure_weights(params.choose.download)  # fetched into its cache when choose.download allows
    if missing:
        log.warning("%s skipped: %s", name, missing)
        return CandidateScore(**base, status=f"skipped: {missing}")
    started = time.perf_counter()
    sample = stratified_sample(split.train, params.choose.sample_size, params.data.seed)
    labels = np.array([s.label for s in sample])
    try:
        cache = FeatureCache(params.data.cache_dir, spec, size, seed=params.train.seed)
        onnx_path = backbone_onnx_path(params.data.cache_dir, spec, size, params.train.seed, params.deploy.opset)
        _copy_machine_export(params, spec, onnx_path)
        backbone = None
        if spec.params_m is None or not onnx_path.is_file():
            backbone = spec.build(size, seed=params.train.seed)
        if spec.params_m is None:  # a user backbone: count what was built
            base["params_m"] = round(count_params_m(backbone), 6)
            if limit is not None and base["params_m"] > limit:
                return CandidateScore(**base, status=f"over limit: {base['params_m']:.1f}M params > choose.max_params_m={limit}")
        onnx_path = _export_cached(params, spec, size, backbone)
        extractor = OnnxFeatures(onnx_path, side_by_side_threads(params)) if params.choose.onnx_features else None
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
    log.info("%s: LogME %.4f, probe accuracy %s (%.1fs)", name, evidence, "-" if probe is None else f"{probe:.3f}", seconds)
    return CandidateScore(**base, status="ok", score=score, logme=evidence, probe_accuracy=probe, seconds=round(seconds, 2))
