"""Figures that hold: the machine's state, repeated timings, and a refusal to time a busy machine.

    .venv/bin/python benchmarks/machine.py      # is the machine quiet enough to time now? (exit 0 if so)

Every benchmark records the CPU (model, cores, the flags that change which kernels run), the load
average, the library versions and torch's thread count beside its figures, and times each thing
`REPEATS` times or more (the median is reported). Timings are refused when

- the 1-minute load average before starting is above `BUSY_LOAD_PER_CORE` per core (1.5 on 2 cores), or
- other processes kept more than `BUSY_OTHERS_CORES` cores busy, on average, while the timings ran
  (from /proc/stat, less this process's own CPU time and its children's).

A figure taken beside other jobs on a small machine can be ten times off; a ratio of two things timed
back to back in one run holds better than two absolute times, so benchmarks report both.
The thresholds are those of `benchmarks/choose.py`.

Plain classes only: `tests/test_benchmarks.py` loads each file here without registering it as a module.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from components.runtime.cpu import CpuWatch, cpu_seconds, process_cpu_seconds  # noqa: E402, F401 - re-exported for the benchmarks

BUSY_LOAD_PER_CORE = 0.75
BUSY_OTHERS_CORES = 0.5
REPEATS = 3


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_reason() -> str | None:
    """Why the machine is too busy to time now (the load average before starting), or None."""
    load, limit = os.getloadavg()[0], BUSY_LOAD_PER_CORE * cores()
    if load > limit:
        return f"the 1-minute load average is {load:.2f}, above {limit:g} ({BUSY_LOAD_PER_CORE} per core on {cores()} cores)"
    return None


def state() -> dict[str, object]:
    """Where the figures come from: date, CPU, cores and flags, load, library versions, torch threads."""
    from components.runtime.cpu import cpu_facts

    versions = {"python": platform.python_version()}
    for name in ("numpy", "torch", "onnxruntime", "onnx", "mlflow"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    return {
        "at": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_facts().to_dict(), "platform": platform.platform(),
        "load_average_1_5_15": load_average(), "versions": versions, "torch_threads": threads,
    }


class Watch(CpuWatch):
    """How many cores other processes kept busy while a block ran: `with Watch() as w: ...; w.others_cores`
    (`components.runtime.cpu.CpuWatch`), and whether that is quiet enough to keep the timings.

    Children this process waited for count as its own; a server started in a subprocess that is still
    running does not, so `also` names extra process ids whose CPU is ours too (read from /proc).
    """

    @property
    def quiet(self) -> bool:
        return self.others_cores is None or self.others_cores <= BUSY_OTHERS_CORES

    def describe(self) -> str:
        return "unknown" if self.others_cores is None else f"{self.others_cores:.2f} cores"


class Timer:
    """`repeats` timings of one call, and the other processes' CPU meanwhile."""

    def __init__(self, runs: list[float], watch: Watch) -> None:
        self.runs, self.watch = runs, watch

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def to_dict(self) -> dict[str, object]:
        return {"median_s": round(self.median, 6), "runs_s": [round(r, 6) for r in self.runs], "others_cores": self.watch.others_cores}


def timed(run: Callable[[], object], repeats: int = REPEATS, prepare: Callable[[], object] | None = None) -> Timer:
    """Time `run` `repeats` times (each after `prepare`, untimed), watching the other processes."""
    runs = []
    with Watch() as watch:
        for _ in range(repeats):
            if prepare is not None:
                prepare()
            started = time.perf_counter()
            run()
            runs.append(time.perf_counter() - started)
    return Timer(runs, watch)


class Verdict:
    """Whether a benchmark's timings may be written: quiet before starting and while timing."""

    def __init__(self) -> None:
        self.before = busy_reason()
        self.noisy: dict[str, float] = {}

    def saw(self, name: str, watch: Watch) -> None:
        if not watch.quiet and watch.others_cores is not None:
            self.noisy[name] = round(watch.others_cores, 2)

    @property
    def quiet(self) -> bool:
        return self.before is None and not self.noisy

    def reason(self) -> str:
        parts = [self.before] if self.before else []
        if self.noisy:
            parts.append(f"other processes kept {self.noisy} cores busy while timing (limit {BUSY_OTHERS_CORES})")
        return "; ".join(parts) or "quiet"

    def to_dict(self) -> dict[str, object]:
        return {
            "quiet": self.quiet, "reason": self.reason(),
            "rules": f"load average <= {BUSY_LOAD_PER_CORE} per core before starting; other processes <= "
                     f"{BUSY_OTHERS_CORES} cores while timing; medians of >= {REPEATS} repeats",
        }


def peak_gflops(seconds: float = 1.0) -> dict[str, float]:
    """What this CPU reaches on a large matrix product (torch, all its threads): fp32 and bf16 GFLOP/s,
    the roof a network's achieved GFLOP/s is read against."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        out[f"matmul_{name}_gflops"] = round(2 * 1024**3 * count / (time.perf_counter() - started) / 1e9, 1)
    return out


def main() -> int:
    import torch  # noqa: F401 - its version and threads are part of the state

    reason = busy_reason()
    with Watch() as watch:
        time.sleep(2.0)
    print(state())
    print(f"other processes over 2 s: {watch.describe()} (limit {BUSY_OTHERS_CORES})")
    if reason or not watch.quiet:
        print(f"BUSY: {reason or 'other processes are using the CPU'}; timings would be refused")
        return 1
    print("quiet: timings would be written", peak_gflops())
    return 0


if __name__ == "__main__":
    sys.exit(main())
