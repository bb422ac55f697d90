"""TT-SVD for matrices: decompose a weight matrix into tensor-train (TT-matrix) cores.

Format (row-major, as :func:`torch.reshape`): with ``out_features -> (m_1, ..., m_d)`` and
``in_features -> (n_1, ..., n_d)``,

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

where core ``G_k`` has shape ``(r_{k-1}, m_k, n_k, r_k)`` and ``r_0 = r_d = 1``.

References
----------
.. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011
       (Algorithm 1, TT-SVD, and Theorem 2.2 for the error bound).
.. [2] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks", NeurIPS 2015
       (the TT-matrix format for fully-connected layers).
.. [3] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding Structure with Randomness: Probabilistic
       Algorithms for Constructing Approximate Matrix Decompositions", SIAM Review 53(2), 2011
       (randomized range finder with power iterations, Algorithms 4.4 and 5.1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ttcompress.decompose._threads import at_most_threads
from ttcompress.decompose.modes import (
    _capped_ranks,
    _rank_caps,
    choose_modes,
    validate_modes,
)

__all__ = ["TTMatrix", "tt_param_count", "tt_ranks", "tt_svd", "tt_to_matrix"]


@dataclass(frozen=True, eq=False)
class TTMatrix:
    """A matrix in TT-matrix format, as returned by :func:`tt_svd`.

    Attributes
    ----------
    cores : tuple of torch.Tensor
        Core ``k`` has shape ``(ranks[k], out_modes[k], in_modes[k], ranks[k + 1])``.
    ranks : tuple of int
        ``(1, r_1, ..., r_{d-1}, 1)``.
    in_modes, out_modes : tuple of int
        The modes; their products may exceed ``shape`` when the matrix was zero-padded.
    shape : tuple of int
        ``(out_features, in_features)`` of the original (unpadded) matrix.
    rel_error : float
        Achieved ``||W - W_hat||_F / ||W||_F`` of the cropped reconstruction, computed in float64
        before the cores are cast (0 for a zero matrix).
    """

    cores: tuple[torch.Tensor, ...]
    ranks: tuple[int, ...]
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    shape: tuple[int, int]
    rel_error: float

    @property
    def modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(in_modes, out_modes)``."""
        return self.in_modes, self.out_modes

    def to_dense(self) -> torch.Tensor:
        """The reconstructed ``(out_features, in_features)`` matrix (padding cropped)."""
        return tt_to_matrix(self.cores)[: self.shape[0], : self.shape[1]]


def tt_ranks(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int]
) -> tuple[int, ...]:
    """The ranks TT-SVD produces for a rank cap when no ``eps`` truncation happens.

    ``r_k = min(cap_k, r_{k-1} * m_k * n_k, prod_{i > k} m_i * n_i)``: the cap, limited by the
    size of the ``k``-th unfolding in the sequential algorithm.

    Parameters
    ----------
    in_modes, out_modes : sequence of int
        Modes of the same length ``d``.
    ranks : int or sequence of int
        An int cap for all internal ranks, or a full tuple ``(1, r_1, ..., r_{d-1}, 1)``.

    Returns
    -------
    tuple of int
        ``(1, r_1, ..., r_{d-1}, 1)``.
    """
    ins, outs = _check_mode_pair(in_modes, out_modes)
    return _capped_ranks(outs, ins, _rank_caps(ranks, len(ins)))


def tt_param_count(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int]
) -> int:
    """Number of TT-core parameters, ``sum_k r_{k-1} m_k n_k r_k``, without decomposing.

    Ranks are capped exactly as :func:`tt_svd` caps them (see :func:`tt_ranks`). The bias is not
    included.

    Examples
    --------
    >>> tt_param_count((8, 8, 8, 8), (8, 8, 8, 8), 8)
    9216
    """
    ins, outs = _check_mode_pair(in_modes, out_modes)
    r = tt_ranks(ins, outs, ranks)
    return sum(r[k] * outs[k] * ins[k] * r[k + 1] for k in range(len(ins)))


