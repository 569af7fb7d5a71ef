"""Deployment variants of the exported fp32 model, each judged on the test images and timed against fp32.

- `optimized` (only when listed in `deploy.variants`): onnxruntime's offline graph optimisation
  (constant folding, Conv+activation fusions) saved as a file, so a consumer skips that work at
  load; numerically the fp32 model. onnxruntime does the same optimisation when it loads fp32,
  so on the CPUs measured it ran no faster (0.93x-1.04x) and was never published: it is not
  built unless asked for.
- `fp16`: weights and activations in half precision for GPUs; inputs (uint8) and
  outputs (fp32 probabilities) keep their types, so consumers call it the same way.
- `int8`: onnxruntime static quantisation for CPUs, bias-corrected (`components.deploy.int8`).

Every variant is scored on the test images against the fp32 model; one that loses more
than `deploy.max_variant_drop` accuracy is not published. A CPU variant (`optimized`,
`int8`) must also run at least `MIN_SPEEDUP` times as fast as fp32 at batch 1 and at
`SPEED_BATCH`, timed here, on the machine that builds it (interleaved, median of
`SPEED_ROUNDS` rounds, or of `SPEED_ROUNDS_CLEAR` when every round already clears the bar by
`SPEED_CLEAR_MARGIN`, or misses it by that much); a variant no faster than fp32 is only a second file to trust. fp16 is
for GPUs: it is timed where a GPU provider is present and otherwise published on accuracy
alone, its speed "not timed: no GPU". A variant that is not published moves to `rejected/`
in the run folder, so it can be inspected, and is neither registered nor bundled. Imports
onnx and onnxruntime only, no torch.

A build is a function of the fp32 file's bytes, the calibration images (INT8), the library
versions and this machine's CPU. A rerun on unchanged data exports the same fp32 file byte for
byte, so with a cache folder (the deploy stage's `data.cache_dir/variants/`) each build is kept
(`components.core.build_cache`) and an identical one is copied instead of built again: INT8's
calibration and bias correction are most of this step. Accuracy and speed are judged afresh on
every run.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from components.core.build_cache import BuildCache, build_key
from components.core.errors import VariantError
from components.core.files import cached_sha256, sha256
from components.deploy.int8 import to_int8, weight_bits
from components.evaluate.gate import signed_points
from components.runtime.cpu import cpu_facts, int8_needs_vnni
from components.runtime.model import OnnxClassifier
from components.runtime.providers import GPU_PROVIDERS, choose_providers, session_providers
from components.runtime.variant_files import variant_path

log = logging.getLogger(__name__)


OPTIMIZATION_PROVIDER = "CPUExecutionProvider"


MIN_SPEEDUP = 1.05
"""A CPU variant is published only when it runs at least this many times as fast as fp32 at batch 1
and at `SPEED_BATCH` (5% above parity: a variant that only ties fp32 would flip in and out with timing noise)."""


SPEED_BATCH = 32


SPEED_ROUNDS = 5
"""Rounds of back-to-back timing (fp32 then the variant); each speed-up is the median of the rounds' ratios."""


SPEED_ROUNDS_CLEAR = 3
"""Judged against a bar, timing stops after this many rounds when the verdict is already clear: every round's
ratio at both batch sizes at least `SPEED_CLEAR_MARGIN` times the bar, or every one at most the bar over it.
Only a variant near the bar is timed all `SPEED_ROUNDS` (INT8 at about 2x fp32: 1.4 s of timing became 0.9 s)."""


SPEED_CLEAR_MARGIN = 1.15


SPEED_THREADS = 1
"""onnxruntime threads while timing: one thread's kernel speed-up is what a variant buys, and it survives a
busy machine, where several threads spinning for the same cores make any single figure several times off."""


CPU_VARIANTS = ("optimized", "int8")
"""Variants meant for the CPU provider, hence timed against fp32 on the CPU that builds them."""


