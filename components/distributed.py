"""Training in several processes: PyTorch's `torchrun` launcher and DistributedDataParallel.

With `train.processes: N` above 1, the fine-tune step does not train in its own
process. It writes the job (parameters, split, backbone) to the run folder and
starts

    python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=N -m components.distributed JOB

on this machine: one process per GPU (NCCL), or N CPU processes (gloo) where
there is no CUDA, which is how the tests run it. Every process runs the same
strategy function as a single-process run (`components.train`); the network
step (`components.network`) sees the process group and then

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

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from components import errors
from components.config import Params
from components.data import Split
from components.errors import GraftError, TrainingError
from components.loop import MetricsCallback, ResumeStore, save_checkpoint

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.jsonl"
OUTCOME_FILE = "outcome.pt"
ERROR_FILE = "error.json"
LOG_FILE = "torchrun.log"


@dataclass(frozen=True)
class World:
    """This process's place in the process group; rank 0 of 1 outside distributed training."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The current process group's rank and size (0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shard(index: torch.Tensor, place: World) -> torch.Tensor:
    """This process's share of one batch: every `size`-th image from its rank on.

    The shares of all processes partition the batch, and differ in size by at most one image.
    """
    return index[place.rank :: place.size] if place.distributed else index


def all_sum(values: list[float], device: str) -> list[float]:
    """Element-wise sum of `values` over every process (the values themselves outside distributed training)."""
    if not world().distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every process process 0's buffers (BatchNorm statistics recomputed in each process)."""
    if world().distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's tensors, to check the processes ended with the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- the parent: launch, follow, collect ---------------------------------------------------------------


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


def launch_command(processes: int, job: Path) -> list[str]:
    """The torchrun command line that trains the job in `processes` processes on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={processes}", "-m", "components.distributed", str(job),
    ]


def _error_from(job_dir: Path, returncode: int, command: list[str]) -> GraftError:
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


class _Progress:
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
    from components.prepare import sample_rows  # not at the top: prepare -> evaluate -> train imports this module

    job = job_dir / JOB_FILE
    job.write_text(json.dumps({  # the split as `graft prepare` writes it, so `read_split` reads it back
        "params": params.model_dump(mode="json"), "backbone": backbone, "image_size": size, "resume_key": resume_key,
        "root": str(split.root), "classes": list(split.classes), "presplit": split.presplit,
        "train": sample_rows(split.train, split.root), "val": sample_rows(split.val, split.root),
    }))
    command = launch_command(params.train.processes, job)
    backend = "NCCL, one GPU each" if uses_cuda(params) else "gloo on the CPU"
    log.info("fine-tune in %d processes (%s): %s", params.train.processes, backend, " ".join(command))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    progress = _Progress(job_dir / PROGRESS_FILE, on_epoch)
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
        raise _error_from(job_dir, process.returncode, command)
    return torch.load(job_dir / OUTCOME_FILE, map_location="cpu", weights_only=True)


# --- a process under torchrun ------------------------------------------------------------------------


def _rank_output(job_dir: Path, rank: int) -> None:
    """Processes other than 0 write their output to their own log file (process 0's is torchrun.log)."""
    if rank == 0:
        return
    log_file = os.open(job_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_file, 1)
    os.dup2(log_file, 2)
    os.close(log_file)


def worker(job: Path) -> None:
    """One training process: join the group, run the strategy, and (process 0) write the outcome."""
    from components.prepare import read_split
    from components.train import run_strategy  # the strategies call back into this module
    from components.zoo import configure

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    _rank_output(job.parent, rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s")
    raw = json.loads(job.read_text())
    params = Params.model_validate(raw["params"])
    cuda = uses_cuda(params)
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        configure(params.choose)
        place = world()
        progress = job.parent / PROGRESS_FILE

        def record(metrics: dict[str, float], step: int) -> None:
            with open(progress, "a") as file:
                file.write(json.dumps({"metrics": metrics, "step": step}) + "\n")

        store = ResumeStore(params.data.cache_dir / "resume", raw["resume_key"], params.train.resume, params.model_dump(mode="json"), writer=place.main)
        outcome = run_strategy(params, read_split(job, Path(raw["root"])), raw["backbone"], raw["image_size"], store, record if place.main else None)
        digests: list[str] = [""] * place.size
        dist.all_gather_object(digests, outcome.digest)
        if place.main:
            if len(set(digests)) != 1:
                raise TrainingError(
                    "the training processes ended with different weights, which DistributedDataParallel should "
                    "prevent; rerun with --set train.processes=1 and report this with the rank logs"
                )
            save_checkpoint(job.parent / OUTCOME_FILE, **outcome.to_dict())
    except GraftError as exc:
        if rank == 0:
            (job.parent / ERROR_FILE).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m components.distributed JOB_JSON (train.processes > 1 starts this for you)")
    worker(Path(sys.argv[1]))
