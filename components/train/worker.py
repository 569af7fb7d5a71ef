"""One training process under `torchrun` (`train.processes` above 1; `components.train.launcher` starts it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from components.backbones.zoo import register_backbones
from components.core.config import Params
from components.core.errors import GraftError, TrainingError
from components.data.split import read_split
from components.train.collectives import world
from components.train.launcher import ERROR_FILE, OUTCOME_FILE, PROGRESS_FILE, uses_cuda
from components.train.loop import ResumeStore, save_checkpoint
from components.train.strategies import run_strategy


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
        register_backbones(params.choose)
        place = world()
        progress = job.parent / PROGRESS_FILE

        def record(metrics: dict[str, float], step: int) -> None:
            with open(progress, "a") as file:
                file.write(json.dumps({"metrics": metrics, "step": step}) + "\n")

        store = ResumeStore(params.data.resume_dir, raw["resume_key"], params.train.resume, params.model_dump(mode="json"), writer=place.main)
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
        sys.exit("usage: torchrun ... -m components.train.worker JOB_JSON (train.processes > 1 starts this for you)")
    worker(Path(sys.argv[1]))
