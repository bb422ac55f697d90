"""A context manager that lowers PyTorch's intra-op thread count for a block and restores it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["SMALL_WORK", "at_most_threads", "few_threads"]

#: Below this many multiply-adds (per ALS step or HOOI sweep), a decomposition runs on one thread.
SMALL_WORK = 1_000_000_000


@contextlib.contextmanager
def at_most_threads(count: int) -> Iterator[None]:
    """Run the block with at most ``count`` intra-op threads, restoring the setting afterwards.

    Small LAPACK and BLAS calls pay a thread wake-up per call and, on a busy machine, much more:
    measured on the shared 2-core machine, a thin QR of a 4096 x 74 float32 block took 0.55 s on
    two threads and 0.019 s on one. Symmetric eigensolvers suffer most: at load average 14, an
    ``eigvalsh`` of a 1024 x 1024 float64 Gram matrix took 24-71 s on two threads and 2.0-2.8 s on
    one (256 x 256: up to 8 s against 0.05-0.1 s), so every ``eigh``/``eigvalsh`` of the
    decompositions runs on one thread. The setting is process-wide (``torch.set_num_threads``).
    """
    before = torch.get_num_threads()
    if before <= count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def few_threads(work: int) -> Iterator[None]:
    """Run tiny problems on one intra-op thread, restoring the setting afterwards.

    ALS is thousands of small and mid-size matrix products; with several threads each one pays
    a thread wake-up (measured 2 ms instead of 20 us per tiny product on the shared 2-core
    machine). Measured there, 20 ALS sweeps took 0.32 s on one thread vs 1.12 s on two for a
    128x128x3x3 kernel at rank 64, and 6.2 s vs 12.4 s for 512x512x3x3 at rank 256, so every
    kernel up to that size (work = numel * R < :data:`SMALL_WORK`) runs on one thread. Tucker-2
    (HOSVD + HOOI) likewise: a 64x64x3x3 kernel at ranks (40, 40) took 11.9 s on two threads and
    1.2 s on one at load average 14.
    """
    if work >= SMALL_WORK:
        yield
        return
    with at_most_threads(1):
        yield
