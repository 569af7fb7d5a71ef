"""What this machine's CPU can do, as the kernels that run Graft's models see it.

Read from `/proc/cpuinfo` (Linux); elsewhere only the core count and the processor's name are known.
The flags that matter here:

- `avx512_vnni` / `avx_vnni`: 8-bit dot products summed into 32 bits in one instruction.
  onnxruntime's uint8 x int8 kernels use them where present; without them (plain AVX2 or
  AVX-512) they multiply with VPMADDUBSW, whose pairwise 16-bit sums saturate for full 8-bit
  weights, so an INT8 model built for a VNNI CPU loses accuracy on one without.
- `avx512_bf16`, `amx_bf16`: bfloat16 arithmetic (PyTorch's oneDNN kernels use it under
  autocast); `amx_int8`: int8 tile multiplications.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuFacts:
    """The processor, its cores, and which of `FLAGS_OF_INTEREST` it has."""

    model: str
    cores: int
    flags: tuple[str, ...]

    @property
    def vnni(self) -> bool:
        """Integer dot products without 16-bit saturation (see the module docstring)."""
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags or "amx_int8" in self.flags

    @property
    def bf16(self) -> bool:
        """Native bfloat16 arithmetic (AVX-512 BF16 or AMX)."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def describe(self) -> str:
        """One line: 'AMD EPYC, 2 cores, avx2 avx512f avx512_vnni avx512_bf16'."""
        return f"{self.model}, {self.cores} cores, {' '.join(self.flags) or 'no AVX2'}"

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "cores": self.cores, "flags": list(self.flags), "vnni": self.vnni, "bf16": self.bf16}


@functools.cache
def cpu_facts() -> CpuFacts:
    """This machine's CPU (read once per process)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CpuFacts(model, cores, tuple(flag for flag in FLAGS_OF_INTEREST if flag in flags))


INT8_FOR_EVERY_CPU = "deploy with deploy.int8_weight_bits: 7 for an INT8 model that keeps its accuracy on every x86 CPU"
"""The fix wherever an INT8 file's 8-bit weights are a problem (the loader's warnings, the model card)."""


def int8_needs_vnni(metadata: Mapping[str, str]) -> bool:
    """Whether an ONNX file's Graft metadata says it is INT8 with 8-bit weights (`graft.int8_weight_bits`, stamped by
    `components.deploy.int8`): exact only on CPUs with VNNI, whose kernels do not saturate (see the module docstring)."""
    return metadata.get("graft.int8_weight_bits") == "8"


def int8_loss_here(metadata: Mapping[str, str], cpu: CpuFacts | None = None) -> str | None:
    """Why an INT8 model would lose accuracy on `cpu` (default: this machine's), or None where it keeps it: an
    8-bit file (`int8_needs_vnni`) on a CPU without VNNI. A 7-bit file, or a file without the stamp, is not flagged."""
    if not int8_needs_vnni(metadata):
        return None
    cpu = cpu or cpu_facts()
    if cpu.vnni:
        return None
    built_on = metadata.get("graft.int8_built_on", "a CPU with VNNI")
    return (f"the INT8 model has 8-bit weights (built on {built_on}), and this CPU ({cpu.describe()}) has no VNNI: "
            "onnxruntime's integer kernels saturate there and the model loses accuracy")


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this process and its waited-for children have used),
    or None where `/proc/stat` is not readable (not Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    own = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def process_cpu_seconds(pids: tuple[int, ...]) -> float:
    """CPU seconds used so far by the processes `pids` (those still running; from /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


class CpuWatch:
    """How many cores other processes kept busy while a block ran: `with CpuWatch() as w: ...; w.others_cores`.

    This process's CPU, its waited-for children's, and that of the processes in `also` (a server started
    in a subprocess that is still running) count as ours. `others_cores` is None where it cannot be read.
    """

    def __init__(self, also: tuple[int, ...] = ()) -> None:
        self.also = also
        self.others_cores: float | None = None
        self.seconds = 0.0

    def __enter__(self) -> CpuWatch:
        self._before, self._also_before, self._started = cpu_seconds(), process_cpu_seconds(self.also), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        after, self.seconds = cpu_seconds(), time.perf_counter() - self._started
        if self._before and after and self.seconds > 0:
            ours = (after[1] - self._before[1]) + (process_cpu_seconds(self.also) - self._also_before)
            self.others_cores = max(0.0, (after[0] - self._before[0]) - ours) / self.seconds
