"""Candidate backbones on the deployment runtime: their latency per image on onnxruntime.

Each candidate's exported backbone (`components.backbones.export`) is timed at batch 1 and at the
serving batch; the figures are kept in this machine's cache and reused while the graph (its sha256),
the settings, the machine and onnxruntime are the same.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.backbones.features import OnnxFeatures
from components.core.errors import DiskFullError
from components.core.files import atomic_write, cached_sha256, user_cache_dir
from components.runtime.cpu import CpuWatch, cpu_facts
from components.runtime.providers import choose_providers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Latency:
    """Median onnxruntime time per image, in milliseconds."""

    batch1_ms: float
    batch_ms: float
    """Per image at `batch_size`."""
    batch_size: int
    provider: str


def time_calls(call, batch: np.ndarray, runs: int, warmup: int = 2) -> list[float]:  # noqa: ANN001 - any callable on a batch
    """Seconds of each of `runs` timed calls of `call(batch)`, after `warmup` untimed ones (first runs allocate)."""
    for _ in range(warmup):
        call(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    return times


def _median_ms(run, batch: np.ndarray, runs: int) -> float:  # noqa: ANN001 - a session.run bound with its feed name
    return float(np.median(time_calls(run, batch, runs))) * 1000.0


def measure_latency(path: Path, image_size: int, batch_size: int, runs: int, seed: int = 0) -> Latency:
    """Median onnxruntime time per image at batch 1 and at `batch_size`, on random uint8 images.

    Run candidates one after another: concurrent work on the same cores would inflate every figure.
    """
    extractor = OnnxFeatures(path)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
    batch1 = _median_ms(extractor, images[:1], runs)
    batched = _median_ms(extractor, images, max(3, runs // 4)) / batch_size
    provider = extractor.session.get_providers()[0]
    return Latency(round(batch1, 3), round(batched, 3), batch_size, provider)


@functools.cache
def _machine() -> dict[str, object]:
    """What a latency figure depends on besides the file: this machine, its runtime and providers."""
    import platform

    import onnxruntime as ort

    # the cores this process may use (a pinned job, a container's share) and the instruction sets onnxruntime's
    # kernels pick from, as every other record of this machine says them (`cpu_facts`)
    return {"host": platform.node(), "cpu": cpu_facts().describe(), "onnxruntime": ort.__version__, "providers": choose_providers()}


LATENCY_RECORDS = 8
"""Latency records kept per graph (settings or machines that differ), newest last."""


def latency_records_dir() -> Path:
    """Where the figures are kept: the user's cache (`$XDG_CACHE_HOME/graft/latency`), shared by this
    machine's projects; safe to delete."""
    return user_cache_dir() / "latency"


def _quiet_enough(others_cores: float | None, quiet_cores: float | None) -> bool:
    return quiet_cores is None or others_cores is None or others_cores <= quiet_cores


def cached_latency(path: Path, image_size: int, batch_size: int, runs: int,
                   quiet_cores: float | None = None) -> tuple[Latency, str | None]:
    """`measure_latency`, or the figures measured earlier for the same graph, settings and machine.

    The figures are kept in this machine's cache (`latency_records_dir`, one file per graph, the last
    few settings and machines it was timed with), keyed by the graph's sha256, the batch size and runs,
    and the machine (host, CPU model, cores, onnxruntime version and providers). A latency is a fact of
    the graph and the machine, not of the project: a scheduled retrain on new data, and a new project
    scoring the same backbones (the exports are byte-identical), reuse them instead of timing unchanged
    backbones again; a changed graph has another sha256 and is timed.

    With `quiet_cores`, a figure timed while other processes kept more cores than that busy is used
    but not kept: the next run times it again. Each kept figure records how busy the others were
    (`others_cores`); a record without it predates that check and is timed again, and so is one kept
    by a run without the check (`quiet_cores` None) while the others were busier than `quiet_cores`.

    Returns:
        The latency and, when it was kept from an earlier run, when that run measured it (else None).
    """
    digest = cached_sha256(path)
    key = {"graph": digest, "image_size": image_size, "batch_size": batch_size, "runs": runs, "machine": _machine()}
    record = latency_records_dir() / f"{digest[:32]}.json"
    try:
        entries = [e for e in json.loads(record.read_text())["entries"] if e["key"]["graph"] == digest]
    except (OSError, ValueError, KeyError, TypeError):
        entries = []  # none yet, or unreadable: measure
    for entry in entries:
        if entry["key"] == key and "others_cores" in entry and _quiet_enough(entry["others_cores"], quiet_cores):
            return Latency(**entry["latency"]), entry["measured_at"]
    with CpuWatch() as others:
        latency = measure_latency(path, image_size, batch_size, runs)
    if quiet_cores is not None and others.others_cores is not None and others.others_cores > quiet_cores:
        log.warning(
            "%s: latency timed while other processes kept %.1f cores busy (more than choose.latency_quiet_cores=%g): "
            "used for this run, not kept; the next run times it again", path.name, others.others_cores, quiet_cores,
        )
        return latency, None
    measured_at = time.strftime("%Y-%m-%d %H:%M:%S")
    entries = [e for e in entries if e["key"] != key]
    entry = {"key": key, "latency": asdict(latency), "measured_at": measured_at,
             "others_cores": None if others.others_cores is None else round(others.others_cores, 2)}
    entries = [*entries, entry][-LATENCY_RECORDS:]
    try:
        with atomic_write(record) as tmp:
            tmp.write_text(json.dumps({"entries": entries}))
    except (OSError, DiskFullError) as exc:  # a read-only or full cache still gets its figures, measured each time
        log.warning("could not keep the latency of %s in %s (%s); it will be measured again next run", path.name, record, exc)
    return latency, None
