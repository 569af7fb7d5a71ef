"""Execution providers this machine really has, and onnxruntime sessions on them.
"""

from __future__ import annotations

import ctypes.util
from pathlib import Path

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def _has_tensorrt() -> bool:
    return any(ctypes.util.find_library(name) for name in ("nvinfer", "nvinfer_10"))


def choose_providers(available: list[str] | None = None) -> list[str]:
    """Execution providers in order TensorRT, CUDA, CPU, keeping only those this machine can run.

    onnxruntime-gpu lists CUDA and TensorRT even where no GPU exists, and asking
    for them there prints long library errors before it falls back; so a GPU
    provider is asked for only when an NVIDIA driver is present.
    """
    import onnxruntime as ort

    available = available if available is not None else ort.get_available_providers()
    gpu = has_nvidia_gpu()
    order = []
    if gpu and "TensorrtExecutionProvider" in available and _has_tensorrt():
        order.append("TensorrtExecutionProvider")
    if gpu and "CUDAExecutionProvider" in available:
        order.append("CUDAExecutionProvider")
    order.append("CPUExecutionProvider")
    return order


_SPIN_WAITING = True  # onnxruntime's own default; `graft serve` turns it off (use_spin_waiting)


def use_spin_waiting(enabled: bool) -> None:
    """Whether the sessions this process opens from now on let their intra-op threads spin-wait after each run.

    onnxruntime's default (on) trims latency on a machine the process has to itself. A server shares its
    cores with its HTTP workers: there spinning threads burn the cores the requests need (measured on 2
    cores, `graft serve` spent 7-9 ms of CPU per request with spinning and 3.7 ms without), so `graft serve`
    turns it off."""
    global _SPIN_WAITING  # noqa: PLW0603 - one process-wide setting, set once at start-up
    _SPIN_WAITING = enabled


def session_options(threads: int = 0, spin: bool | None = None):  # noqa: ANN201 - onnxruntime.SessionOptions
    """Quiet onnxruntime session options; `threads` 0 is onnxruntime's default (one per physical core);
    `spin` None follows `use_spin_waiting`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not (_SPIN_WAITING if spin is None else spin):
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: Path, threads: int = 0, spin: bool | None = None):  # noqa: ANN201 - onnxruntime.InferenceSession
    """An onnxruntime session on the providers this machine really has (as `graft predict` uses)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, spin), providers=choose_providers())
