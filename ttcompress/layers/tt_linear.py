"""``TTLinear``: a fully-connected layer whose weight is a TT-matrix (Novikov et al., 2015).

References
----------
.. [1] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
.. [2] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ttcompress.decompose.modes import _capped_ranks, _rank_caps
from ttcompress.decompose.tt import resolve_modes, tt_svd, tt_to_matrix
from ttcompress.layers._autograd import plain_ops_only
from ttcompress.layers._export import keeping_factors
from ttcompress.layers._tt_chain import _chain_forward, tt_chain
from ttcompress.layers._weight import DenseWeightAttribute

__all__ = ["ContractionPlan", "TTLinear", "contraction_plan"]

# On CPU the batch is processed in chunks so that the largest intermediate of one chunk stays
# around this many elements (cache-resident, and below glibc's 32 MiB mmap threshold, whose page
# faults otherwise dominate the time of the memory-bound small-K matmuls).
_CPU_CHUNK_ELEMENTS = 1 << 19
#: Rows a compiled (or exported) forward plans for when the batch size is symbolic.
_NOMINAL_ROWS = 64
# Cost model of a plan: FLOPs + this weight * tensor elements read and written. Matmuls with a small
# inner dimension are memory-bound, so FLOPs alone prefer too many small steps.
_TRAFFIC_WEIGHT = 16


@dataclass(frozen=True)
class ContractionPlan:
    """How :class:`TTLinear` evaluates ``x @ W.T`` for a given number of input rows.

    Attributes
    ----------
    groups : tuple of (int, int)
        Consecutive core ranges ``[start, stop)``; each range is merged into one "super-core" and
        the input is contracted with the super-cores from the last to the first, by one reshape and
        one matmul each. ``((0, 1), (1, 2), ...)`` is the plain core-by-core contraction.
    dense : bool
        True when the cheapest plan is to build ``W`` and do one dense matmul.
    flops : int
        Forward multiply-add FLOPs (2 per MAC) of the plan, merging of cores included.
    dense_flops : int
        FLOPs of the dense path (building ``W`` + one matmul), for comparison.
    chunk_rows : int
        Rows processed at a time (CPU only; equals the number of rows when not chunked).
    """

    groups: tuple[tuple[int, int], ...]
    dense: bool
    flops: int
    dense_flops: int
    chunk_rows: int


def _merge_flops(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int],
                 start: int, stop: int) -> int:
    flops, big = 0, out_modes[start] * in_modes[start]
    for k in range(start + 1, stop):
        flops += 2 * ranks[start] * big * ranks[k] * out_modes[k] * in_modes[k] * ranks[k + 1]
        big *= out_modes[k] * in_modes[k]
    return flops


def _compositions(d: int) -> list[tuple[tuple[int, int], ...]]:
    result = []
    for mask in range(2 ** (d - 1)):
        cuts = [0] + [k + 1 for k in range(d - 1) if mask >> k & 1] + [d]
        result.append(tuple(itertools.pairwise(cuts)))
    return result


def contraction_plan(
    rows: int,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    *,
    chunked: bool = False,
) -> ContractionPlan:
    """Cheapest way to multiply ``rows`` input rows by a TT-matrix.

    Every split of the cores into consecutive groups is scored: merging the cores of each group
    (independent of ``rows``) plus contracting the input with the groups from right to left, where
    group ``[a, b)`` is one matmul of ``rows * N_{<a} * M_{>=b}`` rows, inner size ``N_g r_b`` and
    ``r_a M_g`` columns (``M_g, N_g``: products of the group's output and input modes), costing
    ``2 * rows * N_{<a} * M_{>=b} * (N_g r_b) * (r_a M_g)`` FLOPs. The score is FLOPs plus
    ``_TRAFFIC_WEIGHT`` times the elements read and written (small-inner-size matmuls are
    memory-bound). The single group is the dense path: build ``W`` and do one matmul; it is taken
    when it scores best, and always when every TT plan needs at least as many FLOPs.

    Parameters
    ----------
    rows : int
        Number of input rows (the product of the batch dimensions).
    out_modes, in_modes, ranks : tuple of int
        The TT-matrix structure.
    chunked : bool, default False
        Also choose a row chunk that keeps each chunk's largest intermediate near
        ``_CPU_CHUNK_ELEMENTS`` elements (used on CPU).
    """
    d = len(out_modes)
    big_m, big_n = math.prod(out_modes), math.prod(in_modes)
    scored = []
    for groups in _compositions(d):
        flops = traffic = 0
        for a, b in groups:
            m_g, n_g = math.prod(out_modes[a:b]), math.prod(in_modes[a:b])
            p_rows = rows * math.prod(in_modes[:a]) * math.prod(out_modes[b:])
            k_in, q_out = n_g * ranks[b], ranks[a] * m_g
            flops += _merge_flops(out_modes, in_modes, ranks, a, b) + 2 * p_rows * k_in * q_out
            # each matmul reads its operands and writes its result; in a multi-group plan the result
            # counts 3x: the batched matmuls with small matrices (see _tt_chain) run well below the
            # rate of one large matmul (measured: 4 groups of rank 4 are 2x slower than 2 groups).
            traffic += p_rows * k_in + k_in * q_out + p_rows * q_out * (3 if len(groups) > 1 else 1)
        scored.append((flops + _TRAFFIC_WEIGHT * traffic, -len(groups), flops, groups))
    dense_entry = next(e for e in scored if len(e[3]) == 1)
    tt_entries = [e for e in scored if len(e[3]) > 1]
    best = min(scored, key=lambda e: e[:2])
    if tt_entries and min(e[2] for e in tt_entries) >= dense_entry[2]:
        best = dense_entry  # the TT contraction costs more FLOPs than the dense path
    _, _, flops, groups = best
    dense_flops = _merge_flops(out_modes, in_modes, ranks, 0, d) + 2 * rows * big_m * big_n
    chunk = max(rows, 1)
    if chunked and len(groups) > 1:
        # Largest per-row intermediate: the state between groups, N_{<a} * r_a * M_{>=a}.
        per_row = max(math.prod(in_modes[:a]) * ranks[a] * math.prod(out_modes[a:]) for a, _ in groups)
        chunk = max(1, min(chunk, _CPU_CHUNK_ELEMENTS // per_row))
    return ContractionPlan(groups=groups, dense=len(groups) == 1, flops=flops,
                           dense_flops=dense_flops, chunk_rows=chunk)


_contraction_plan = contraction_plan
contraction_plan = functools.lru_cache(maxsize=512)(_contraction_plan)


def _merge_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge consecutive cores into one of shape ``(r_a, M_g, N_g, r_b)``."""
    result = cores[0]
    for core in cores[1:]:
        r_left, big_m, big_n, rank = result.shape
        _, m, n, r_right = core.shape
        merged = result.reshape(-1, rank) @ core.reshape(rank, -1)
        result = (merged.reshape(r_left, big_m, big_n, m, n, r_right)
                  .permute(0, 1, 3, 2, 4, 5)
                  .reshape(r_left, big_m * m, big_n * n, r_right))
    return result


class TTLinear(DenseWeightAttribute, nn.Module):
    """Fully-connected layer with a TT-matrix weight: ``y = x W^T + b``.

    The weight ``W`` (``out_features x in_features``) is stored as cores ``G_k`` of shape
    ``(r_{k-1}, m_k, n_k, r_k)`` with ``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d,
    j_d, :]`` (row-major multi-indices, as :func:`torch.reshape`) [1]_. Sizes whose modes multiply
    to more than the size are zero-padded inside the layer (exactly: inputs are padded with zeros,
    outputs cropped).

    The forward never builds ``W`` unless that is cheaper: for each number of rows it picks, by
    FLOP count, the cheapest split of the cores into consecutive groups (see
    :func:`contraction_plan`), merges each group, and contracts the input group by group with
    (batched) matmuls over the axes in the order the data lie, so no intermediate is permuted
    (:func:`ttcompress.layers._tt_chain.tt_chain`, a custom autograd function that saves only the
    group inputs its backward needs); the single-group plan is the dense path (build ``W``, one
    matmul).

    Parameters
    ----------
    in_features, out_features : int
        Sizes, as for :class:`torch.nn.Linear`.
    ranks : int or sequence of int
        TT-rank cap: an int for all internal ranks or a full tuple ``(1, r_1, ..., r_{d-1}, 1)``;
        capped at each unfolding's maximum (so a huge value means full rank).
    in_modes, out_modes : sequence of int, optional
        Explicit modes (default: balanced modes from
        :func:`ttcompress.decompose.modes.choose_modes`). Their product must equal the size or a
        zero-padded size at most 25 % larger.
    d : int, optional
        Number of cores when modes are chosen automatically (default 2-4 by size).
    bias : bool, default True
        Learn an additive bias.
    device, dtype : optional
        Factory arguments for the parameters.

    Attributes
    ----------
    cores : torch.nn.ParameterList
        Core ``k`` of shape ``(ranks[k], out_modes[k], in_modes[k], ranks[k + 1])``.
    ranks : tuple of int
        ``(1, r_1, ..., r_{d-1}, 1)`` after capping.
    rel_error : float or None
        Relative Frobenius error of the TT-SVD when built by :meth:`from_linear`, else None.

    References
    ----------
    .. [1] A. Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        ranks: int | Sequence[int],
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        d: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
        if ranks is None:
            raise ValueError("ranks must be given: a positive int or a tuple (1, r_1, ..., r_{d-1}, 1)")
        ins, outs, caps = resolve_modes(in_features, out_features, ranks=ranks,
                                        in_modes=in_modes, out_modes=out_modes, d=d)
        if len(ins) != len(outs):
            raise ValueError(f"in_modes and out_modes must have the same length, got {ins!r} and {outs!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.in_modes: tuple[int, ...] = ins
        self.out_modes: tuple[int, ...] = outs
        self.ranks: tuple[int, ...] = _capped_ranks(outs, ins, _rank_caps(caps, len(ins)))
        self.rel_error: float | None = None
        factory = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], outs[k], ins[k], self.ranks[k + 1], **factory))
            for k in range(len(ins))
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Random cores whose implied ``W`` has ``nn.Linear``'s default variance ``1 / (3 in)``.

        With i.i.d. zero-mean core entries of variance ``s_k^2``, ``Var W_ij = prod_k s_k^2 *
        prod_k r_k`` (one term per path through the ranks), so each core gets
        ``s^2 = (1 / (3 in_features) / prod_k r_k) ** (1 / d)``. The bias is drawn as in
        ``nn.Linear``: ``U(-1/sqrt(in), 1/sqrt(in))``.
        """
        target = 1.0 / (3.0 * self.in_features)
        std = math.sqrt((target / math.prod(self.ranks)) ** (1.0 / len(self.cores)))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        ranks: int | Sequence[int] | None = None,
        eps: float | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        d: int | None = None,
    ) -> TTLinear:
        """Build a TTLinear from a (trained) ``nn.Linear`` by TT-SVD of its weight.

        Parameters
        ----------
        linear : torch.nn.Linear
            The layer to compress; its device and dtype are kept.
        ranks : int or sequence of int, optional
            Rank cap (int or full tuple); a huge value means full rank.
        eps : float, optional
            Relative Frobenius accuracy in ``(0, 1)``: ``||W - W_hat||_F <= eps ||W||_F``.
            At least one of ``ranks`` / ``eps`` is required; with both, both apply.
        in_modes, out_modes, d : optional
            As in the constructor.

        Returns
        -------
        TTLinear
            With ``rel_error`` set to the achieved relative error.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        result = tt_svd(weight, ranks=ranks, eps=eps, in_modes=in_modes, out_modes=out_modes, d=d)
        layer = cls(linear.in_features, linear.out_features, ranks=result.ranks,
                    in_modes=result.in_modes, out_modes=result.out_modes,
                    bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for param, core in zip(layer.cores, result.cores):
                param.copy_(core)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.rel_error = result.rel_error
        return layer

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (same device and dtype)."""
        first = self.cores[0]
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=first.device, dtype=first.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def dense_weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, built from the cores (differentiable)."""
        return tt_to_matrix(list(self.cores))[: self.out_features, : self.in_features]

    def tt_matrix_cores(self) -> tuple[nn.ParameterList, tuple[int, ...], tuple[int, ...]]:
        """``(cores, in_modes, out_modes)``: the weight is ``tt_to_matrix(cores)`` (cropped to the layer's
        size); core ``k`` has shape ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``. What a data-aware
        fit (:func:`ttcompress.calibration.fit.refine_tt_cores`) refines, in place."""
        return self.cores, tuple(self.in_modes), tuple(self.out_modes)

    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor kwargs: ``TTLinear(**layer.config())`` has the same structure."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "ranks": list(self.ranks),
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "bias": self.bias is not None,
        }

    # ------------------------------------------------------------------ sizes
    @property
    def dense_params(self) -> int:
        """Parameters of the equivalent ``nn.Linear`` (weight + bias)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def compression_ratio(self) -> float:
        """``dense_params / own parameter count`` (bias included on both sides)."""
        return self.dense_params / sum(p.numel() for p in self.parameters())

    def forward_plan(self, rows: int) -> ContractionPlan:
        """The :class:`ContractionPlan` the forward uses for ``rows`` input rows on this device."""
        chunked = self.cores[0].device.type == "cpu"
        return contraction_plan(int(rows), self.out_modes, self.in_modes, self.ranks, chunked=chunked)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        rows = math.prod(lead)
        compiling = plain_ops_only()  # tracing, compiling, or torch.func transforms
        if compiling:
            # Traced once per shape; dynamo does not use lru_cache, so call the plain function. No
            # chunking: the compiler fuses and schedules the whole graph itself. A symbolic batch
            # (torch.export / ONNX with a dynamic batch dimension) must stay symbolic: plan for a
            # nominal row count instead of specializing it (every plan is exact, only speed differs).
            nominal = rows if isinstance(rows, int) else _NOMINAL_ROWS
            plan = _contraction_plan(nominal, self.out_modes, self.in_modes, self.ranks, chunked=False)
        else:
            plan = contraction_plan(int(rows), self.out_modes, self.in_modes, self.ranks,
                                    chunked=x.device.type == "cpu")
        if keeping_factors():  # exported: one contraction per core, so the graph holds the cores themselves
            plan = dataclasses.replace(plan, groups=tuple((k, k + 1) for k in range(len(self.cores))), dense=False)
        elif plan.dense or (isinstance(rows, int) and rows == 0):
            return F.linear(x, self.dense_weight(), self.bias)

        x2 = x.reshape(rows, self.in_features)
        big_n = math.prod(self.in_modes)
        if big_n > self.in_features:
            x2 = F.pad(x2, (0, big_n - self.in_features))
        cores = list(self.cores)
        mats, dims = [], []
        for a, b in plan.groups:
            merged = _merge_cores(cores[a:b])  # (r_a, M_g, N_g, r_b)
            r_left, m_g, n_g, r_right = merged.shape
            mats.append(merged.reshape(r_left * m_g, n_g * r_right))
            dims.append((math.prod(self.in_modes[:a]), n_g, r_left, m_g, r_right,
                         math.prod(self.out_modes[b:])))
        padded = math.prod(self.out_modes) > self.out_features
        if compiling:  # plain differentiable ops: they trace with symbolic sizes
            y, _ = _chain_forward(x2, mats, dims)
        else:
            # the chain adds the bias in its last matmul unless the output is cropped afterwards
            fused = None if padded or self.bias is None else self.bias
            y = tt_chain(x2, mats, dims, chunk_rows=plan.chunk_rows, bias=fused)
        if padded:
            y = y[:, : self.out_features]
        if self.bias is not None and (compiling or padded):
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
                f"params={params}, ratio={self.compression_ratio:.1f}x, bias={self.bias is not None}")
