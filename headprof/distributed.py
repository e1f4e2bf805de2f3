"""Processes launched by `torchrun` or `accelerate launch`: who this process is, and the few collectives
scoring and eval need (probes or eval items are sharded by index; results are gathered after each round
of probes, eval rows at the end).

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the process group is
created on first use with NCCL when every process has a GPU and gloo otherwise (CPU runs, tests). A
plain `python -m headprof` run is a world of one and touches nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from headprof.errors import HeadprofError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """`auto` on a multi-GPU launch means this process's own GPU."""
        if self.size > 1 and requested == "auto" and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def shard(self, items: list[Any]) -> list[Any]:
        """This process's share: every size-th item from its rank, so lengths and depths stay mixed."""
        return items[self.rank::self.size]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (a world of one: [obj])."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: HeadprofError | None) -> None:
        """Raise on every process when any process failed (e.g. could not load the model), so none is
        left waiting for the others."""
        errors = self.gather(None if error is None else str(error))
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise HeadprofError(message if self.size == 1 else f"process {rank} of {self.size}: {message}")

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world() -> World:
    """This process's place in the launch (initialising the process group when launched with several)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if gpu:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