VARIANT_CACHE_KEEP = 6
"""Variant files kept in the build cache: every variant of the last two distinct models."""


@dataclass(frozen=True)
class Speed:
    """A variant's time against fp32's on this machine, one onnxruntime thread (medians over `SPEED_ROUNDS` rounds)."""

    batch1_ms: float
    fp32_batch1_ms: float
    batch_images_per_s: float
    fp32_batch_images_per_s: float
    speedup_batch1: float
    speedup_batch: float
    """At `SPEED_BATCH`."""
    provider: str
    cpu: str
    rounds: int = SPEED_ROUNDS
    """Rounds timed (fewer than `SPEED_ROUNDS` where the verdict was clear sooner)."""

    def text(self) -> str:
        return (f"{self.speedup_batch1:.2f}x fp32 at batch 1 ({self.batch1_ms:.2f} vs {self.fp32_batch1_ms:.2f} ms), "
                f"{self.speedup_batch:.2f}x at batch {SPEED_BATCH} ({self.batch_images_per_s:.0f} vs {self.fp32_batch_images_per_s:.0f} "
                f"images/s), {SPEED_THREADS} thread")


@dataclass(frozen=True)
class VariantResult:
    """One variant, its accuracy change and speed against fp32, and whether it is published."""

    name: str
    path: Path
    published: bool
    accuracy: float
    accuracy_change: float
    """accuracy(variant) - accuracy(fp32) on the same test images; negative is a loss."""
    top1_agreement: float
    """Share of test images where the variant's top-1 label equals fp32's."""
    max_abs_diff: float
    size_bytes: int
    seconds: float
    """Seconds to build it."""
    reason: str
    speed: Speed | None = None
    """Timed against fp32 on this machine; None when not timed (fp16 without a GPU, or rejected on accuracy)."""
    reused: bool = False
    """Copied from the build cache, built before from the same fp32 file and inputs (`seconds` is the copy's)."""
    keeps_accuracy_on: str | None = None
    """The CPUs on which this accuracy holds, where not all: an INT8 file with 8-bit weights, `graft.int8_exact_on`."""

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class VariantsReport:
    """The fp32 baseline accuracy and every variant built beside it."""

    fp32_accuracy: float
    variants: tuple[VariantResult, ...]

    @property
    def published(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants if v.published)

    def get(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    def listing(self) -> dict[str, dict[str, object]]:
        """Published variants -> file, sha256, accuracy and speed evidence (`registration.json` and the bundle's metadata)."""
        return {
            v.name: {
                "file": v.path.name,
                "sha256": sha256(v.path),
                "accuracy": round(v.accuracy, 6),
                "accuracy_change": round(v.accuracy_change, 6),
                "top1_agreement": round(v.top1_agreement, 6),
                "size_bytes": v.size_bytes,
                **({"speedup_batch1": round(v.speed.speedup_batch1, 2), "speedup_batch": round(v.speed.speedup_batch, 2),
                    "timed_on": v.speed.cpu} if v.speed else {}),
            }
            for v in self.variants
            if v.published
        }

    def to_dict(self) -> dict[str, object]:
        return {"fp32_accuracy": self.fp32_accuracy, "variants": [v.to_dict() for v in self.variants]}


def optimize_offline(source: Path, target: Path) -> Path:
    """Apply onnxruntime's extended graph optimisations for the CPU provider and save the result."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # EXTENDED (not ALL): ALL adds layout transforms tied to this CPU's instruction set
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=[OPTIMIZATION_PROVIDER])
    _stamp(onnx.load(str(target)), target, {"graft.variant": "optimized", "graft.optimized_for": OPTIMIZATION_PROVIDER})
    return target


def to_fp16(source: Path, target: Path) -> Path:
    """Convert weights and activations to fp16, keeping the uint8 input and fp32 output types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, disable_shape_infer=False)
    _stamp(model, target, {"graft.variant": "fp16"})
    return target


