"""The few torch.distributed calls the trainer needs, and a no-op stand-in for a single process.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; the process group uses
gloo on the CPU and nccl on CUDA. Every rank runs the same loop and draws the same random numbers
(one shared seed), taking its own slice of each global batch, so N processes at batch b train
like one process at batch N*b.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over all ranks (for logging the global loss)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def share_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (the others pass None): a uint8 tensor broadcast, no pickle."""
        if not self.enabled:
            return text or ""
        data = torch.tensor(list((text or "").encode("utf-8")) if self.is_main else [], dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
        torch.distributed.broadcast(size, src=0)
        if not self.is_main:
            data = torch.empty(int(size), dtype=torch.uint8)
        torch.distributed.broadcast(data, src=0)
        return bytes(data.tolist()).decode("utf-8")

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def from_environment() -> Dist:
    """Join the process group torchrun describes, or a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("FROZENTUNE_DDP_BACKEND", "") != "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    initialized_here = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    log.info("ControlNet-Zero: rank %d of %d (%s)", rank, world, "nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, initialized_here)
