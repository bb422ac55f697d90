"""CP-ALS of many independent kernels, optionally in several worker processes."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ttcompress.decompose.cp import CPDecomposition, cp_als

__all__ = ["cp_als_many"]


def _timed_cp_als(kernel: torch.Tensor, rank: int, name: str | None, threads: int | None,
                  options: dict[str, Any]) -> tuple[CPDecomposition, float]:
    if threads is not None:
        torch.set_num_threads(threads)  # a worker process of its own
    start = time.perf_counter()
    result = cp_als(kernel, rank=rank, name=name, **options)
    return result, time.perf_counter() - start


def cp_als_many(
    jobs: Sequence[tuple[torch.Tensor, int]],
    *,
    names: Sequence[str] | None = None,
    workers: int = 1,
    on_done: Callable[[int, CPDecomposition, float], None] | None = None,
    **options: Any,
) -> list[tuple[CPDecomposition, float]]:
    """Decompose independent kernels with :func:`cp_als`; ``(result, seconds)`` in job order.

    Parameters
    ----------
    jobs : sequence of (torch.Tensor, int)
        ``(kernel, rank)`` pairs.
    names : sequence of str, optional
        Layer names for warnings, one per job.
    workers : int, default 1
        ``1``: in this process, in order. ``> 1``: that many spawned worker processes, each
        with ``torch.get_num_threads() // workers`` threads (at least 1), largest kernels first.
        Worth it when many kernels are too small to keep every core busy on their own.
    on_done : callable, optional
        ``on_done(index, result, seconds)``, called in this process as each job finishes (in
        completion order), e.g. to advance a per-layer progress bar.
    **options
        Keyword options of :func:`cp_als` (``n_iter_max``, ``tol``, ``init``, ...); a
        ``progress`` callback is only supported with ``workers=1``.

    Returns
    -------
    list of (CPDecomposition, float)
        Result and wall seconds of each job.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    labels = list(names) if names is not None else [None] * len(jobs)
    if len(labels) != len(jobs):
        raise ValueError(f"names must have one entry per job ({len(jobs)}), got {len(labels)}")
    if workers > 1 and options.get("progress") is not None:
        raise ValueError("progress is only supported with workers=1 (use on_done)")
    results: list[tuple[CPDecomposition, float] | None] = [None] * len(jobs)
    if workers == 1:
        for i, ((kernel, rank), label) in enumerate(zip(jobs, labels)):
            results[i] = _timed_cp_als(kernel, rank, label, None, options)
            if on_done is not None:
                on_done(i, *results[i])
        return results  # type: ignore[return-value]
    threads = max(1, torch.get_num_threads() // workers)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].numel() * jobs[i][1])
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {
            pool.submit(_timed_cp_als, jobs[i][0].detach().cpu(), jobs[i][1], labels[i], threads, options): i
            for i in order
        }
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            result, seconds = future.result()
            device = jobs[i][0].device
            result = CPDecomposition(
                factors=tuple(f.to(device) for f in result.factors),  # type: ignore[arg-type]
                rank=result.rank, rel_error=result.rel_error, n_iter=result.n_iter,
            )
            results[i] = (result, seconds)
            if on_done is not None:
                on_done(i, result, seconds)
    return results  # type: ignore[return-value]