def _stamp(model, target: Path, extra: dict[str, str]) -> None:  # noqa: ANN001 - onnx.ModelProto
    """Save `model` with its Graft metadata plus `extra` (replacing keys already there)."""
    import onnx

    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in extra]
    del model.metadata_props[:]
    for key, value in [*kept, *extra.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(target))


def build_int8(source: Path, target: Path, calibration_images: np.ndarray, bits: int | None = None) -> Path:
    """The INT8 variant (`components.deploy.int8.to_int8`, with `bits`-bit weights; None: as this CPU suits), stamped
    with how it was built."""
    import onnx

    facts = to_int8(source, target, calibration_images, bits)
    _stamp(onnx.load(str(target)), target, {"graft.variant": "int8", **facts})
    return target


def _seconds(run: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls


def _session(path: Path, providers: list[str]):  # noqa: ANN202 - onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = SPEED_THREADS
    return ort.InferenceSession(str(path), options, providers=session_providers(providers, path))


def _clear(rounds: list[tuple[float, ...]], bar: float) -> bool:
    """Every round's speed-up at both batch sizes clears `bar` by `SPEED_CLEAR_MARGIN`, or every one misses it by that much."""
    ratios = [r[0] / r[1] for r in rounds] + [r[2] / r[3] for r in rounds]
    return min(ratios) >= bar * SPEED_CLEAR_MARGIN or max(ratios) <= bar / SPEED_CLEAR_MARGIN


def time_against_fp32(fp32_path: Path, path: Path, images: np.ndarray, providers: list[str], bar: float | None = None) -> Speed:
    """Times of `path` and of fp32 at batch 1 and `SPEED_BATCH`, in back-to-back pairs so both see the same load.

    Each round times fp32 then the variant; the speed-ups are the medians of the rounds' ratios, and the
    times the medians of the rounds' times. With `bar` (the speed-up a verdict is drawn against), timing stops
    after `SPEED_ROUNDS_CLEAR` rounds when they leave no doubt either way (`_clear`).
    """
    sessions = [_session(p, providers) for p in (fp32_path, path)]
    name = sessions[0].get_inputs()[0].name
    one = images[:1]
    batch = np.resize(images, (SPEED_BATCH, *images.shape[1:]))
    runs = {id(one): 10, id(batch): 2}
    for session in sessions:  # warm-up: first runs allocate
        session.run(None, {name: one})
        session.run(None, {name: batch})
    rounds: list[tuple[float, ...]] = []
    while len(rounds) < SPEED_ROUNDS and not (bar is not None and len(rounds) >= SPEED_ROUNDS_CLEAR and _clear(rounds, bar)):
        rounds.append(tuple(_seconds(lambda s=session, x=x: s.run(None, {name: x}), runs[id(x)]) for x in (one, batch) for session in sessions))
    fp32_one, variant_one, fp32_batch, variant_batch = (statistics.median(r[i] for r in rounds) for i in range(4))
    return Speed(
        batch1_ms=variant_one * 1000, fp32_batch1_ms=fp32_one * 1000,
        batch_images_per_s=SPEED_BATCH / variant_batch, fp32_batch_images_per_s=SPEED_BATCH / fp32_batch,
        speedup_batch1=statistics.median(r[0] / r[1] for r in rounds),
        speedup_batch=statistics.median(r[2] / r[3] for r in rounds),
        provider=sessions[1].get_providers()[0], cpu=cpu_facts().describe(), rounds=len(rounds),
    )


def judge_variant(
    name: str,
    path: Path,
    reference: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    max_drop: float,
    seconds: float,
) -> VariantResult:
    """Score `path` on the test images against the fp32 probabilities `reference` (accuracy only; `judge_speed` times it)."""
    model = OnnxClassifier(path, ["CPUExecutionProvider"])
    probs = model.predict_proba(images)
    accuracy = float((probs.argmax(1) == labels).mean())
    change = accuracy - float((reference.argmax(1) == labels).mean())
    published = -change <= max_drop + 1e-9
    reason = (
        f"{name}: test accuracy {accuracy:.4f} ({signed_points(change)} points vs fp32, limit "
        f"deploy.max_variant_drop={signed_points(max_drop).lstrip('+')} points): " + ("published" if published else "NOT published")
    )
    return VariantResult(
        name=name,
        path=path,
        published=published,
        accuracy=accuracy,
        accuracy_change=change,
        top1_agreement=float((probs.argmax(1) == reference.argmax(1)).mean()),
        max_abs_diff=float(np.abs(probs - reference).max()) if len(probs) else 0.0,
        size_bytes=path.stat().st_size,
        seconds=seconds,
        reason=reason,
        keeps_accuracy_on=model.metadata.get("graft.int8_exact_on") if int8_needs_vnni(model.metadata) else None,
    )


def judge_speed(result: VariantResult, fp32_path: Path, images: np.ndarray, min_speedup: float) -> VariantResult:
    """Time a variant that passed on accuracy; a CPU variant below `min_speedup` x fp32 is not published."""
    gpu = [p for p in choose_providers() if p in GPU_PROVIDERS]
    if result.name not in CPU_VARIANTS:
        if not gpu:
            return replace(result, reason=f"{result.reason} (for GPUs; not timed: no GPU here)")
        speed = time_against_fp32(fp32_path, result.path, images, [*gpu, "CPUExecutionProvider"])
        return replace(result, speed=speed, reason=f"{result.reason} ({speed.text()} on {speed.provider})")
    speed = time_against_fp32(fp32_path, result.path, images, ["CPUExecutionProvider"], bar=min_speedup)
    if min(speed.speedup_batch1, speed.speedup_batch) >= min_speedup:
        return replace(result, speed=speed, reason=f"{result.reason} ({speed.text()})")
    head = result.reason.removesuffix("published")
    return replace(result, speed=speed, published=False,
                   reason=f"{head}NOT published: {speed.text()}, not {min_speedup:g}x as fast as fp32 on this CPU")


def _builders(fp32_path: Path, calibration_images: np.ndarray, int8_bits: int) -> dict[str, Callable[[Path], Path]]:
    return {
        "optimized": lambda target: optimize_offline(fp32_path, target),
        "fp16": lambda target: to_fp16(fp32_path, target),
        "int8": lambda target: build_int8(fp32_path, target, calibration_images, int8_bits),
    }


def _build_key(fp32_path: Path, name: str, calibration_images: np.ndarray, int8_bits: int) -> str:
    """Everything a variant's bytes depend on (see the module docstring)."""
    import onnx
    import onnxruntime as ort

    images = np.ascontiguousarray(calibration_images)
    calibration = f"{images.shape} {hashlib.sha256(images.tobytes()).hexdigest()} {int8_bits}-bit weights" if name == "int8" else "not read"
    return build_key("variant", name, cached_sha256(fp32_path), calibration, cpu_facts().describe(),
                     f"onnx {onnx.__version__}", f"onnxruntime {ort.__version__}")


def _build(name: str, builder: Callable[[Path], Path], target: Path, cache: BuildCache | None, key: str) -> tuple[float, bool]:
    """Build (or copy from `cache`) one variant; returns the seconds it took and whether it was copied."""
    started = time.perf_counter()
    if cache is not None and cache.fetch(key, target):
        return time.perf_counter() - started, True
    try:
        builder(target)
    except VariantError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime tools raise many types
        raise VariantError(f"building the {name} variant of {target.parent / 'model.onnx'} failed ({exc}); drop it from deploy.variants") from exc
    if cache is not None:
        cache.keep(key, target)
    return time.perf_counter() - started, False


def build_variants(
    fp32_path: Path,
    names: Sequence[str],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    calibration_images: np.ndarray,
    max_drop: float,
    min_speedup: float = MIN_SPEEDUP,
    reference: np.ndarray | None = None,
    cache_dir: Path | None = None,
    int8_weight_bits: int | str | None = None,
) -> VariantsReport:
    """Build each variant in `names` beside `fp32_path`, and judge each.

    The files are built concurrently (onnxruntime's quantiser and optimiser spend most of their
    time outside Python's lock); they are scored and timed one after another, so no timing shares
    the CPU with other work of this process (scoring one variant while the others were still being
    built made the whole step slower on 2 cores, not faster).

    Args:
        fp32_path: The exported, parity-checked model (`.../model.onnx`).
        names: Variants to build: any of `optimized`, `fp16`, `int8` (none: only fp32's accuracy is measured).
        test_images: uint8 test batch at the model's input size.
        test_labels: Their class indices.
        calibration_images: uint8 training images for INT8 calibration.
        max_drop: Largest accuracy loss (fraction, 0.01 = 1 point) a published variant may have.
        min_speedup: Least speed-up over fp32 (batch 1 and batch 32) a published CPU variant must show; 0 to skip timing.
        reference: fp32's probabilities on `test_images` on the CPU provider, when the caller has them already
            (the deploy stage's gate computed them); else they are computed here.
        cache_dir: Where builds are kept and reused (see the module docstring); None builds every variant.
        int8_weight_bits: `deploy.int8_weight_bits`: auto (None), 7 or 8 (`components.deploy.int8.weight_bits`).

    Returns:
        The fp32 accuracy and one `VariantResult` per variant; unpublished files are moved to `rejected/`.
    """
    wanted = list(dict.fromkeys(names))
    int8_bits = weight_bits(int8_weight_bits) if "int8" in wanted else 0
    builders = _builders(fp32_path, calibration_images, int8_bits)
    unknown = [name for name in wanted if name not in builders]
    if unknown:
        raise VariantError(f"unknown variant '{unknown[0]}' in deploy.variants; choose from {', '.join(builders)}")
    if reference is None:
        reference = OnnxClassifier(fp32_path, ["CPUExecutionProvider"]).predict_proba(test_images)
    elif len(reference) != len(test_images):
        raise ValueError(f"reference holds {len(reference)} rows of probabilities for {len(test_images)} test images")
    fp32_accuracy = float((reference.argmax(1) == test_labels).mean())
    if not wanted:
        return VariantsReport(fp32_accuracy, ())
    log.info("building the %s variants", ", ".join(wanted))
    cache = BuildCache(cache_dir, VARIANT_CACHE_KEEP) if cache_dir is not None else None
    keys = {name: _build_key(fp32_path, name, calibration_images, int8_bits) for name in wanted} if cache is not None else dict.fromkeys(wanted, "")
    with ThreadPoolExecutor(max_workers=len(wanted), thread_name_prefix="variant") as pool:
        futures = {name: pool.submit(_build, name, builders[name], variant_path(fp32_path, name), cache, keys[name]) for name in wanted}
        built = {name: future.result() for name, future in futures.items()}
    reused = [name for name in wanted if built[name][1]]
    if reused:
        log.info("%s: the same fp32 model and inputs as a build before; copied from %s", ", ".join(reused), cache_dir)
    results = []
    for name in wanted:
        seconds, copied = built[name]
        result = judge_variant(name, variant_path(fp32_path, name), reference, test_images, test_labels, max_drop, seconds)
        result = replace(result, reused=copied)
        if result.published and min_speedup > 0:
            result = judge_speed(result, fp32_path, test_images, min_speedup)
        log.info("%s", result.reason)
        if not result.published:
            rejected = result.path.parent / "rejected" / result.path.name
            rejected.parent.mkdir(exist_ok=True)
            shutil.move(result.path, rejected)
            result = replace(result, path=rejected)
        results.append(result)
    return VariantsReport(fp32_accuracy, tuple(results))
