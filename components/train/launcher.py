"""Training in several processes: PyTorch's `torchrun` launcher and DistributedDataParallel.

With `train.processes: N` above 1, the fine-tune step does not train in its own
process. It writes the job (parameters, split, backbone) to the run folder and
starts

    python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=N -m components.train.worker JOB

on this machine: one process per GPU (NCCL), or N CPU processes (gloo) where
there is no CUDA, which is how the tests run it. Every process runs the same
strategy function as a single-process run (`components.train.strategies`); the network
step (`components.train.network`) sees the process group and then

- wraps the trained part in `DistributedDataParallel`, so gradients are
  averaged over the processes at every step;
- gives each process its share of every batch of `train.batch_size` images
  (the global batch is the same as in one process, and so is the learning
  rate);
- scores validation on a share of the images each and adds the sums up, so
  every process takes the same early-stopping decision.

Process 0 alone writes epoch checkpoints (a resumed run continues from them),
the per-epoch metrics (which the parent process reads as they come, logs, and
sends to MLflow) and the outcome. The launcher's and process 0's output go to
`torchrun.log` in the job folder, the other processes' to `rank<N>.log`, and a
failure reaches the parent as the error the process raised. At the end every process hashes its weights and process 0 checks
they are identical, which is what DistributedDataParallel promises. The parent
then saves the checkpoint and the flow evaluates and registers in its own
process, as after a single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from components.core import errors
from components.core.config import Params
from components.core.errors import GraftError, TrainingError
from components.data.split import Split, split_document
from components.runtime.cpu import cpu_facts
from components.train.loop import MetricsCallback

log = logging.getLogger(__name__)


JOB_FILE = "job.json"


PROGRESS_FILE = "progress.jsonl"


OUTCOME_FILE = "outcome.pt"


ERROR_FILE = "error.json"


LOG_FILE = "torchrun.log"


def uses_cuda(params: Params) -> bool:
    """Whether the training processes run on GPUs (NCCL) rather than the CPU (gloo)."""
    return params.train.device != "cpu" and torch.cuda.is_available()


def check_setup(params: Params, cuda_devices: int | None = None) -> None:
    """Refuse a `train.processes` this machine or batch size cannot serve.

    Raises:
        TrainingError: more processes than CUDA devices, or a batch too small to share.
    """
    cfg = params.train
    devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if cfg.device != "cpu" and devices and cfg.processes > devices:
        raise TrainingError(
            f"train.processes={cfg.processes} but torch sees {devices} CUDA device(s); one process trains on one "
            f"GPU: use --set train.processes={devices}"
        )
    if cfg.batch_size < 2 * cfg.processes:
        raise TrainingError(
            f"train.batch_size={cfg.batch_size} cannot be shared by train.processes={cfg.processes} (every process "
            f"needs at least 2 images of each batch): use --set train.batch_size={2 * cfg.processes} or more"
        )
    cores = cpu_facts().cores
    if not (cfg.device != "cpu" and devices) and cfg.processes > cores:
        log.warning("train.processes=%d on %d CPU core(s): the processes take turns on the cores, and each step waits for "
                    "the slowest; --set train.processes=%d trains at least as fast", cfg.processes, cores, cores)


ELASTIC_LOG_DIR = "torchrun-logs"
"""torchrun's own folders, in the job folder: left to itself it makes a `torchelastic_*` folder in /tmp per run and keeps it."""


def launch_command(processes: int, job: Path) -> list[str]:
    """The torchrun command line that trains the job in `processes` processes on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={processes}", f"--log-dir={job.parent / ELASTIC_LOG_DIR}",
        "-m", "components.train.worker", str(job),
    ]


def error_from_job(job_dir: Path, returncode: int, command: list[str]) -> GraftError:
    error_file = job_dir / ERROR_FILE
    if error_file.is_file():
        raw = json.loads(error_file.read_text())
        kind = getattr(errors, raw.get("type", ""), None)
        if isinstance(kind, type) and issubclass(kind, GraftError):
            return kind(raw["message"])
        return TrainingError(f"distributed training failed: {raw.get('type')}: {raw.get('message')}")
    output = job_dir / LOG_FILE
    lines = output.read_text(errors="replace").splitlines() if output.is_file() else []
    cause = next((line.strip() for line in reversed(lines) if "Error" in line and not line.startswith(" ")), "")
    return TrainingError(
        f"distributed training failed (torchrun exit {returncode}{'; ' + cause[:300] if cause else ''}); the "
        f"processes' output is in {output} and {job_dir}/rank*.log. Command: {' '.join(command)}. "
        "Try --set train.processes=1 to train in one process"
    )


class EpochProgress:
    """Follows process 0's per-epoch metrics file and hands each new line to the callback."""

    def __init__(self, path: Path, on_epoch: MetricsCallback | None) -> None:
        self.path, self.on_epoch, self.offset = path, on_epoch, 0

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            entry = json.loads(line)
            metrics = entry["metrics"]
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f", entry["step"],
                metrics.get("train/loss", float("nan")), metrics.get("val/loss", float("nan")),
                metrics.get("val/accuracy", float("nan")),
            )
            if self.on_epoch:
                self.on_epoch(metrics, entry["step"])


def run_distributed(params: Params, split: Split, backbone: str, size: int, resume_key: str, job_dir: Path, on_epoch: MetricsCallback | None) -> dict:
    """Train in `train.processes` processes under torchrun; returns process 0's outcome.

    The outcome holds what a single-process strategy returns: head, backbone (when trained),
    history, best epoch and loss, and the epoch a resumed run continued after.

    Raises:
        TrainingError (or the GraftError a process raised): training failed in a process.
    """
    check_setup(params)
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in (PROGRESS_FILE, OUTCOME_FILE, ERROR_FILE):
        (job_dir / name).unlink(missing_ok=True)

    job = job_dir / JOB_FILE
    job.write_text(json.dumps({  # the split as `graft prepare` writes it, so `read_split` reads it back
        "params": params.model_dump(mode="json"), "backbone": backbone, "image_size": size, "resume_key": resume_key,
        "root": str(split.root), **split_document(split),
    }))
    command = launch_command(params.train.processes, job)
    backend = "NCCL, one GPU each" if uses_cuda(params) else "gloo on the CPU"
    log.info("fine-tune in %d processes (%s): %s", params.train.processes, backend, " ".join(command))
    # this process's own sys.path ('' is the folder it started in), without the folder `python -m` would put first in
    # torchrun's processes (PYTHONSAFEPATH, which they inherit): a project's own file named like a library (click.py,
    # typing.py) must not stand in for it there when it does not here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path), "PYTHONSAFEPATH": "1"}
    progress = EpochProgress(job_dir / PROGRESS_FILE, on_epoch)
    with open(job_dir / LOG_FILE, "wb") as output:  # this process logs each epoch as process 0 ends it
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        while process.poll() is None:
            time.sleep(0.5)
            progress.poll()
    finally:
        if process.poll() is None:  # interrupted: stop every training process
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    progress.poll()
    if process.returncode != 0 or not (job_dir / OUTCOME_FILE).is_file():
        raise error_from_job(job_dir, process.returncode, command)
    return torch.load(job_dir / OUTCOME_FILE, map_location="cpu", weights_only=True)
