"""Streamed second-order statistics of a layer's inputs, for data-aware decomposition.

For a layer ``y = x W^T + b`` seen by two models at once -- the dense model (input rows ``X``) and
the model being compressed (input rows ``X~``, produced by its already-compressed earlier layers)
-- the output error of a replacement ``W^`` is a quadratic form in three Gram matrices::

    ||X W^T - X~ W^^T||_F^2 = tr(W G W^T) - 2 tr(W C W^^T) + tr(W^ G~ W^^T),
    G = X^T X,   C = X^T X~,   G~ = X~^T X~.

They are accumulated batch by batch in float64 (never keeping the activations), together with
the row means (for bias correction) and the row count. A ``Conv2d`` is a linear layer on its
input patches: ``F.unfold`` with the conv's kernel, stride, padding and dilation gives rows of
length ``C_in / groups * kh * kw`` per group, in the order of ``weight.reshape(C_out, -1)``.

References
----------
.. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training
       Quantization for Generative Pre-trained Transformers", ICLR 2023 (layer-wise Hessian
       ``2 X^T X`` accumulated over calibration batches).
.. [2] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", 2024 (whitening by ``X^T X``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ttcompress.calibration._linalg import eigh as _eigh
from ttcompress.calibration.data import calib_batches

__all__ = [
    "MAX_POSITIONS",
    "FrequentDirections",
    "InputStats",
    "LayerStats",
    "SketchAccumulator",
    "StatsAccumulator",
    "input_rows",
    "layer_stats",
]

#: Spatial positions kept per sample when a conv's output has more (seeded random subset).
MAX_POSITIONS = 64
#: Rows per product when exact Grams are accumulated (float32 rows: float32 products of this many
#: rows, summed in float64).
GRAM_BLOCK_ROWS = 2048
#: From this row length ``K`` on, float32 rows are multiplied in float32 (``K^2`` products per row,
#: the cost of exact statistics; the sums stay float64). Below, float64: cheap, and independent of
#: how the rows are batched.
GRAM_FLOAT32_FEATURES = 1024
#: Elements of one unfolded chunk of samples (bounds the memory of ``F.unfold``).
_UNFOLD_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Second-order statistics of one layer's inputs (one block per conv group), exact or sketched.

    Exact statistics hold the three float64 Gram matrices. Sketched statistics (``rows`` set, the
    Grams None) hold ``l`` paired rows ``[R | R~]`` per group whose Gram ``[R | R~]^T [R | R~]``
    approximates ``[X | X~]^T [X | X~]`` (:class:`SketchAccumulator`): ``G ~ R^T R``, ``C ~ R^T R~``,
    ``G~ ~ R~^T R~``, with memory ``O(l K)`` instead of ``O(K^2)``; the fits work on the rows
    without forming ``K x K`` matrices (:mod:`ttcompress.calibration.fit`).

    Attributes
    ----------
    gram : torch.Tensor or None
        ``(groups, K, K)``: ``X~^T X~`` of the inputs the compressed model feeds the layer.
    cross : torch.Tensor or None
        ``(groups, K, K)``: ``X^T X~`` between the dense model's inputs and those.
    dense_gram : torch.Tensor or None
        ``(groups, K, K)``: ``X^T X`` of the dense model's inputs.
    mean : torch.Tensor
        ``(groups, K)``: mean row of ``X~`` (float64, exact).
    dense_mean : torch.Tensor
        ``(groups, K)``: mean row of ``X``.
    count : int
        Number of rows (samples times sequence positions or sampled spatial positions).
    samples : int
        Number of input samples (first dimension of the batches) seen.
    rows : torch.Tensor or None
        Sketched statistics: ``(groups, l, 2K)`` rows ``[R | R~]`` (float32 or float64).
    trace : torch.Tensor or None
        Sketched statistics: ``(groups,)`` exact ``tr(X~^T X~)`` (float64), for the damping and
        the sketch's lost mass (:meth:`residual`).
    dense_trace, cross_trace : torch.Tensor or None
        Sketched statistics: ``(groups,)`` exact ``tr(X^T X)`` and ``tr(X^T X~)`` (float64), for
        :meth:`residual`; None counts as no lost mass.
    exact : bool
        False when the rows are a sketch (more rows were seen than kept).
    memory : int or None
        Bytes the fit may use for ``K x K`` work arrays (the budget the statistics were collected
        under); None: no limit.
    """

    gram: torch.Tensor | None
    cross: torch.Tensor | None
    dense_gram: torch.Tensor | None
    mean: torch.Tensor
    dense_mean: torch.Tensor
    count: int
    samples: int
    rows: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    exact: bool = True
    memory: int | None = None
    dense_trace: torch.Tensor | None = None
    cross_trace: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.gram is None):
            raise ValueError("LayerStats needs either the Gram matrices or sketch rows, not both")

    @property
    def sketched(self) -> bool:
        """True when the statistics are rows (:attr:`rows`) rather than Gram matrices."""
        return self.rows is not None

    @property
    def groups(self) -> int:
        return (self.gram if self.gram is not None else self.rows).shape[0]  # type: ignore[union-attr]

    @property
    def features(self) -> int:
        """Row length ``K`` (``in_features``, or ``C_in / groups * kh * kw``)."""
        return self.gram.shape[-1] if self.gram is not None else self.rows.shape[-1] // 2  # type: ignore[union-attr]

    def factors(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sketched statistics: ``(R, R~)`` of ``group`` in float64 on the CPU, each ``(l, K)``."""
        if self.rows is None:
            raise ValueError("factors() needs sketched statistics")
        r = self.rows[group].to(device="cpu", dtype=torch.float64)
        k = self.features
        return r[:, :k], r[:, k:]

    def residual(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rho, rho_x, rho~)`` per group (float64): the sketch's lost mass per feature.

        Frequent Directions keeps ``0 <= [X | X~]^T [X | X~] - [R | R~]^T [R | R~]``, and the traces of
        that residual's blocks are known exactly from the kept traces: ``lost~ = tr(X~^T X~) -
        ||R~||_F^2``, ``lost = tr(X^T X) - ||R||_F^2``, ``lost_x = tr(X^T X~) - <R, R~>``. Modelled as
        isotropic (``rho = lost / K``), the rows the sketch lost add ``rho ||W||^2 - 2 rho_x <W, W^>
        + rho~ ||W^||^2`` to the output error (see docs/theory.md). Zero for exact statistics and
        for a sketch that never shrank. ``lost``, ``lost~`` are clamped at 0 and ``|lost_x|`` at
        ``sqrt(lost lost~)`` (what a PSD residual allows; a row-mixed sketch is only unbiased).
        """
        zero = torch.zeros(self.groups, dtype=torch.float64)
        if (self.rows is None or self.exact or self.trace is None or self.dense_trace is None
                or self.cross_trace is None):
            return zero, zero.clone(), zero.clone()
        k = self.features
        rd, rc = self.rows[..., :k], self.rows[..., k:]  # views: no float64 copy of the rows
        lost_c = (self.trace.to(torch.float64) - _squared_norms(rc, torch.float64)).clamp_min(0)
        lost_d = (self.dense_trace.to(torch.float64) - _squared_norms(rd, torch.float64)).clamp_min(0)
        bound = (lost_c * lost_d).sqrt()
        lost_x = torch.minimum(torch.maximum(self.cross_trace.to(torch.float64) - _inner(rd, rc, torch.float64),
                                             -bound), bound)
        return lost_d / k, lost_x / k, lost_c / k

    def centered(self) -> LayerStats:
        """The statistics of the mean-centred rows (``X - 1 mu^T``, ``X~ - 1 mu~^T``).

        Fitting ``W^`` on centred statistics and then correcting the bias (see
        :func:`ttcompress.calibration.fit.corrected_bias`) minimises the output error of weight
        and bias jointly. Sketched rows ``B`` become rows whose Gram is ``B^T B - n m m^T`` (``m``
        the joint mean row; negative eigenvalues, which only a sketch can produce, are dropped).
        """
        n = float(self.count)
        mu, mu_t = self.dense_mean, self.mean
        if self.rows is not None:
            joint = torch.cat([mu, mu_t], dim=1)
            rows = torch.stack([_downdated_rows(self.rows[g], joint[g], n) for g in range(self.groups)])
            trace = (self.trace - n * (mu_t * mu_t).sum(1)).clamp_min(0)  # type: ignore[operator]
            dense_trace = (None if self.dense_trace is None
                           else (self.dense_trace - n * (mu * mu).sum(1)).clamp_min(0))
            cross_trace = None if self.cross_trace is None else self.cross_trace - n * (mu * mu_t).sum(1)
            return replace(self, rows=rows, trace=trace, dense_trace=dense_trace, cross_trace=cross_trace,
                           mean=torch.zeros_like(mu_t), dense_mean=torch.zeros_like(mu))
        outer = lambda a, b: a[:, :, None] * b[:, None, :]  # noqa: E731
        if self.gram is self.cross is self.dense_gram and torch.equal(mu, mu_t):  # one Gram stays one
            gram = self.gram - n * outer(mu_t, mu_t)  # type: ignore[operator]
            return replace(self, gram=gram, cross=gram, dense_gram=gram, mean=torch.zeros_like(mu_t),
                           dense_mean=torch.zeros_like(mu))
        return replace(self, gram=self.gram - n * outer(mu_t, mu_t),  # type: ignore[operator]
                       cross=self.cross - n * outer(mu, mu_t),  # type: ignore[operator]
                       dense_gram=self.dense_gram - n * outer(mu, mu),  # type: ignore[operator]
                       mean=torch.zeros_like(mu_t), dense_mean=torch.zeros_like(mu))


@dataclass(frozen=True, eq=False)
class InputStats:
    """Statistics of one layer's inputs in one model (for the rank allocator): the Gram ``X^T X``
    (``(groups, K, K)`` float64) or ``l`` rows ``R`` (``(groups, l, K)``) with ``R^T R ~ X^T X``.

    :meth:`whiten` gives ``W G^{1/2}`` either way.
    """

    gram: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    count: int = 0

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``W G^{1/2}`` (symmetric square root) for ``weight`` of shape ``(groups, out/groups, K)``.

        From rows: ``G^{1/2} = R^T (R R^T)^{-1/2} R``, computed without forming ``K x K``.
        """
        w = weight.to(torch.float64)
        if self.gram is not None:
            evals, q = _eigh(self.gram.to("cpu", torch.float64))
            root = (q * evals.clamp_min(0).sqrt()[:, None, :]) @ q.transpose(1, 2)
            return w @ root
        blocks = []
        for g in range(self.rows.shape[0]):  # type: ignore[union-attr]
            r = self.rows[g].to("cpu", torch.float64)  # type: ignore[index]
            evals, u = _eigh(r @ r.T)
            keep = evals > _EIG_RTOL * max(float(evals.max()), 0.0)
            inv_root = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
            blocks.append(((w[g] @ r.T) @ (u * inv_root) @ u.T) @ r)
        return torch.stack(blocks)


#: Eigenvalues of a sketch's small Gram below this fraction of the largest are treated as zero.
_EIG_RTOL = 1e-12


def _downdated_rows(rows: torch.Tensor, mean: torch.Tensor, n: float) -> torch.Tensor:
    """Rows ``F`` (at most ``l + 1``) with ``F^T F = B^T B - n m m^T`` restricted to its positive part.

    With ``A = [B; m^T]`` and ``D = diag(1, .., 1, -n)``, ``B^T B - n m m^T = A^T D A``. From the
    small Gram ``A A^T = U L U^T``, ``A = U L^{1/2} Q^T`` with orthonormal ``Q``, so ``A^T D A =
    Q M Q^T`` with ``M = L^{1/2} U^T D U L^{1/2}``; with ``M = V E V^T``, ``F = E_+^{1/2} V^T L^{-1/2}
    U^T A``. Cost ``O(l^2 K)``, memory that of ``A``.
    """
    a = torch.cat([rows.to(torch.float64), mean.to(device=rows.device, dtype=torch.float64)[None]])
    evals, u = _eigh(a @ a.T)
    keep = evals > _EIG_RTOL * max(float(evals.max()), 0.0)
    u, evals = u[:, keep], evals[keep]
    root = evals.sqrt()
    d = torch.ones(a.shape[0], dtype=torch.float64, device=a.device)
    d[-1] = -n
    m = root[:, None] * (u.T * d) @ u * root[None, :]
    e, v = _eigh((m + m.T) / 2)
    pos = e > _EIG_RTOL * max(float(e.max()), 0.0)
    t = (e[pos].sqrt()[:, None] * v[:, pos].T) @ (u / root[None, :]).T
    return (t @ a).to(rows.dtype)

def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a conv, as ``nn.Conv2d`` applies it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):  # (w, h)
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def input_rows(module: nn.Module, x: torch.Tensor, *, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The rows the layer multiplies by ``weight.reshape(out, -1)^T``, as ``(groups, rows, K)``.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The layer.
    x : torch.Tensor
        Its input: ``(..., in_features)`` for a Linear (any rank), ``(N, C, H, W)`` or
        ``(C, H, W)`` for a Conv2d.
    positions : torch.Tensor, optional
        Conv only: indices of the output positions to keep (the same for every sample).

    Raises
    ------
    TypeError
        ``module`` is neither an ``nn.Linear`` nor an ``nn.Conv2d``.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, module.in_features)
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    pad = _conv_padding(module)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    if positions is None:  # every position: gathered too (one code path; the same rows as F.unfold)
        positions = torch.arange(_padded_positions(module, x), device=x.device)
    return _patch_rows(module, x, positions)


def _padded_positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """Output positions of ``conv`` on the already padded input ``x``."""
    sizes = [(size - d * (k - 1) - 1) // s + 1
             for size, k, d, s in zip(x.shape[-2:], conv.kernel_size, conv.dilation, conv.stride)]
    return max(sizes[0], 0) * max(sizes[1], 0)


def _patch_rows(conv: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of the output positions ``positions`` (indices into the row-major ``H_out x W_out``
    grid, as ``F.unfold`` orders them) of the padded input ``x`` ``(N, C, H, W)``: ``(groups,
    N * P, K)``, one gather of exactly the elements needed."""
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    w_out = (x.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    pos = positions.to(device=x.device, dtype=torch.long)
    oh, ow = pos // w_out, pos % w_out
    hi = (oh * sh)[:, None, None] + (torch.arange(kh, device=x.device) * dh)[None, :, None]  # (P, kh, 1)
    wi = (ow * sw)[:, None, None] + (torch.arange(kw, device=x.device) * dw)[None, None, :]  # (P, 1, kw)
    patches = x[:, :, hi, wi]  # (N, C, P, kh, kw)
    n, c, p = patches.shape[:3]
    g = conv.groups
    return (patches.reshape(n, g, c // g, p, kh, kw).permute(1, 0, 3, 2, 4, 5)
            .reshape(g, n * p, c // g * kh * kw))


def _output_positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    h, w = x.shape[-2:]
    left, right, top, bottom = _conv_padding(conv)
    sizes = []
    for size, lo, hi, k, d, s in zip((h, w), (top, left), (bottom, right), conv.kernel_size,
                                      conv.dilation, conv.stride):
        sizes.append((size + lo + hi - d * (k - 1) - 1) // s + 1)
    return max(sizes[0], 0) * max(sizes[1], 0)


def _features(module: nn.Module) -> tuple[int, int]:
    """``(groups, K)`` of a Linear or Conv2d; TypeError for anything else."""
    if isinstance(module, nn.Linear):
        return 1, module.in_features
    if isinstance(module, nn.Conv2d):
        return module.groups, module.in_channels // module.groups * math.prod(module.kernel_size)
    raise TypeError(f"module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}")


class _RowsAccumulator:
    """Turns paired (dense, compressed) layer inputs into paired rows; subclasses keep statistics."""

    def __init__(self, module: nn.Module, *, max_positions: int = MAX_POSITIONS, seed: int = 0) -> None:
        self.groups, self.k = _features(module)
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
            raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
        self.module = module
        self.max_positions = max_positions
        self._gen = torch.Generator().manual_seed(seed)
        self.count = 0
        self.samples = 0

    def _positions(self, x: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(self.module, nn.Conv2d):
            return None
        total = _output_positions(self.module, x)
        if total <= self.max_positions:
            return None
        return torch.randperm(total, generator=self._gen)[: self.max_positions].sort().values

    def update(self, dense_input: torch.Tensor, input: torch.Tensor, *,  # noqa: A002
               mask: torch.Tensor | None = None) -> None:
        """Add one batch: the layer's input in the dense model and in the compressed model.

        ``mask`` (a batch's ``attention_mask``, 0 at padding): a Linear layer's rows at the
        positions where it is 0 are left out, when the input is ``(*mask.shape, in_features)``
        (a per-token input); any other input is taken whole.
        """
        if dense_input.shape != input.shape:
            raise ValueError(f"dense_input and input must have the same shape, got "
                             f"{tuple(dense_input.shape)} and {tuple(input.shape)}")
        if mask is not None and isinstance(self.module, nn.Linear) and input.shape[:-1] == mask.shape:
            keep = mask.to(device=input.device) != 0
            self.samples += input.shape[0]
            self._plan(input, None)  # sized by the whole batch's shape (samples x tokens)
            if not bool(keep.all()):
                same = dense_input is input
                input = input[keep]  # noqa: A001 - (rows, in_features): one row per real token
                dense_input = input if same else dense_input[keep]
            self._update_rows(dense_input, input, samples=0)
            return
        self._update_rows(dense_input, input, samples=input.shape[0] if input.dim() > 1 else 1)

    def _update_rows(self, dense_input: torch.Tensor, input: torch.Tensor, *, samples: int) -> None:  # noqa: A002
        positions = self._positions(input)
        if positions is not None:
            positions = positions.to(input.device)
        per_sample = max(1, input[0].numel() if input.dim() > 1 else 1)
        if isinstance(self.module, nn.Conv2d):
            chunk = max(1, _UNFOLD_CHUNK_ELEMENTS // (per_sample * math.prod(self.module.kernel_size)))
        else:
            chunk = max(1, input.shape[0])
        if isinstance(self.module, nn.Conv2d) and input.dim() == 3:
            dense_input, input = dense_input.unsqueeze(0), input.unsqueeze(0)
        # identical inputs (the layers before are still dense): one set of rows serves both models
        same = dense_input is input or torch.equal(dense_input, input)
        self._plan(input, positions)
        for xd, xc in zip(dense_input.split(chunk), input.split(chunk)):
            rows_c = input_rows(self.module, xc.detach(), positions=positions)
            rows_d = rows_c if same else input_rows(self.module, xd.detach(), positions=positions)
            self._add(rows_d, rows_c)
            self.count += rows_c.shape[1]
        self.samples += samples

    def _rows_per_sample(self, input: torch.Tensor, positions: torch.Tensor | None) -> tuple[int, int]:  # noqa: A002
        """``(samples, rows per sample)`` of one batch."""
        if isinstance(self.module, nn.Conv2d):
            samples = 1 if input.dim() == 3 else input.shape[0]
            per = positions.numel() if positions is not None else _output_positions(self.module, input)
            return samples, per
        if input.dim() < 2:
            return 1, 1
        return input.shape[0], input[0].numel() // max(1, self.k * self.groups)

    def _plan(self, input: torch.Tensor, positions: torch.Tensor | None) -> None:  # noqa: A002
        """Called with each batch before its rows are added (subclasses may size themselves)."""

    def _add(self, rows_dense: torch.Tensor, rows: torch.Tensor) -> None:
        raise NotImplementedError


class StatsAccumulator(_RowsAccumulator):
    """Accumulates exact :class:`LayerStats` for one layer from paired (dense, compressed) inputs.

    Memory: three float64 ``K x K`` matrices per group (see
    :func:`ttcompress.calibration.budget.exact_bytes`); :class:`SketchAccumulator` keeps
    ``O(l K)`` instead.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The dense layer (its type and conv attributes decide how inputs become rows).
    max_positions : int, default MAX_POSITIONS
        Conv only: at most this many output positions per sample, a seeded random subset drawn
        afresh for every batch (deterministic for a given sequence of batches).
    seed : int, default 0
        Seed of the position subsets.
    memory : int, optional
        Recorded in the statistics (:attr:`LayerStats.memory`).
    """

    def __init__(self, module: nn.Module, *, max_positions: int = MAX_POSITIONS, seed: int = 0,
                 paired: bool = True, memory: int | None = None) -> None:
        super().__init__(module, max_positions=max_positions, seed=seed)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        g, k = self.groups, self.k
        self.paired = paired
        # paired: one Gram while every row pair was identical (_shared), then three
        self._shared = paired
        self._gram = zeros(g, k, k) if paired else None
        self._dense_gram = self._gram if paired else zeros(g, k, k)
        self._cross = self._gram
        self._sum, self._dense_sum = zeros(g, k), zeros(g, k)
        self.memory = memory

    def _add(self, rows_dense: torch.Tensor, rows: torch.Tensor) -> None:
        # Products by blocks of GRAM_BLOCK_ROWS rows (no float64 copy of all rows), on the rows'
        # device; rows of GRAM_FLOAT32_FEATURES features or more that are not float64 multiply in
        # float32 (then added to the float64 sums), smaller layers in float64.
        same = rows is rows_dense
        dtype = torch.float32 if self.k >= GRAM_FLOAT32_FEATURES and rows.dtype != torch.float64 else torch.float64
        for start in range(0, rows.shape[1], GRAM_BLOCK_ROWS):
            xd = rows_dense[:, start:start + GRAM_BLOCK_ROWS].to(dtype)
            xc = xd if same else rows[:, start:start + GRAM_BLOCK_ROWS].to(dtype)
            self._add_block(xd, xc, same)

    def _add_block(self, xd: torch.Tensor, xc: torch.Tensor, same: bool) -> None:
        prod = lambda a, b: (a.transpose(1, 2) @ b).to(device="cpu", dtype=torch.float64)  # noqa: E731
        total = lambda a: a.sum(dim=1, dtype=torch.float64).to("cpu")  # noqa: E731
        if not self.paired:
            self._dense_gram += prod(xd, xd)
            self._dense_sum += total(xd)
            return
        if same and self._shared:  # the layers before are still dense: X~ = X, one Gram for all three
            self._gram += prod(xd, xd)
            sums = total(xd)
            self._sum += sums
            self._dense_sum += sums
            return
        if self._shared:  # the first rows that differ: the three Grams part
            self._shared = False
            self._cross, self._dense_gram = self._gram.clone(), self._gram.clone()
        self._gram += prod(xc, xc)
        self._cross += prod(xd, xc)
        self._dense_gram += prod(xd, xd)
        self._sum += total(xc)
        self._dense_sum += total(xd)

    def finalize(self) -> LayerStats:
        """The statistics so far. ``ValueError`` when nothing was added."""
        if self.count == 0:
            raise ValueError("no calibration rows were added for this layer")
        if not self.paired:
            raise ValueError("finalize() needs paired statistics; use finalize_inputs()")
        if self._shared:  # one matrix for all three (the fits recognise G = C = G~ by identity)
            gram = self._gram.clone()  # type: ignore[union-attr]
            grams = (gram, gram, gram)
        else:
            grams = (self._gram.clone(), self._cross.clone(), self._dense_gram.clone())  # type: ignore[union-attr]
        return LayerStats(gram=grams[0], cross=grams[1], dense_gram=grams[2], mean=self._sum / self.count,
                          dense_mean=self._dense_sum / self.count, count=self.count,
                          samples=self.samples, memory=self.memory)

    def finalize_inputs(self) -> InputStats:
        """The dense inputs' Gram (:class:`InputStats`). ``ValueError`` when nothing was added."""
        if self.count == 0:
            raise ValueError("no calibration rows were added for this layer")
        return InputStats(gram=self._dense_gram.clone(), count=self.count)


class FrequentDirections:
    """A streaming Frequent Directions sketch of a tall matrix's rows (one block per group).

    Keeps a buffer of ``2 l`` rows; when it is full, its SVD ``U S V^T`` is shrunk to the ``l``
    rows ``sqrt(s_i^2 - s_{l+1}^2) v_i^T`` (Liberty 2013; Ghashami, Liberty, Phillips, Woodruff
    2016). For rows ``A`` seen so far and sketch ``B``, ``0 <= A^T A - B^T B`` and
    ``||A^T A - B^T B||_2 <= ||A - A_r||_F^2 / (l - r)`` for every ``r < l``; while no more than
    ``2 l`` rows were seen, ``B = A`` exactly. The SVD comes from the buffer's small ``2l x 2l``
    Gram (eigendecomposed in the buffer's precision), so one shrink costs ``O(l^2 width)``: ``O(l
    width)`` per row. The rows a shrink leaves are orthogonal, so the next shrink computes only the
    new rows' products with the buffer (half the small Gram's cost).

    Parameters
    ----------
    groups, width, rows : int
        Blocks, row length and sketch rows ``l``.
    device : torch.device, optional
        Where the buffer lives.
    dtype : torch.dtype, default torch.float32
        Storage of the buffer.
    """

    def __init__(self, groups: int, width: int, rows: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        self.rows = rows
        self.buffer = torch.zeros(groups, 2 * rows, width, dtype=dtype, device=device)
        self.fill = 0
        self.shrinks = 0
        self._orth = 0  # leading buffer rows that are mutually orthogonal (a shrink's output)
        self._norms = torch.zeros(groups, 0, dtype=torch.float64, device=device)

    def add(self, *parts: torch.Tensor) -> None:
        """Append rows of shape ``(groups, n, width)``, or rows given as column blocks ``(groups,
        n, w_i)`` side by side (``sum w_i = width``; no concatenated copy is made)."""
        if sum(x.shape[2] for x in parts) != self.buffer.shape[2]:
            raise ValueError(f"rows of width {sum(x.shape[2] for x in parts)} do not fit a sketch of width "
                             f"{self.buffer.shape[2]}")
        pos, n, cap = 0, parts[0].shape[1], self.buffer.shape[1]
        while pos < n:
            take = min(n - pos, cap - self.fill)
            col = 0
            for x in parts:
                self.buffer[:, self.fill:self.fill + take, col:col + x.shape[2]] = x[:, pos:pos + take]
                col += x.shape[2]
            self.fill += take
            pos += take
            if self.fill == cap:
                self._shrink()

    def _shrink(self) -> None:
        b = self.buffer[:, : self.fill]
        small = self._small_gram(b)
        evals, u = _eigh(small)
        evals, u = evals.flip(-1).clamp_min(0), u.flip(-1)
        ell = self.rows
        delta = evals[:, ell:ell + 1] if evals.shape[1] > ell else torch.zeros_like(evals[:, :1])
        top = evals[:, :ell]
        least = torch.finfo(top.dtype).tiny
        tiny = _EIG_RTOL * top[:, :1].clamp_min(least)
        scale = torch.where(top > tiny, ((top - delta).clamp_min(0) / top.clamp_min(least)).sqrt(),
                            torch.zeros_like(top))
        t = (u[:, :, :ell] * scale[:, None, :]).transpose(1, 2).to(b.dtype)
        new = t @ b
        self.buffer[:, : new.shape[1]] = new
        self.buffer[:, new.shape[1]:] = 0
        self.fill = new.shape[1]
        self._orth = new.shape[1]
        self._norms = (new * new).sum(dim=2, dtype=torch.float64)
        self.shrinks += 1

    def _small_gram(self, b: torch.Tensor) -> torch.Tensor:
        """``B B^T`` of the buffer (symmetric, in the buffer's precision: its entries carry that
        precision's rounding anyway, and the eigendecomposition is the shrink's fixed cost). The first ``_orth`` rows are the previous
        shrink's output, orthogonal by construction: their block is the diagonal of their squared
        norms, so only the new rows' products with all rows are computed (half the GEMM)."""
        o = self._orth
        if o == 0:
            small = b @ b.transpose(1, 2)
            return (small + small.transpose(1, 2)) / 2
        cross = b[:, o:] @ b.transpose(1, 2)  # (groups, fill - o, fill)
        small = torch.zeros(b.shape[0], b.shape[1], b.shape[1], dtype=b.dtype, device=b.device)
        small[:, o:, :] = cross
        small[:, :o, o:] = cross[:, :, :o].transpose(1, 2)
        small[:, o:, o:] = (cross[:, :, o:] + cross[:, :, o:].transpose(1, 2)) / 2
        small[:, :o, :o] = torch.diag_embed(self._norms.to(b.dtype))
        return small

    def widen(self) -> None:
        """Repeat every row side by side (width doubles): the sketch of ``[A | A]`` from that of ``A``."""
        self.buffer = self.buffer.repeat(1, 1, 2)

    def result(self) -> torch.Tensor:
        """The sketch: ``(groups, m, width)``, ``m <= 2 l`` rows (all rows seen when ``m <= 2 l``
        rows were added and never shrunk; else ``l``)."""
        if self.shrinks and self.fill > self.rows:
            self._shrink()
        return self.buffer[:, : self.fill].clone()

    @property
    def exact(self) -> bool:
        """True while the sketch is the rows themselves (no shrink happened)."""
        return self.shrinks == 0


class SketchAccumulator(_RowsAccumulator):
    """Accumulates sketched :class:`LayerStats`: ``l`` paired rows instead of three ``K x K`` Grams.

    The paired rows ``[X | X~]`` (length ``2K``) stream into a :class:`FrequentDirections` sketch
    with ``l = rows`` rows, so that ``[R | R~]^T [R | R~]`` approximates ``[X | X~]^T [X | X~]``
    (all three Grams at once), exactly while at most ``2 l`` rows were seen. Means, count and
    ``tr(X~^T X~)`` are exact. Memory ``O(l K)`` per group
    (:func:`ttcompress.calibration.budget.sketch_bytes`); the rows stay on the device of the
    inputs (float32).

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The dense layer.
    rows : int
        Sketch rows ``l``.
    paired : bool, default True
        False: only the dense inputs are kept (:meth:`finalize_inputs` for the allocator).
    max_positions, seed : as in :class:`StatsAccumulator`
    device : torch.device, optional
        Where the sketch lives (default: where the first inputs are).
    memory : int, optional
        Recorded in the statistics (:attr:`LayerStats.memory`).
    max_rows : int, optional
        Feed the sketch about this many rows at most: with ``samples`` (the number of samples
        that will be added) known, the first batch tells the rows per sample, and when the
        total would exceed ``max_rows``, every ``q = ceil(total / max_rows)`` rows of a chunk
        are summed with random signs into one row before they enter the sketch (a balanced
        CountSketch of the rows, [3]_). The mixed rows are still pairs ``(x, x~)`` of the same
        linear combination of inputs, and their Gram is an unbiased estimate of the rows' Gram;
        the sketch's cost, ``O(l K)`` per row it is fed, drops by ``q``. Means, count and trace
        stay exact. None: every row enters the sketch.
    samples : int, optional
        Samples that will be added (for ``max_rows``).

    References
    ----------
    .. [3] K. L. Clarkson, D. P. Woodruff, "Low Rank Approximation and Regression in Input
           Sparsity Time", STOC 2013 (CountSketch as a subspace embedding).
    """

    def __init__(self, module: nn.Module, *, rows: int, paired: bool = True, max_positions: int = MAX_POSITIONS,
                 seed: int = 0, device: torch.device | str | None = None, memory: int | None = None,
                 max_rows: int | None = None, samples: int | None = None) -> None:
        super().__init__(module, max_positions=max_positions, seed=seed)
        for label, value in (("max_rows", max_rows), ("samples", samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        self.paired = paired
        self.sketch_rows = rows
        self.device = device
        self.memory = memory
        self.max_rows = max_rows
        self.expected_samples = samples
        self.mix = 1  # rows summed into one before the sketch (decided by the first batch)
        self._planned = False
        self._half = False  # the sketch holds X only (the rows of both models were the same so far)
        self._fd: FrequentDirections | None = None
        g, k = self.groups, self.k
        self._sum = torch.zeros(g, k, dtype=torch.float64)
        self._dense_sum = torch.zeros(g, k, dtype=torch.float64)
        self._trace = torch.zeros(g, dtype=torch.float64)
        self._dense_trace = torch.zeros(g, dtype=torch.float64)
        self._cross_trace = torch.zeros(g, dtype=torch.float64)

    def _plan(self, input: torch.Tensor, positions: torch.Tensor | None) -> None:  # noqa: A002
        if self._planned:
            return
        self._planned = True
        if self.max_rows is None or self.expected_samples is None:
            return
        samples, per_sample = self._rows_per_sample(input, positions)
        total = max(samples, self.expected_samples) * per_sample
        self.mix = max(1, math.ceil(total / self.max_rows))

    def _mixed(self, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each ``(groups, n, w)`` block with every ``mix`` rows (one seeded random partition,
        the same signs for every block) summed with random signs: ``(groups, ceil(n / mix), w)``."""
        n = parts[0].shape[1]
        if self.mix <= 1 or n <= 1:
            return parts
        buckets = math.ceil(n / self.mix)
        perm = torch.randperm(n, generator=self._gen)
        signs = torch.randint(0, 2, (n,), generator=self._gen) * 2 - 1
        index = torch.empty(n, dtype=torch.long)
        index[perm] = torch.arange(n) % buckets
        out = []
        for z in parts:
            mixed = torch.zeros(z.shape[0], buckets, z.shape[2], dtype=z.dtype, device=z.device)
            out.append(mixed.index_add_(1, index.to(z.device), z * signs.to(z.device, z.dtype)[None, :, None]))
        return tuple(out)

    def _add(self, rows_dense: torch.Tensor, rows: torch.Tensor) -> None:
        # While the two models' rows are the same (the layers before are still dense), only X is
        # sketched (half the width): [B | B] is then the sketch of [X | X]. Rows that differ
        # widen the sketch to [B | B] first.
        same = rows is rows_dense or not self.paired
        if self._fd is None:
            self._half = same and self.paired
            width = self.k if same else 2 * self.k
            device = self.device if self.device is not None else rows.device
            self._fd = FrequentDirections(self.groups, width, self.sketch_rows, device=device)
        elif self._half and not same:
            self._fd.widen()
            self._half = False
        self._fd.add(*self._mixed(*((rows_dense,) if same and (self._half or not self.paired)
                                    else (rows_dense, rows))))
        # chunk sums in the rows' precision (a chunk is a few thousand rows), accumulated in float64
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        self._dense_sum += rows_dense.sum(dim=1, dtype=acc).to("cpu", torch.float64)
        if self.paired:
            self._sum += rows.sum(dim=1, dtype=acc).to("cpu", torch.float64)
            trace = _squared_norms(rows, acc)
            self._trace += trace
            self._dense_trace += trace if rows is rows_dense else _squared_norms(rows_dense, acc)
            self._cross_trace += trace if rows is rows_dense else _inner(rows_dense, rows, acc)

    def finalize(self) -> LayerStats:
        """The sketched statistics so far. ``ValueError`` when nothing was added."""
        if self.count == 0 or self._fd is None:
            raise ValueError("no calibration rows were added for this layer")
        if not self.paired:
            raise ValueError("finalize() needs paired statistics; use finalize_inputs()")
        return LayerStats(gram=None, cross=None, dense_gram=None, mean=self._sum / self.count,
                          dense_mean=self._dense_sum / self.count, count=self.count, samples=self.samples,
                          rows=self._fd.result().repeat(1, 1, 2) if self._half else self._fd.result(),
                          trace=self._trace.clone(), dense_trace=self._dense_trace.clone(),
                          cross_trace=self._cross_trace.clone(),
                          exact=self._fd.exact and self.mix == 1,
                          memory=self.memory)

    def finalize_inputs(self) -> InputStats:
        """The dense inputs' sketch (:class:`InputStats`). ``ValueError`` when nothing was added."""
        if self.count == 0 or self._fd is None:
            raise ValueError("no calibration rows were added for this layer")
        rows = self._fd.result()
        return InputStats(rows=rows[..., : self.k], count=self.count)


def _squared_norms(rows: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``||rows[g]||_F^2`` per group, float64 on the CPU (summed in ``acc``)."""
    return torch.linalg.vector_norm(rows, dim=(1, 2), dtype=acc).to("cpu", torch.float64) ** 2


def _inner(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``<a[g], b[g]>`` per group, float64 on the CPU, by blocks of rows (no full-size temporary)."""
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for start in range(0, a.shape[1], 512):
        block = a[:, start:start + 512] * b[:, start:start + 512]
        total += block.sum(dim=(1, 2), dtype=acc).to("cpu", torch.float64)
    return total


def layer_stats(module: nn.Module, inputs: object, *, dense_inputs: object = None,
                max_positions: int = MAX_POSITIONS, sketch_rows: int | None = None,
                max_rows: int | None = None) -> LayerStats:
    """Statistics of ``module`` for given input batches (non-sequential use, and tests).

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The dense layer.
    inputs : tensor or iterable of tensors
        The layer's inputs ``X~`` (any form :func:`ttcompress.calibration.data.calib_batches`
        accepts).
    dense_inputs : optional
        The dense model's inputs ``X``, batch for batch; default ``inputs`` (then ``cross ==
        gram == dense_gram``).
    max_positions : int, default MAX_POSITIONS
        As in :class:`StatsAccumulator`.
    sketch_rows : int, optional
        Sketch the statistics with this many rows (:class:`SketchAccumulator`) instead of
        keeping the exact Gram matrices.
    max_rows : int, optional
        With ``sketch_rows``: mix the rows down to about this many before they enter the sketch
        (see :class:`SketchAccumulator`).
    """
    batches = list(calib_batches(inputs))
    dense_batches = batches if dense_inputs is None else calib_batches(dense_inputs)
    samples = sum(x.shape[0] if x.dim() > 1 else 1 for x in batches) or None
    acc: StatsAccumulator | SketchAccumulator = (
        StatsAccumulator(module, max_positions=max_positions) if sketch_rows is None
        else SketchAccumulator(module, rows=sketch_rows, max_positions=max_positions, max_rows=max_rows,
                               samples=samples))
    if dense_inputs is None:
        for x in batches:
            acc.update(x, x)
    else:
        for xd, x in zip(dense_batches, batches, strict=True):
            acc.update(xd, x)
    return acc.finalize()
