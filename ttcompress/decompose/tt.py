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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
        merged = result.reshape(-1, rank) @ core.reshape(rank, -1)  # (1*M*N, m*n*r')
        result = (merged.reshape(r_left, big_m, big_n, m, n, r_right)
                  .permute(0, 1, 3, 2, 4, 5)
                  .reshape(r_left, big_m * m, big_n * n, r_right))
    return result[0, :, :, 0]


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
    in_modes_t, out_modes_t, caps = resolve_modes(
        weight.shape[1], weight.shape[0], ranks=ranks, in_modes=in_modes, out_modes=out_modes, d=d
    )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf values")

    out_features, in_features = weight.shape
    d_ = len(in_modes_t)
    big_m, big_n = math.prod(out_modes_t), math.prod(in_modes_t)
    a = weight.detach().to(torch.float64)
    if (big_m, big_n) != (out_features, in_features):
        a = torch.nn.functional.pad(a, (0, big_n - in_features, 0, big_m - out_features))
    norm = float(torch.linalg.matrix_norm(a))
    delta = 0.0 if eps is None else float(eps) * norm / math.sqrt(max(d_ - 1, 1))

    # (m_1..m_d, n_1..n_d) -> (m_1, n_1, ..., m_d, n_d)
    perm = [p for k in range(d_) for p in (k, d_ + k)]
    a = a.reshape(*out_modes_t, *in_modes_t).permute(perm).contiguous()
    sizes = [m * n for m, n in zip(out_modes_t, in_modes_t)]

    cores: list[torch.Tensor] = []
    ranks_out = [1]
    err2 = 0.0
    c = a.reshape(-1)
    for k in range(d_ - 1):
        c = c.reshape(ranks_out[-1] * sizes[k], -1)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = min(caps[k + 1], s.numel())
        if eps is not None:
            # tail[i] = sqrt(sum_{j >= i} s_j^2); keep the smallest r >= 1 with tail[r] <= delta.
            tail = torch.cat([s.flip(0).square().cumsum(0).flip(0), s.new_zeros(1)]).sqrt()
            r_eps = int(torch.nonzero(tail <= delta)[0, 0].item()) if s.numel() else 0
            r = min(r, max(r_eps, 1))
        err2 += float(s[r:].square().sum())
        cores.append(u[:, :r].reshape(ranks_out[-1], out_modes_t[k], in_modes_t[k], r))
        c = s[:r, None] * vh[:r]
        ranks_out.append(r)
    cores.append(c.reshape(ranks_out[-1], out_modes_t[-1], in_modes_t[-1], 1))
    ranks_out.append(1)

    if norm == 0.0:
        rel_error = 0.0
    elif (big_m, big_n) == (out_features, in_features):
        # Exact: the step errors are orthogonal (Oseledets 2011, proof of Theorem 2.2).
        rel_error = math.sqrt(max(err2, 0.0)) / norm
    else:
        # The padded part of W_hat is cropped away, so measure the error that remains.
        w_hat = tt_to_matrix(cores)[:out_features, :in_features]
        w = weight.detach().to(torch.float64)
        rel_error = float(torch.linalg.matrix_norm(w - w_hat)) / norm
    return TTMatrix(
        cores=tuple(core.to(weight.dtype) for core in cores),
        ranks=tuple(ranks_out),
        in_modes=in_modes_t,
        out_modes=out_modes_t,
        shape=(out_features, in_features),
        rel_error=rel_error,
    )


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
