"""The eigen- and singular value decompositions of calibration, on one thread.

LAPACK's symmetric eigensolvers and SVDs collapse when their threads compete for busy cores:
measured on the shared 2-core machine at load ~6, an ``eigh`` of a 512 x 512 float32 Gram took
8.2 s on two threads and 0.02 s on one, an SVD of a 512 x 2048 matrix 11 s against 0.05 s. The
sketch's shrink does one such ``eigh`` every ``l`` rows, so every decomposition here runs on one
intra-op thread (:func:`ttcompress.decompose._threads.at_most_threads`); the products around them
keep every thread.
"""

from __future__ import annotations

import torch

from ttcompress.decompose._threads import at_most_threads

__all__ = ["eigh", "svd"]


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(a)`` on one thread."""
    with at_most_threads(1):
        return torch.linalg.eigh(a)


def svd(a: torch.Tensor, *, full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=...)`` on one thread."""
    with at_most_threads(1):
        return torch.linalg.svd(a, full_matrices=full_matrices)
