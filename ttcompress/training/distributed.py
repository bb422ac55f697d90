"""``torchrun`` helpers: process-group setup and teardown, reductions, barriers, data sharding.

Every helper is a no-op in a single process (``WORLD_SIZE`` unset or 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from ttcompress.report.evaluation import resolve_device

__all__ = ["Dist", "all_reduce", "barrier", "setup", "shard", "teardown"]


@dataclass
class Dist:
    """This process's place in the run: world size, ranks, and whether it created the group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_spec: str) -> tuple[Dist, torch.device]:
    """Join (or create) the process group when ``WORLD_SIZE > 1``; the device of this process.

    NCCL on CUDA (``cuda:LOCAL_RANK`` for ``auto``/``cuda``), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_spec)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec = device_spec.strip().lower()
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = resolve_device(spec)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(world, dist.get_rank(), local_rank, owns), device


def teardown(ctx: Dist) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, ctx: Dist, op: str = "sum") -> torch.Tensor:
    """Sum (or max, ``op="max"``) ``t`` in place over all processes; returns ``t``."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def barrier(ctx: Dist) -> None:
    """Wait for every process."""
    if ctx.enabled:
        dist.barrier()


def shard(dataset: Dataset, ctx: Dist) -> Dataset:
    """Every ``world_size``-th sample for this rank, without padding (exact distributed eval)."""
    if not ctx.enabled:
        return dataset
    return Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))  # type: ignore[arg-type]
