"""A context manager that lowers PyTorch's intra-op thread count for a block and restores it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["at_most_threads"]


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
