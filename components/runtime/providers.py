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


def open_session(path: Path, threads: int = 0):  # noqa: ANN201 - onnxruntime.InferenceSession
    """An onnxruntime session on the providers this machine really has (as `graft predict` uses)."""
    import onnxruntime as ort


    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=choose_providers())
