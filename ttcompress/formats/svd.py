"""The ``svd`` format: ``nn.Linear`` -> :class:`~ttcompress.layers.svd_linear.SVDLinear` by truncated SVD.

References
----------
C. Eckart and G. Young, "The approximation of one matrix by another of lower rank", 1936.
E. Denton et al., "Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation", NeurIPS 2014.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.fit import FitResult, lowrank_output_errors, whitened_lowrank
from ttcompress.calibration.stats import LayerStats

from ttcompress.decompose.spectra import singular_tails
from ttcompress.decompose.svd import randomized_svd, svd_param_count, svd_rank_for_ratio, use_randomized_svd
from ttcompress.formats.base import (
    EXACT,
    BuildResult,
    CompressionFormat,
    ErrorPreview,
    FormatDescription,
    Ladder,
    LayerDecision,
    bias_params,
    setting,
)
from ttcompress.errors import InputError
from ttcompress.formats.checks import check_eps, check_pos_int, check_ratio
from ttcompress.formats.fitting import check_calib, record_fit
from ttcompress.formats.registry import register_format
from ttcompress.layers.svd_linear import SVDLinear

__all__ = ["DEFAULT_SVD_RATIO", "SVDFormat", "SVDSettings"]

#: Compression factor per Linear used when neither rank, eps nor ratio is given.
DEFAULT_SVD_RATIO = 4.0


@dataclass(frozen=True)
class SVDSettings:
    """How ``nn.Linear`` layers become :class:`~ttcompress.layers.svd_linear.SVDLinear`.

    Parameters
    ----------
    rank : int, optional
        Rank of the product (capped at ``min(in, out)``).
    eps : float, optional
        Relative Frobenius error per layer, in (0, 1). With ``rank`` too, the smaller rank wins.
    ratio : float, optional
        Per layer, the largest rank that compresses it at least this much (> 1). Not with
        ``rank`` or ``eps``. Default 4 when nothing is given.
    """

    rank: int | None = setting(
        group="size", excludes=("ratio",), metavar="INT|none",
        help="Rank of the SVD (low-rank product) format's Linear layers (capped at min(in, out)).")
    eps: float | None = setting(
        group="size", excludes=("ratio",), kind="float", metavar="FLOAT|none",
        help="Relative error per Linear layer of the SVD format, in (0, 1).")
    ratio: float | None = setting(
        group="size", excludes=("rank", "eps"), kind="float", metavar="FLOAT|none",
        help="Per Linear layer of the SVD format, the largest rank that compresses it this much (> 1; default 4).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", None if self.rank is None else check_pos_int(self.rank, "svd.rank"))
        object.__setattr__(self, "eps", check_eps(self.eps, "svd.eps"))
        object.__setattr__(self, "ratio", check_ratio(self.ratio, "svd.ratio"))
        if self.ratio is not None and (self.rank is not None or self.eps is not None):
            raise InputError("svd.ratio", "excludes svd.rank and svd.eps; give ratio, or rank and/or eps")


def _fit_whitened(linear: nn.Module, layer: SVDLinear, stats: LayerStats) -> BuildResult:
    """Refit ``layer``'s factors to ``linear``'s outputs by the whitened truncated SVD, in place.

    :func:`~ttcompress.calibration.fit.whitened_lowrank` is the exact optimum of the (damped)
    output error for a rank-``r`` product (SVD-LLM); with a bias it runs on centred statistics and
    the bias is then corrected, the joint optimum. The data-free factors are kept when the fit
    does not lower the output error. Both errors come from the factors
    (:func:`~ttcompress.calibration.fit.lowrank_output_errors`). Returns the build result with
    the fit (:func:`record_fit`).
    """
    w, b = linear.weight.detach(), linear.bias
    a, bb = whitened_lowrank(w, stats.centered() if b is not None else stats, layer.rank)
    new_bias = None
    if b is not None:  # b^ = b + W mu - A (B mu~) (calibration.fit.corrected_bias, through the factors)
        wmu = torch.cat([block.to("cpu", torch.float64) @ stats.dense_mean[0] for block in w.split(2048)])
        shift = wmu - a.to(torch.float64) @ (bb.to(torch.float64) @ stats.mean[0])
        new_bias = (b.detach().to(torch.float64) + shift.to(b.device)).to(b.dtype)
    before, after = lowrank_output_errors(
        w, [(layer.second, layer.first, layer.bias), (a, bb, new_bias)], stats, bias=b)
    method = "whitened-svd"
    if after <= before:
        with torch.no_grad():
            layer.first.copy_(bb)
            layer.second.copy_(a)
            if layer.bias is not None:
                layer.bias.copy_(new_bias)
    else:
        after, method = before, "none"
    return record_fit(layer, FitResult(layer, before, after, method), w)


def _randomized_start(linear: nn.Linear, rank: int) -> SVDLinear:
    """The data-free start of a calibrated fit of a large layer at a rank far below its size: the
    truncated SVD by :func:`~ttcompress.decompose.svd.randomized_svd` (the fit replaces it; only
    its output error is reported, as the error before fitting)."""
    w = linear.weight.detach()
    u, s, vh = randomized_svd(w, rank)
    root = s.sqrt()
    layer = SVDLinear(linear.in_features, linear.out_features, rank=int(s.numel()), bias=linear.bias is not None,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.first.copy_(root[:, None] * vh)
        layer.second.copy_(u * root)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)  # type: ignore[union-attr]
    return layer


@register_format
class SVDFormat(CompressionFormat):
    """Low-rank Linear layers (truncated SVD, two matmuls)."""

    name = "svd"
    targets = (nn.Linear,)
    layer_class = SVDLinear
    settings = SVDSettings
    summary = "Linear -> low-rank product (truncated SVD)"
    settings_aliases = {"ranks": "rank"}

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        rank, eps, ratio = settings.rank, settings.eps, settings.ratio
        if lowest:
            rank, eps, ratio = 1, None, None
        if rank is None and eps is None and ratio is None:
            ratio = DEFAULT_SVD_RATIO
        out_f, in_f = module.weight.shape
        if ratio is not None:
            rank = svd_rank_for_ratio(out_f, in_f, ratio, bias=bias_params(module) > 0)
            if rank < 1:
                return self.dense_decision(module, name, f"would not shrink {ratio:g}x even at SVD rank 1", aliases)
        if rank is not None:
            rank = min(rank, out_f, in_f)
        after = None if rank is None else svd_param_count(out_f, in_f, rank) + bias_params(module)
        return self.decision(module, name, {"rank": rank, "eps": eps}, after, aliases, f"SVD rank {rank}")

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        stats = check_calib(calib)
        rank, eps = options.get("rank"), options.get("eps")
        out_f, in_f = module.weight.shape
        if stats is not None and eps is None and rank is not None and use_randomized_svd(out_f, in_f, int(rank)):
            layer = _randomized_start(module, int(rank))  # the fit replaces it: no full SVD
        else:
            layer = SVDLinear.from_linear(module, rank=rank, eps=eps)
        return BuildResult.of(layer) if stats is None else _fit_whitened(module, layer, stats)

    def describe(self, layer: nn.Module) -> FormatDescription:
        return FormatDescription(self.name, (int(layer.out_features), int(layer.in_features)), (int(layer.rank),),
                                 text=f"r={int(layer.rank)}")

    def suggest(self, decision: LayerDecision) -> str:
        rank = decision.options.get("rank")
        return f"SVD rank {rank}" if rank is not None else f"SVD eps {decision.options.get('eps')}"

    def flops(self, layer: nn.Module) -> int:
        return int(layer.flops)

    def ladder(self, module: nn.Module, decision: LayerDecision) -> Ladder | None:
        out_f, in_f = module.weight.shape
        bias = bias_params(module)
        tails = singular_tails(module.weight)
        norm2 = float(tails[0]) or 1.0
        params, errors = [], []
        for r in range(1, min(out_f, in_f) + 1):
            p = svd_param_count(out_f, in_f, r) + bias
            if p >= decision.params_before:
                break
            params.append(p)
            errors.append(float(tails[r]) / norm2)
        options = tuple({"rank": k + 1, "eps": None} for k in range(len(params)))
        return Ladder(tuple(params), tuple(errors), options)

    def preview(self, module: nn.Module, options: Mapping[str, Any], *, budget: float) -> ErrorPreview | None:
        """Exact at any size: the truncated SVD's error is the tail of the singular values
        (Eckart-Young), found from the same spectrum the build computes, with the same rank rule
        (:func:`~ttcompress.decompose.svd.truncated_svd`)."""
        tails = singular_tails(module.weight)
        total = float(tails[0])
        rank, eps = options.get("rank"), options.get("eps")
        r = len(tails) - 1 if rank is None else min(int(rank), len(tails) - 1)
        if eps is not None:
            ok = (tails <= (eps * eps) * total).nonzero()
            r = min(r, max(1, int(ok[0])))
        r = max(r, 1)
        out_f, in_f = module.weight.shape
        return ErrorPreview(math.sqrt(float(tails[r]) / total) if total > 0 else 0.0, EXACT, self.name,
                            params=svd_param_count(out_f, in_f, r) + bias_params(module))

    def fit_budget(self, module: nn.Module, budget: int, settings: Any) -> dict[str, Any] | None:
        out_f, in_f = module.weight.shape
        rank = min((budget - bias_params(module)) // (out_f + in_f), out_f, in_f)
        return {"rank": int(rank), "eps": None} if rank >= 1 else None
