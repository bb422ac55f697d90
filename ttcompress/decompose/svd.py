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

from ttcompress.decompose._threads import at_most_threads

__all__ = [
    "RANDOMIZED_MIN_SIZE",
    "LowRankMatrix",
    "randomized_svd",
    "svd_param_count",
    "svd_rank_for_ratio",
    "truncated_svd",
    "use_randomized_svd",
]

#: :func:`use_randomized_svd`: the smaller side from which a truncated SVD is randomized.
RANDOMIZED_MIN_SIZE = 512
#: :func:`use_randomized_svd`: ranks up to this fraction of the smaller side are randomized.
RANDOMIZED_MAX_FRACTION = 0.25


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


def use_randomized_svd(rows: int, cols: int, rank: int) -> bool:
    """True when a rank-``rank`` truncated SVD of a ``rows x cols`` matrix is cheaper randomized:
    the smaller side is at least :data:`RANDOMIZED_MIN_SIZE` and ``rank`` at most
    :data:`RANDOMIZED_MAX_FRACTION` of it (a full SVD costs ``O(rows cols min)``, the randomized one
    ``O(rows cols rank)`` per pass)."""
    small = min(rows, cols)
    return small >= RANDOMIZED_MIN_SIZE and rank <= RANDOMIZED_MAX_FRACTION * small


def randomized_svd(matrix: torch.Tensor, rank: int, *, power_iters: int = 3, oversample: int | None = None,
                   seed: int = 0, dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of ``matrix`` by a seeded randomized range finder.

    Halko, Martinsson and Tropp [3]_ (Algorithm 4.4, subspace iteration): ``Y = (A A^T)^q A Omega``
    for a Gaussian ``Omega`` of ``rank + p`` columns, re-orthonormalised after every product; the
    SVD of the small ``Q^T A`` gives the triplets. The products run in ``dtype`` (float32 by
    default: the basis only needs to span the leading subspace), the small SVD in float64. Cost
    ``(2 q + 2)`` products with ``rank + p`` columns instead of a full SVD. On a flat spectrum
    (a random weight, isotropic inputs) the error ``||A - U S V^T||_F`` exceeds the optimum by
    about 1 % at ``q = 3`` and ``p = rank / 4`` (``tests/test_decompose_svd.py``); a decaying
    spectrum converges faster.

    Parameters
    ----------
    matrix : torch.Tensor
        2-D.
    rank : int
        Triplets wanted (capped at ``min(matrix.shape)``).
    power_iters : int, default 3
        Subspace iterations ``q``.
    oversample : int, optional
        Extra columns ``p``; default ``max(10, rank // 4)``.
    seed : int, default 0
        Seed of ``Omega`` (the result is deterministic).
    dtype : torch.dtype, default torch.float32
        Precision of the large products.

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor)
        ``U`` ``(rows, r)``, ``S`` ``(r,)`` descending and ``Vh`` ``(r, cols)``, float64 on
        ``matrix``'s device.

    References
    ----------
    .. [3] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding Structure with Randomness:
           Probabilistic Algorithms for Constructing Approximate Matrix Decompositions", SIAM
           Review 53(2), 2011.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix must be a 2-D tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
    _check_rank(rank, "rank")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be a non-negative int, got {power_iters!r}")
    rows, cols = matrix.shape
    r = min(rank, rows, cols)
    width = min(r + (max(10, r // 4) if oversample is None else oversample), rows, cols)
    tall = rows >= cols
    a = (matrix if tall else matrix.T).to(dtype)  # tall: the basis lives in the longer side
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(a.shape[1], width, generator=gen, dtype=torch.float64).to(device=a.device, dtype=dtype)
    basis = _orthonormal(a @ omega)
    del omega
    for _ in range(power_iters):
        basis = _orthonormal(a @ _orthonormal(a.T @ basis))
    basis = torch.linalg.qr(basis).Q  # Householder once: orthonormal to working precision
    small = (basis.T @ a).to(torch.float64)  # (width, cols)
    # SVD of the short matrix from its width x width Gram (only the leading triplets are kept,
    # so squaring the singular values loses nothing that is returned)
    with at_most_threads(1):  # LAPACK's eigensolvers collapse on busy cores (calibration._linalg)
        evals, vecs = torch.linalg.eigh(small @ small.T)
    evals, vecs = evals.flip(0)[:r].clamp_min(0), vecs.flip(1)[:, :r]
    s = evals.sqrt()
    keep = s > s[:1].clamp_min(torch.finfo(torch.float64).tiny) * 1e-12
    vh = torch.where(keep[:, None], (vecs.T @ small) / torch.where(keep, s, 1.0)[:, None], 0.0)
    u = basis.to(torch.float64) @ vecs
    return (u, s, vh) if tall else (vh.T, s, u.T)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``y``'s columns by Cholesky QR (two GEMMs and a triangular solve,
    several times cheaper than Householder QR for a tall ``y``), with Householder QR where the
    small Gram is not numerically positive definite."""
    chol, info = torch.linalg.cholesky_ex(y.T @ y)
    if int(info) != 0:
        return torch.linalg.qr(y).Q
    return torch.linalg.solve_triangular(chol, y.T, upper=False).T