def _check_mode_pair(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ins = validate_modes(in_modes, math.prod(in_modes), name="in_modes") if _is_seq(in_modes) else None
    outs = validate_modes(out_modes, math.prod(out_modes), name="out_modes") if _is_seq(out_modes) else None
    if ins is None or outs is None:
        raise TypeError("in_modes and out_modes must be sequences of ints")
    if len(ins) != len(outs):
        raise ValueError(f"in_modes and out_modes must have the same length, got {ins!r} and {outs!r}")
    return ins, outs


def _is_seq(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def tt_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT-matrix cores into the full ``(prod out_modes, prod in_modes)`` matrix.

    Parameters
    ----------
    cores : sequence of torch.Tensor
        Core ``k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` with ``r_0 = r_d = 1``.
    """
    result = cores[0]  # (1, M, N, r)
    for core in cores[1:]:
        r_left, big_m, big_n, rank = result.shape
        _, m, n, r_right = core.shape
        # (r, M, N) x (m, n, r') -> (r, M, m, N, n, r'), written by blocks of M: no second full-size
        # temporary for the permutation (a 4,096 x 11,008 float64 matrix is 360 MB)
        step = max(1, _MERGE_VALUES // max(1, r_left * big_n * m * n * r_right))
        if step >= big_m or (torch.is_grad_enabled() and (result.requires_grad or core.requires_grad)):
            step = big_m  # one block (and autograd's own graph) where it is small or differentiated
        out = result.new_empty(r_left, big_m, m, big_n, n, r_right)
        for i in range(0, big_m, step):
            part = result[:, i:i + step]
            merged = part.reshape(-1, rank) @ core.reshape(rank, -1)  # (r * M_block * N, m * n * r')
            out[:, i:i + step] = merged.reshape(r_left, part.shape[1], big_n, m, n, r_right).permute(0, 1, 3, 2, 4, 5)
        result = out.reshape(r_left, big_m * m, big_n * n, r_right)
    return result[0, :, :, 0]


#: Values of one block of :func:`tt_to_matrix`'s merge (16 MB of float64).
_MERGE_VALUES = 1 << 21


def tt_svd(
    weight: torch.Tensor,
    *,
    ranks: int | Sequence[int] | None = None,
    eps: float | None = None,
    in_modes: Sequence[int] | None = None,
    out_modes: Sequence[int] | None = None,
    d: int | None = None,
) -> TTMatrix:
    """Decompose a matrix into TT-matrix cores with TT-SVD (Oseledets 2011, Algorithm 1).

    The matrix is reshaped to ``(m_1, ..., m_d, n_1, ..., n_d)``, its modes interleaved to
    ``(m_1 n_1, ..., m_d n_d)``, and the cores are obtained by sequential truncated SVDs of the
    unfoldings. Truncation at step ``k`` keeps the smallest rank whose discarded singular values have
    norm ``<= delta = eps * ||W||_F / sqrt(d - 1)`` (when ``eps`` is given), and at most the cap from
    ``ranks`` (when given); it never exceeds the rank of the unfolding. Since the step errors are
    orthogonal, ``||W - W_hat||_F^2`` is the sum of all discarded squared singular values, hence
    ``<= (d - 1) delta^2 = eps^2 ||W||_F^2``.

    Computation is in float64 on ``weight.device``; cores are returned in ``weight.dtype``.

    No full SVD of a wide unfolding is ever computed. Each step takes one of three routes:

    * rank cap only, smaller side ``>= RANDOMIZED_MIN_SIZE`` and cheaper by the flop count of
      :func:`_use_randomized`: a randomized range finder with ``OVERSAMPLE`` extra columns and
      ``POWER_ITERS`` power iterations (Halko et al. 2011 [3]_); measured error within 1.5 % of
      the exact TT-SVD on flat and decaying spectra (``tests/test_tt_decompose.py``);
    * otherwise the eigendecomposition of the Gram matrix of the smaller side (exact spectrum);
    * with an ``eps`` so small that Gram eigenvalues are not accurate enough (see
      :data:`GRAM_SAFETY`), a thin QR of the unfolding and the SVD of its square triangle.

    The randomized route is seeded: the same input gives the same cores.

    Parameters
    ----------
    weight : torch.Tensor
        2-D floating matrix of shape ``(out_features, in_features)``.
    ranks : int or sequence of int, optional
        Cap on the internal ranks: an int for all, or a full tuple ``(1, r_1, ..., r_{d-1}, 1)``.
        A cap larger than the maximum means full rank.
    eps : float, optional
        Target relative Frobenius error in ``(0, 1)``. At least one of ``ranks`` / ``eps`` is needed.
    in_modes, out_modes : sequence of int, optional
        Explicit modes (product equal to the size, or a padded size; see
        :func:`ttcompress.decompose.modes.validate_modes`). Default: :func:`choose_modes`.
    d : int, optional
        Number of cores when the modes are chosen automatically.

    Returns
    -------
    TTMatrix
        Cores, ranks, modes, original shape and the achieved relative error.

    Raises
    ------
    ValueError
        For a non-2-D or non-finite ``weight``, no truncation given, ``eps`` outside ``(0, 1)``,
        non-positive ranks, or modes that do not fit the sizes.
    """
    _check_tt_args(weight, ranks=ranks, eps=eps)
    in_modes_t, out_modes_t, caps = resolve_modes(
        weight.shape[1], weight.shape[0], ranks=ranks, in_modes=in_modes, out_modes=out_modes, d=d
    )
    a, norm = _interleaved_float64(weight, out_modes_t, in_modes_t)
    delta = None if eps is None else float(eps) * norm / math.sqrt(max(len(in_modes_t) - 1, 1))
    cores, ranks_out, err2 = _tt_sweep(a, out_modes_t, in_modes_t, caps=caps, delta=delta)
    del a  # the float64 copy of the weight: not alive while the error check rebuilds the matrix
    return TTMatrix(
        cores=tuple(core.to(weight.dtype) for core in cores),
        ranks=tuple(ranks_out),
        in_modes=in_modes_t,
        out_modes=out_modes_t,
        shape=(weight.shape[0], weight.shape[1]),
        rel_error=_tt_rel_error(weight, cores, err2=err2, norm=norm),
    )


def _check_tt_args(weight: Any, *, ranks: Any, eps: Any) -> None:
    """Type and value checks of :func:`tt_svd`'s ``weight``, ``ranks`` / ``eps`` presence and ``eps``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D matrix (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if ranks is None and eps is None:
        raise ValueError("give at least one of ranks (rank cap) or eps (relative accuracy)")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not 0.0 < float(eps) < 1.0):
        raise ValueError(f"eps must be a float in the open interval (0, 1), got {eps!r}")


def _interleaved_float64(
    weight: torch.Tensor, out_modes: tuple[int, ...], in_modes: tuple[int, ...]
) -> tuple[torch.Tensor, float]:
    """``weight`` zero-padded to the mode products, as float64 ``(m_1, n_1, ..., m_d, n_d)``, and its norm.

    Raises ValueError when ``weight`` has NaN or Inf entries.
    """
    out_features, in_features = weight.shape
    d_ = len(in_modes)
    big_m, big_n = math.prod(out_modes), math.prod(in_modes)
    w = weight.detach()
    if (big_m, big_n) != (out_features, in_features):
        w = torch.nn.functional.pad(w, (0, big_n - in_features, 0, big_m - out_features))
    # (m_1..m_d, n_1..n_d) -> (m_1, n_1, ..., m_d, n_d), cast to float64 in the same copy
    perm = [p for k in range(d_) for p in (k, d_ + k)]
    view = w.reshape(*out_modes, *in_modes).permute(perm)
    a = torch.empty(view.shape, dtype=torch.float64, device=w.device).copy_(view)
    norm = float(torch.linalg.vector_norm(a))
    # a finite norm proves finite entries; only a non-finite one needs the elementwise check
    if not math.isfinite(norm) and not bool(torch.isfinite(a).all()):
        raise ValueError("weight contains NaN or Inf values")
    return a, norm


def _tt_sweep(
    a: torch.Tensor,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    *,
    caps: tuple[int, ...],
    delta: float | None,
) -> tuple[list[torch.Tensor], list[int], float]:
    """The sequential truncated SVDs of TT-SVD: (float64 cores, ranks, sum of discarded squared values)."""
    d_ = len(in_modes)
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    cores: list[torch.Tensor] = []
    ranks_out = [1]
    err2 = 0.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    c = a.reshape(-1)
    for k in range(d_ - 1):
        c = c.reshape(ranks_out[-1] * sizes[k], -1)
        u, c, discarded = _truncate(c, cap=caps[k + 1], delta=delta, gen=gen)
        r = u.shape[1]
        err2 += discarded
        cores.append(u.reshape(ranks_out[-1], out_modes[k], in_modes[k], r))
        ranks_out.append(r)
    cores.append(c.reshape(ranks_out[-1], out_modes[-1], in_modes[-1], 1))
    ranks_out.append(1)
    return cores, ranks_out, err2


def _tt_rel_error(weight: torch.Tensor, cores: list[torch.Tensor], *, err2: float, norm: float) -> float:
    """Relative Frobenius error of the float64 ``cores`` against ``weight`` (norm ``norm``)."""
    out_features, in_features = weight.shape
    big_m = math.prod(core.shape[1] for core in cores)
    big_n = math.prod(core.shape[2] for core in cores)
    if norm == 0.0:
        return 0.0
    if (big_m, big_n) == (out_features, in_features):
        # Exact: the step errors are orthogonal (Oseledets 2011, proof of Theorem 2.2).
        return math.sqrt(max(err2, 0.0)) / norm
    # The padded part of W_hat is cropped away, so measure the error that remains.
    w_hat = tt_to_matrix(cores)[:out_features, :in_features]
    w = weight.detach()
    err2 = 0.0
    for rows in range(0, out_features, _ERROR_ROWS):  # by blocks of rows: no float64 copy of W
        block = w[rows:rows + _ERROR_ROWS].to(torch.float64) - w_hat[rows:rows + _ERROR_ROWS]
        err2 += float(block.square().sum())
    return math.sqrt(err2) / norm


#: Rows of the weight compared at a time by :func:`_tt_rel_error`.
_ERROR_ROWS = 1024


def resolve_modes(
    in_features: int,
    out_features: int,
    *,
    ranks: int | Sequence[int] | None,
    in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None,
    d: int | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validate / choose modes and rank caps for a layer of the given sizes.

    Returns ``(in_modes, out_modes, caps)`` where ``caps`` is the full tuple of rank caps (huge
    when ``ranks`` is None). Explicit modes fix ``d``; a ``d`` that disagrees is a ValueError.
    """
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise ValueError(f"d (number of cores) must be a positive integer, got {d!r}")
    given = [len(m) for m in (in_modes, out_modes) if m is not None and _is_seq(m)]
    if d is None and given:
        d = given[0]
    ins = None if in_modes is None else validate_modes(in_modes, in_features, name="in_modes", d=d)
    outs = None if out_modes is None else validate_modes(out_modes, out_features, name="out_modes", d=d)
    if ins is None or outs is None:
        cap_for_choice: int | Sequence[int] = 8 if ranks is None else ranks
        chosen_in, chosen_out = choose_modes(in_features, out_features, d=d, ranks=cap_for_choice)
        ins = chosen_in if ins is None else ins
        outs = chosen_out if outs is None else outs
    caps = _rank_caps(ranks, len(ins)) if ranks is not None else (1,) + (2**62,) * (len(ins) - 1) + (1,)
    return ins, outs, caps


# --------------------------------------------------------------------------------------------------
# One truncation step: C (p x q) ~= U @ carry with orthonormal U (p x r)
# --------------------------------------------------------------------------------------------------
#: Extra columns of the randomized range finder (Halko, Martinsson & Tropp 2011, sec. 4.2).
OVERSAMPLE = 10
#: Power iterations of the randomized range finder (Halko et al. 2011, Algorithm 4.4).
POWER_ITERS = 3
#: The randomized range finder is only used when the smaller side of the unfolding is at least
#: this large; below it the exact Gram eigendecomposition costs milliseconds.
RANDOMIZED_MIN_SIZE = 512
#: Below this fraction of ``||C||^2`` the discarded energy of a step is measured on the residual.
EXPLICIT_RESIDUAL = 1e-4
#: With ``eps``, the Gram route is used only while ``delta^2`` is at least this many times the
#: absolute accuracy ``n * 2.2e-16 * ||C||_F^2`` of the Gram eigenvalues; below that (``eps``
#: around ``1e-6`` and smaller) the thin unfolding is factored by QR and an SVD of its triangle.
GRAM_SAFETY = 1e4
_EPS64 = float(torch.finfo(torch.float64).eps)
#: Gram matrices up to this size are diagonalised on one thread (see :func:`at_most_threads`).
SMALL_EIGH = 256
#: Flops of a symmetric ``n x n`` eigendecomposition with vectors, as a multiple of ``n^3``
#: (tridiagonal reduction plus divide and conquer, measured order of magnitude on CPU).
EIGH_FLOPS_PER_N3 = 9.0


def _truncate(
    c: torch.Tensor, *, cap: int, delta: float | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncate one TT-SVD unfolding: ``C ~= U @ carry``, ``U`` with orthonormal columns.

    Returns ``(U, carry, discarded)`` with ``carry = U^T C`` and ``discarded = ||C - U carry||_F^2
    = ||C||^2 - ||carry||^2``. When that difference is below :data:`EXPLICIT_RESIDUAL` times
    ``||C||^2`` its cancellation would limit the reported error to ``~1e-8 ||C||``, so the
    residual is formed explicitly. The rank is ``min(cap, rank needed for
    delta)`` as in :func:`tt_svd`. The route is chosen by :func:`_use_randomized`.
    """
    if delta is None and _use_randomized(*c.shape, cap):
        u, carry = _randomized_truncate(c, cap=cap, gen=gen)
    elif delta is None or delta**2 >= GRAM_SAFETY * min(c.shape) * _EPS64 * float(c.square().sum()):
        u, carry = _gram_truncate(c, cap=cap, delta=delta)
    else:
        u, carry = _qr_svd_truncate(c, cap=cap, delta=delta)
    total = float(torch.linalg.vector_norm(c)) ** 2
    discarded = total - float(torch.linalg.vector_norm(carry)) ** 2
    if u.shape[1] == min(c.shape):  # square orthogonal U (wide) or U spanning all columns (tall)
        discarded = 0.0
    elif discarded < EXPLICIT_RESIDUAL * total:
        discarded = float(torch.linalg.vector_norm(torch.addmm(c, u, carry, alpha=-1.0))) ** 2
    return u, carry, discarded


def _use_randomized(p: int, q: int, cap: int) -> bool:
    """Whether the randomized range finder is cheaper than the exact Gram route for ``p x q``.

    Rule (flop counts, ``n = min(p, q)``, ``l = cap + OVERSAMPLE``): the Gram route costs
    ``2 p q n`` for ``C C^T`` (or ``C^T C``) plus ``EIGH_FLOPS_PER_N3 * n^3`` for its
    eigendecomposition; the range finder costs ``2 (2 + 2 POWER_ITERS) p q l`` for its products
    with ``C`` plus thin QRs of ``(p + q) x l`` blocks. The range finder is used only with a rank
    cap (never for ``eps``, which needs the whole spectrum), when ``l < n``, when
    ``n >= RANDOMIZED_MIN_SIZE`` and when it is cheaper.
    """
    n = min(p, q)
    width = cap + OVERSAMPLE
    if n < RANDOMIZED_MIN_SIZE or width >= n:
        return False
    gram = 2.0 * p * q * n + EIGH_FLOPS_PER_N3 * n**3
    randomized = 2.0 * (2 + 2 * POWER_ITERS) * p * q * width + 4.0 * (p + q) * width**2 * (2 + POWER_ITERS)
    return randomized < gram


def _rank_for(s2: torch.Tensor, cap: int, delta: float | None) -> int:
    """Smallest rank ``r >= 1`` whose discarded ``sum s2[r:]`` is ``<= delta^2``, capped."""
    r = min(cap, s2.numel())
    if delta is not None and s2.numel():
        # tail[i] = sqrt(sum_{j >= i} s_j^2); keep the smallest r >= 1 with tail[r] <= delta.
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)]).sqrt()
        r_eps = int(torch.nonzero(tail <= delta)[0, 0].item())
        r = min(r, max(r_eps, 1))
    return max(r, 1)


def _gram_truncate(
    c: torch.Tensor, *, cap: int, delta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact truncation from the eigendecomposition of the smaller Gram matrix (float64).

    The squared singular values are the Gram eigenvalues, exact to ``~1e-16 ||C||^2`` in
    float64, which is all the truncation rule needs. For a wide ``C`` the left vectors are the
    Gram eigenvectors and ``carry = U^T C``; for a tall ``C`` the right vectors ``V_r`` come from
    ``C^T C`` and ``C V_r = Q R`` (thin QR) gives ``U = Q``, ``carry = R V_r^T``: both are the
    orthogonal projection onto the leading singular subspace, so the step error is optimal.
    """
    p, q = c.shape
    wide = p <= q
    gram = c @ c.T if wide else c.T @ c
    with at_most_threads(1) if gram.shape[0] <= SMALL_EIGH else contextlib.nullcontext():
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    s2 = evals.flip(0).clamp_min(0.0)
    r = _rank_for(s2, cap, delta)
    vecs = evecs.flip(1)[:, :r]
    if wide:
        return vecs, vecs.T @ c
    u, upper = torch.linalg.qr(c @ vecs)
    return u, upper @ vecs.T


def _randomized_truncate(
    c: torch.Tensor, *, cap: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``cap`` truncation by a randomized range finder with power iterations.

    Halko, Martinsson & Tropp 2011 (Algorithms 4.4 and 5.1): ``Y = (C C^T)^q C Omega`` with a
    Gaussian ``Omega`` of ``cap + OVERSAMPLE`` columns, re-orthonormalised after every product.
    The power iterations only steer the subspace, so they run in float32 (half the memory
    traffic of these bandwidth-bound products); the last product ``Y = C Z`` and
    ``B = Q^T C`` are float64, so a matrix of exact rank ``<= cap + OVERSAMPLE`` is still
    recovered to float64 accuracy. Then the exact truncation of the small ``B``:
    ``U = Q U_B`` is orthonormal and ``carry = U^T C``.
    """
    width = cap + OVERSAMPLE
    sketch = c.to(torch.float32)
    omega = torch.randn(c.shape[1], width, generator=gen, dtype=torch.float32).to(c.device)
    right = omega
    for _ in range(POWER_ITERS):
        left = _orthonormal(sketch @ right)
        right = _orthonormal(sketch.T @ left)
    basis = _orthonormal(c @ right.to(torch.float64))
    small_u, carry = _gram_truncate(basis.T @ c, cap=cap, delta=None)
    return basis @ small_u, carry


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``Q`` of a thin block's columns (Householder QR, on one thread)."""
    with at_most_threads(1):
        return torch.linalg.qr(block).Q


def _qr_svd_truncate(
    c: torch.Tensor, *, cap: int, delta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact truncation from a thin QR of ``C`` (or ``C^T``) and the SVD of its ``n x n`` triangle.

    Accurate to ``~1e-16 ||C||`` in every singular value (no squaring), at a few times the cost
    of the Gram route; used for very small ``eps`` (see :data:`GRAM_SAFETY`).
    """
    p, q = c.shape
    if p <= q:
        basis, upper = torch.linalg.qr(c.T)  # C = R^T Q^T
        u, s, vh = torch.linalg.svd(upper.T)
        r = _rank_for(s.square(), cap, delta)
        return u[:, :r], s[:r, None] * (vh[:r] @ basis.T)
    basis, upper = torch.linalg.qr(c)  # C = Q R
    u, s, vh = torch.linalg.svd(upper)
    r = _rank_for(s.square(), cap, delta)
    return basis @ u[:, :r], s[:r, None] * vh[:r]
