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
