"""Truncated SVD of a weight matrix: ``W ~= L R`` with ``L = U_r S_r^{1/2}``, ``R = S_r^{1/2} V_r^T``.

By the Eckart-Young theorem [1]_ the rank-``r`` truncation is the best rank-``r`` approximation in
the Frobenius norm, with error ``sqrt(sum_{j >= r} s_j^2)``. A Linear layer ``y = W x + b`` then
costs ``r (m + n)`` parameters and multiply-adds per sample instead of ``m n`` (Denton et al. [2]_).

References
----------
.. [1] C. Eckart and G. Young, "The approximation of one matrix by another of lower rank",
       Psychometrika 1(3), 1936.
.. [2] E. Denton, W. Zaremba, J. Bruna, Y. LeCun, R. Fergus, "Exploiting Linear Structure Within
       Convolutional Networks for Efficient Evaluation", NeurIPS 2014.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LowRankMatrix", "svd_param_count", "svd_rank_for_ratio", "truncated_svd"]


@dataclass(frozen=True)
class LowRankMatrix:
    """``matrix ~= left @ right``; ``left`` is ``(m, r)``, ``right`` is ``(r, n)``.

    ``rel_error`` is ``||W - left @ right||_F / ||W||_F`` (0 for a zero matrix).
    """

    left: torch.Tensor
    right: torch.Tensor
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def to_matrix(self) -> torch.Tensor:
        return self.left @ self.right


def _check_rank(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def svd_param_count(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of the two factors (no bias): ``rank * (out_features + in_features)``."""
    for name, v in (("out_features", out_features), ("in_features", in_features), ("rank", rank)):
        _check_rank(v, name)
    return rank * (out_features + in_features)


def svd_rank_for_ratio(out_features: int, in_features: int, ratio: float, *, bias: bool = False) -> int:
    """Largest rank whose factors (and bias) are at least ``ratio`` times smaller than the dense layer.

    Returns 0 when even rank 1 does not reach ``ratio``.
    """
    _check_rank(out_features, "out_features")
    _check_rank(in_features, "in_features")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be a positive number, got {ratio!r}")
    extra = out_features if bias else 0
    budget = (out_features * in_features + extra) / ratio - extra
    return max(0, min(int(budget // (out_features + in_features)), min(out_features, in_features)))


def truncated_svd(matrix: torch.Tensor, *, rank: int | None = None, eps: float | None = None) -> LowRankMatrix:
    """Best low-rank approximation of ``matrix`` by truncated SVD (computed in float64).

    Parameters
    ----------
    matrix : torch.Tensor
        2-D, finite.
    rank : int, optional
        Keep at most ``rank`` singular values (capped at ``min(m, n)``).
    eps : float, optional
        Keep the fewest singular values with ``||W - W_r||_F <= eps ||W||_F``, ``eps`` in (0, 1).
        At least one of ``rank``/``eps`` is required; with both, the smaller rank wins.

    Returns
    -------
    LowRankMatrix
        Factors in ``matrix``'s dtype and device, singular values split evenly between them.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix must be a 2-D tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
    if rank is None and eps is None:
        raise ValueError("give rank or eps (or both)")
    if rank is not None:
        _check_rank(rank, "rank")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a relative error in (0, 1), got {eps!r}")
    w = matrix.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("matrix contains NaN or Inf")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    tails = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)])  # tails[r] = error^2 at rank r
    total = float(tails[0])
    r = s.numel() if rank is None else min(rank, s.numel())
    if eps is not None:
        ok = (tails <= (eps * eps) * total).nonzero()
        r = min(r, max(1, int(ok[0])))
    r = max(r, 1)
    root = s[:r].sqrt()
    left = (u[:, :r] * root).to(matrix.dtype)
    right = (root[:, None] * vh[:r]).to(matrix.dtype)
    rel = math.sqrt(float(tails[r]) / total) if total > 0 else 0.0
    return LowRankMatrix(left, right, rel)
