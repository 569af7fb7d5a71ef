"""Execution providers this machine really has, and onnxruntime sessions on them.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from components.core.files import cached_sha256, user_cache_dir

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

TENSORRT_CACHE_ENV = "GRAFT_TENSORRT_CACHE"


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


def tensorrt_cache_root() -> Path:
    """Where TensorRT's engines and timing cache are kept: `$GRAFT_TENSORRT_CACHE`, else
    `$XDG_CACHE_HOME/graft/tensorrt` (`~/.cache/graft/tensorrt`)."""
    return Path(os.environ.get(TENSORRT_CACHE_ENV) or user_cache_dir() / "tensorrt")


def tensorrt_options(model: Path, sha256: str | None = None) -> dict[str, str]:
    """TensorRT's provider options for `model`: its engines kept on disk, so that only the first session
    on this machine builds them (seconds to minutes), and the timing cache shared by every model.

    onnxruntime names a cached engine after the model's file name and its graph's node names, not its
    weights: a new version of the same architecture, also `model.onnx`, would load the old version's
    engine. So each model file gets a folder of its own, named by its sha256 (`sha256` when the caller
    checked it already). A folder that cannot be made costs the cache, not the session: a warning, and
    TensorRT builds its engines in every process.
    """
    root = tensorrt_cache_root()
    digest = sha256 or cached_sha256(Path(model))
    engines, timing = root / digest[:16], root / "timing"
    try:
        for folder in (engines, timing):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        log.warning("TensorRT engine cache %s cannot be made (%s): engines are built in every process; "
                    "set %s to a folder you can write to", root, exc.strerror or exc, TENSORRT_CACHE_ENV)
        return {}
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(timing),
    }


def session_providers(names: Sequence[str], model: Path, sha256: str | None = None) -> list[str | tuple[str, dict[str, str]]]:
    """`names` as onnxruntime's `providers` argument for a session on `model`: TensorRT with its options
    (`tensorrt_options`), the others by name. The precision is the file's: TensorRT runs an fp32 file
    in fp32 (no `trt_fp16_enable`) and the fp16 variant in fp16, so what runs is what the deploy stage judged."""
    chosen: list[str | tuple[str, dict[str, str]]] = []
    for name in names:
        options = tensorrt_options(model, sha256) if name == "TensorrtExecutionProvider" else {}
        chosen.append((name, options) if options else name)
    return chosen


def open_session(path: Path, threads: int = 0, spin: bool | None = None, providers: Sequence[str] | None = None):  # noqa: ANN201 - onnxruntime.InferenceSession
    """An onnxruntime session on `providers`, by default those this machine really has (as `graft predict` uses)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, spin), providers=session_providers(providers or choose_providers(), path))
