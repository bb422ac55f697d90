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
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ttcompress.calibration.data import calib_batches

__all__ = ["MAX_POSITIONS", "LayerStats", "StatsAccumulator", "input_rows", "layer_stats"]

#: Spatial positions kept per sample when a conv's output has more (seeded random subset).
MAX_POSITIONS = 64
#: Elements of one unfolded chunk of samples (bounds the memory of ``F.unfold``).
_UNFOLD_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Second-order statistics of one layer's inputs (float64, one block per conv group).

    Attributes
    ----------
    gram : torch.Tensor
        ``(groups, K, K)``: ``X~^T X~`` of the inputs the compressed model feeds the layer.
    cross : torch.Tensor
        ``(groups, K, K)``: ``X^T X~`` between the dense model's inputs and those.
    dense_gram : torch.Tensor
        ``(groups, K, K)``: ``X^T X`` of the dense model's inputs.
    mean : torch.Tensor
        ``(groups, K)``: mean row of ``X~``.
    dense_mean : torch.Tensor
        ``(groups, K)``: mean row of ``X``.
    count : int
        Number of rows (samples times sequence positions or sampled spatial positions).
    samples : int
        Number of input samples (first dimension of the batches) seen.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    dense_gram: torch.Tensor
    mean: torch.Tensor
    dense_mean: torch.Tensor
    count: int
    samples: int

    @property
    def groups(self) -> int:
        return self.gram.shape[0]

    @property
    def features(self) -> int:
        """Row length ``K`` (``in_features``, or ``C_in / groups * kh * kw``)."""
        return self.gram.shape[-1]

    def centered(self) -> LayerStats:
        """The statistics of the mean-centred rows (``X - 1 mu^T``, ``X~ - 1 mu~^T``).

        Fitting ``W^`` on centred statistics and then correcting the bias (see
        :func:`ttcompress.calibration.fit.corrected_bias`) minimises the output error of weight
        and bias jointly.
        """
        n = float(self.count)
        mu, mu_t = self.dense_mean, self.mean
        outer = lambda a, b: a[:, :, None] * b[:, None, :]  # noqa: E731
        return LayerStats(
            gram=self.gram - n * outer(mu_t, mu_t),
            cross=self.cross - n * outer(mu, mu_t),
            dense_gram=self.dense_gram - n * outer(mu, mu),
            mean=torch.zeros_like(mu_t),
            dense_mean=torch.zeros_like(mu),
            count=self.count,
            samples=self.samples,
        )


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
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # (N, C*kh*kw, L)
    if positions is not None:
        cols = cols[:, :, positions]
    g = module.groups
    k = cols.shape[1] // g
    return cols.reshape(cols.shape[0], g, k, -1).permute(1, 0, 3, 2).reshape(g, -1, k)


def _output_positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    h, w = x.shape[-2:]
    left, right, top, bottom = _conv_padding(conv)
    sizes = []
    for size, lo, hi, k, d, s in zip((h, w), (top, left), (bottom, right), conv.kernel_size,
                                      conv.dilation, conv.stride):
        sizes.append((size + lo + hi - d * (k - 1) - 1) // s + 1)
    return max(sizes[0], 0) * max(sizes[1], 0)


class StatsAccumulator:
    """Accumulates :class:`LayerStats` for one layer from paired (dense, compressed) inputs.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The dense layer (its type and conv attributes decide how inputs become rows).
    max_positions : int, default MAX_POSITIONS
        Conv only: at most this many output positions per sample, a seeded random subset drawn
        afresh for every batch (deterministic for a given sequence of batches).
    seed : int, default 0
        Seed of the position subsets.
    """

    def __init__(self, module: nn.Module, *, max_positions: int = MAX_POSITIONS, seed: int = 0) -> None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}")
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
            raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
        self.module = module
        self.max_positions = max_positions
        self._gen = torch.Generator().manual_seed(seed)
        if isinstance(module, nn.Linear):
            groups, k = 1, module.in_features
        else:
            groups = module.groups
            k = module.in_channels // groups * math.prod(module.kernel_size)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self._gram, self._cross, self._dense_gram = zeros(groups, k, k), zeros(groups, k, k), zeros(groups, k, k)
        self._sum, self._dense_sum = zeros(groups, k), zeros(groups, k)
        self.count = 0
        self.samples = 0

    def _positions(self, x: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(self.module, nn.Conv2d):
            return None
        total = _output_positions(self.module, x)
        if total <= self.max_positions:
            return None
        return torch.randperm(total, generator=self._gen)[: self.max_positions].sort().values

    def update(self, dense_input: torch.Tensor, input: torch.Tensor) -> None:  # noqa: A002
        """Add one batch: the layer's input in the dense model and in the compressed model."""
        if dense_input.shape != input.shape:
            raise ValueError(f"dense_input and input must have the same shape, got "
                             f"{tuple(dense_input.shape)} and {tuple(input.shape)}")
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
        for xd, xc in zip(dense_input.split(chunk), input.split(chunk)):
            self._add(input_rows(self.module, xd.detach(), positions=positions),
                      input_rows(self.module, xc.detach(), positions=positions))
        self.samples += input.shape[0] if input.dim() > 1 else 1

    def _add(self, rows_dense: torch.Tensor, rows: torch.Tensor) -> None:
        xd = rows_dense.to(device="cpu", dtype=torch.float64)
        xc = rows.to(device="cpu", dtype=torch.float64)
        xct = xc.transpose(1, 2)
        self._gram += xct @ xc
        self._cross += xd.transpose(1, 2) @ xc
        self._dense_gram += xd.transpose(1, 2) @ xd
        self._sum += xc.sum(dim=1)
        self._dense_sum += xd.sum(dim=1)
        self.count += xc.shape[1]

    def finalize(self) -> LayerStats:
        """The statistics so far. ``ValueError`` when nothing was added."""
        if self.count == 0:
            raise ValueError("no calibration rows were added for this layer")
        return LayerStats(gram=self._gram.clone(), cross=self._cross.clone(),
                          dense_gram=self._dense_gram.clone(), mean=self._sum / self.count,
                          dense_mean=self._dense_sum / self.count, count=self.count,
                          samples=self.samples)


def layer_stats(module: nn.Module, inputs: object, *, dense_inputs: object = None,
                max_positions: int = MAX_POSITIONS) -> LayerStats:
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
    """
    acc = StatsAccumulator(module, max_positions=max_positions)
    batches = calib_batches(inputs)
    dense_batches = batches if dense_inputs is None else calib_batches(dense_inputs)
    if dense_inputs is None:
        for x in batches:
            acc.update(x, x)
    else:
        for xd, x in zip(dense_batches, batches, strict=True):
            acc.update(xd, x)
    return acc.finalize()
