"""Decompose the layers of one model in several processes under ``torchrun``.

:func:`build_all` is what :func:`ttcompress.compression.pipeline.compress_with_report` calls to build the
replacement of every planned layer. In a single process it builds them one after the other. In a
``torch.distributed`` group of ``N`` processes (``torchrun --nproc_per_node N -m ttcompress
decompose ...``) each rank decomposes its share of the layers on its own device — the shares are
balanced by the dense layers' parameter counts, largest first, and are the same on every rank —
and then every rank receives every other rank's layers (format name, ``config()`` and state dict,
sent with ``all_gather_object``) and rebuilds them through the format registry, so that all ranks
end with the same compressed model and rank 0 can write it. The result equals a single process's:
each layer is decomposed by the same deterministic code, only in another process.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ttcompress.formats import LayerDecision, format_of, get_format
from ttcompress.formats.base import BuildResult

__all__ = ["assign_shares", "build_all", "process_group", "world"]

#: Attributes of a freshly built layer that are not in its state dict but that records read.
_CARRIED = ("rel_error", "n_iter")

BuildFn = Callable[[LayerDecision], BuildResult]
ProgressFn = Callable[[int, int, str], None]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current ``torch.distributed`` group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group() -> Iterator[int]:
    """Join the ``torchrun`` group for the ``with`` block when ``WORLD_SIZE > 1`` (gloo; decomposition
    runs on each process's CPU/GPU itself), yielding this process's rank; a no-op yielding 0
    otherwise. The group is destroyed at the end only if this call created it, after a barrier so
    that rank 0 has finished writing before any process leaves."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        created = True
    try:
        yield world()[0]
        if world()[1] > 1:
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def assign_shares(decisions: Sequence[LayerDecision], world_size: int) -> list[int]:
    """The rank that builds each decision: largest layers first, each to the least-loaded rank
    (ties to the lowest rank), so every process computes the same assignment."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owner = [0] * len(decisions)
    loads = [(0, r) for r in range(world_size)]
    order = sorted(range(len(decisions)), key=lambda i: (-decisions[i].params_before, i))
    for i in order:
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + max(decisions[i].params_before, 1), rank))
    return owner


def _package(built: BuildResult) -> dict[str, Any]:
    layer = built.layer
    fmt = format_of(layer)
    if fmt is None:
        raise RuntimeError(f"built layer of type {type(layer).__name__} belongs to no registered format")
    return {
        "format": fmt.name,
        "config": layer.config(),
        "state": {k: v.detach().to("cpu") for k, v in layer.state_dict().items()},
        "carried": {a: getattr(layer, a) for a in _CARRIED if getattr(layer, a, None) is not None},
        "note": built.note,
    }


def _unpack(package: dict[str, Any], device: torch.device | None) -> BuildResult:
    layer = get_format(package["format"]).rebuild(package["config"])
    layer.load_state_dict(package["state"], strict=True)
    for attr, value in package["carried"].items():
        setattr(layer, attr, value)
    return BuildResult.of(layer.to(device) if device is not None else layer, note=package["note"])


def build_all(
    decisions: Sequence[LayerDecision],
    build: BuildFn,
    *,
    device_of: Callable[[LayerDecision], torch.device | None] = lambda _d: None,
    progress: ProgressFn | None = None,
) -> dict[str, tuple[BuildResult, float]]:
    """Build every decision's layer: ``{name: (build result, seconds to decompose it)}``.

    Parameters
    ----------
    decisions : sequence of LayerDecision
        The layers to build (none skipped).
    build : callable
        ``build(decision) -> BuildResult``, the decomposition of one layer (data-free: a build's
        calibration fit does not travel between processes).
    device_of : callable, optional
        Where a layer received from another rank goes (the dense layer's device).
    progress : callable, optional
        ``progress(done, total, name)`` before each layer this process builds, and once at the end.
    """
    rank, size = world()
    owner = assign_shares(decisions, size) if size > 1 else [0] * len(decisions)
    mine = [d for d, o in zip(decisions, owner) if o == rank]
    built: dict[str, tuple[BuildResult, float]] = {}
    for i, d in enumerate(mine):
        if progress is not None:
            progress(i, len(mine), d.name)
        start = time.perf_counter()
        built[d.name] = (build(d), time.perf_counter() - start)
    if progress is not None:
        progress(len(mine), len(mine), "")
    if size == 1:
        return built
    local = {name: (_package(result), seconds) for name, (result, seconds) in built.items()}
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, local)
    by_name = {d.name: d for d in decisions}
    for part in gathered:
        for name, (package, seconds) in part.items():
            if name not in built:
                built[name] = (_unpack(package, device_of(by_name[name])), seconds)
    return {d.name: built[d.name] for d in decisions}
