"""This process's place in a distributed training run, and the few collective operations training uses.

Outside `torchrun` every function here is the identity: rank 0 of 1, the whole batch, sums of one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
