"""The ``tucker2`` format: ``nn.Conv2d`` -> :class:`~ttcompress.layers.tucker2_conv.Tucker2Conv2d`.

References
----------
Y.-D. Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power
Mobile Applications", ICLR 2016.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.decompose.spectra import singular_tails, unfold
from ttcompress.decompose.tucker2 import tucker2_param_count
from ttcompress.formats.base import (
    UPPER_BOUND,
    BuildResult,
    CompressionFormat,
    ErrorPreview,
    FormatDescription,
    Ladder,
    LayerDecision,
    bias_params,
    dense_params,
    setting,
)
from ttcompress.errors import InputError
from ttcompress.formats.checks import check_build_options, check_ranks, check_ratio, freeze_options
from ttcompress.formats.fitting import calibrated
from ttcompress.formats.registry import register_format
from ttcompress.layers.tucker2_conv import Tucker2Conv2d

__all__ = ["DEFAULT_TUCKER2_RATIO", "Tucker2Format", "Tucker2Settings", "tucker2_rank_steps"]

#: Compression factor per conv used when neither ranks nor ratio is given.
DEFAULT_TUCKER2_RATIO = 4.0


@dataclass(frozen=True)
class Tucker2Settings:
    """How ``nn.Conv2d`` layers become :class:`~ttcompress.layers.tucker2_conv.Tucker2Conv2d`.

    Parameters
    ----------
    ranks : int or (int, int), optional
        Ranks per group: one for both channel modes, or ``(in_rank, out_rank)``. Not with ``ratio``.
    ratio : float, optional
        Per conv, the largest ranks (in proportion to the channel counts) that compress it at
        least this much (> 1). Default 4 when neither is given.
    options : tuple of (str, value)
        Extra keyword arguments for ``Tucker2Conv2d.from_conv`` (``n_iter_max``, ``tol``).
    """

    ranks: int | tuple[int, ...] | None = setting(
        group="size", excludes=("ratio",), metavar="INT|none",
        help="Rank (both channel modes) of the Tucker-2 format's Conv2d layers; --set tucker2.ranks=[IN,OUT] "
        "gives two.")
    ratio: float | None = setting(
        group="size", excludes=("ranks",), kind="float", metavar="FLOAT|none",
        help="Per conv of the Tucker-2 format, the largest ranks that compress it this much (> 1; default 4).")
    options: tuple[tuple[str, Any], ...] = setting((), merge=True)

    def __post_init__(self) -> None:
        ranks = check_ranks(self.ranks, "tucker2.ranks")
        if isinstance(ranks, tuple) and len(ranks) != 2:
            raise InputError("tucker2.ranks", f"must be one int or (in_rank, out_rank), got {list(ranks)}")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "ratio", check_ratio(self.ratio, "tucker2.ratio"))
        object.__setattr__(self, "options", freeze_options(self.options, "tucker2.options"))
        check_build_options(self.options, {"n_iter_max": int, "tol": float}, "tucker2.options")
        if self.ranks is not None and self.ratio is not None:
            raise InputError("tucker2.ranks", "and tucker2.ratio are mutually exclusive; give one")


def _sizes(conv: nn.Conv2d) -> tuple[int, int, int, int, int]:
    g = conv.groups
    _o, _i, kh, kw = conv.weight.shape
    return conv.out_channels // g, conv.in_channels // g, kh, kw, g


def _params(conv: nn.Conv2d, in_rank: int, out_rank: int) -> int:
    cout_g, cin_g, kh, kw, g = _sizes(conv)
    return tucker2_param_count(conv.out_channels, conv.in_channels, kh, kw, out_rank, in_rank, groups=g) + bias_params(conv)


def tucker2_rank_steps(conv: nn.Conv2d) -> list[tuple[int, int]]:
    """``(in_rank, out_rank)`` pairs in proportion to the channels per group, growing, that shrink ``conv``."""
    return [pair for pair, _ in _steps(*_sizes(conv), conv.bias is not None)]


@functools.lru_cache(maxsize=256)
def _steps(cout_g: int, cin_g: int, kh: int, kw: int, g: int, bias: bool) -> tuple[tuple[tuple[int, int], int], ...]:
    """Rank steps of a conv geometry with their parameter counts (bias included), cached: the
    ``auto`` ladder asks for a budget fit at every CP rank step, thousands per large conv."""
    before = g * cout_g * cin_g * kh * kw + (g * cout_g if bias else 0)
    steps: list[tuple[tuple[int, int], int]] = []
    big = max(cout_g, cin_g)
    for k in range(1, big + 1):
        pair = (max(1, round(k * cin_g / big)), max(1, round(k * cout_g / big)))
        if kh * kw == 1:  # a 1x1 core is an r_out x r_in matrix: the build keeps min(r_in, r_out) of each
            pair = (min(pair), min(pair))
        if steps and pair == steps[-1][0]:
            continue
        params = tucker2_param_count(g * cout_g, g * cin_g, kh, kw, pair[1], pair[0], groups=g) + (
            g * cout_g if bias else 0)
        if params >= before:
            break
        steps.append((pair, params))
    return tuple(steps)


@register_format
class Tucker2Format(CompressionFormat):
    """Tucker-2 Conv2d layers: 1x1 -> kh x kw core -> 1x1 (HOSVD + HOOI)."""

    name = "tucker2"
    targets = (nn.Conv2d,)
    layer_class = Tucker2Conv2d
    settings = Tucker2Settings
    summary = "Conv2d -> 1x1, kxk core, 1x1 (Tucker-2, HOSVD + HOOI; Kim et al. 2016)"
    settings_aliases = {"rank": "ranks"}

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        cout_g, cin_g, kh, kw, g = _sizes(module)  # type: ignore[arg-type]
        if cin_g == 1 and cout_g == 1:
            return self.dense_decision(module, name, "depthwise conv: no channel mode to factor", aliases)
        ranks, ratio = settings.ranks, settings.ratio
        options = dict(settings.options)
        if lowest:
            steps = tucker2_rank_steps(module)  # type: ignore[arg-type]
            if not steps:
                return self.dense_decision(module, name, "would not shrink even at Tucker-2 ranks (1, 1)", aliases)
            ranks, ratio = steps[0], None
        if ranks is None and ratio is None:
            ratio = DEFAULT_TUCKER2_RATIO
        if ranks is None:
            before = dense_params(module)
            fit = [p for p in tucker2_rank_steps(module) if _params(module, *p) * ratio <= before]  # type: ignore[arg-type]
            if not fit:
                return self.dense_decision(module, name, f"would not shrink {ratio:g}x even at Tucker-2 ranks (1, 1)",
                                           aliases)
            ranks = fit[-1]
        r_in, r_out = (ranks, ranks) if isinstance(ranks, int) else ranks
        r_in, r_out = min(r_in, cin_g, cout_g * kh * kw), min(r_out, cout_g, cin_g * kh * kw)
        if kh * kw == 1:  # what the build keeps of a 1x1 kernel (see _steps)
            r_in = r_out = min(r_in, r_out)
        after = _params(module, r_in, r_out)  # type: ignore[arg-type]
        return self.decision(module, name, {"in_rank": r_in, "out_rank": r_out, **options}, after, aliases,
                             f"Tucker-2 ranks ({r_in}, {r_out})")

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        layer = Tucker2Conv2d.from_conv(module, **{k: v for k, v in options.items() if v is not None})
        return calibrated(module, layer, calib)

    def describe(self, layer: nn.Module) -> FormatDescription:
        kh, kw = layer.kernel_size
        shape = (int(layer.out_channels), int(layer.in_channels) // int(layer.groups), int(kh), int(kw))
        return FormatDescription(self.name, shape, (int(layer.in_rank), int(layer.out_rank)),
                                 text=f"r={int(layer.in_rank)},{int(layer.out_rank)}")

    def suggest(self, decision: LayerDecision) -> str:
        return f"Tucker-2 ranks ({decision.options['in_rank']}, {decision.options['out_rank']})"

    def flops(self, layer: nn.Module) -> int:
        return int(layer.flops)

    def ladder(self, module: nn.Module, decision: LayerDecision) -> Ladder | None:
        cout_g, cin_g, kh, kw, g = _sizes(module)  # type: ignore[arg-type]
        w = module.weight.detach().to(torch.float64)
        norm2 = float(w.square().sum()) or 1.0
        groups = [w[i * cout_g:(i + 1) * cout_g] for i in range(g)]
        tails_out = [singular_tails(unfold(p, 0)) for p in groups]
        tails_in = [singular_tails(unfold(p, 1)) for p in groups]
        extra = {k: v for k, v in decision.options.items() if k not in ("in_rank", "out_rank")}
        params, errors, options = [], [], []
        for r_in, r_out in tucker2_rank_steps(module):  # type: ignore[arg-type]
            # truncated HOSVD error bound: sum of the discarded tails of both channel modes [De Lathauwer 2000]
            e2 = sum(float(to[min(r_out, len(to) - 1)]) + float(ti[min(r_in, len(ti) - 1)])
                     for to, ti in zip(tails_out, tails_in))
            params.append(_params(module, r_in, r_out))  # type: ignore[arg-type]
            errors.append(e2 / norm2)
            options.append({"in_rank": r_in, "out_rank": r_out, **extra})
        return Ladder(tuple(params), tuple(errors), tuple(options))

    def preview_cost(self, module: nn.Module, options: Mapping[str, Any]) -> float:
        """HOSVD + HOOI: per sweep and group, the two channel Gram matrices and their eigensolves."""
        cout_g, cin_g, kh, kw, g = _sizes(module)  # type: ignore[arg-type]
        sweeps = 1 + int(options.get("n_iter_max") if options.get("n_iter_max") is not None else 10)
        per_group = cout_g * cin_g * kh * kw * (cout_g + cin_g) + cout_g ** 3 + cin_g ** 3
        return float(sweeps * g * per_group)

    def estimate(self, module: nn.Module, options: Mapping[str, Any]) -> ErrorPreview | None:
        """The truncated HOSVD's error (a build without HOOI sweeps, about 1/11 of its work): an upper
        bound, since the HOOI sweeps the build runs next never raise the error."""
        built = self.build(module, {**options, "n_iter_max": 0})
        return ErrorPreview(float(built.layer.rel_error), UPPER_BOUND, self.name)

    def fit_budget(self, module: nn.Module, budget: int, settings: Any) -> dict[str, Any] | None:
        cout_g, cin_g, *_ = _sizes(module)  # type: ignore[arg-type]
        if cin_g == 1 and cout_g == 1:
            return None
        steps = _steps(*_sizes(module), module.bias is not None)  # type: ignore[arg-type]
        fit = bisect.bisect_right([params for _, params in steps], budget)  # params grow with the step
        if fit == 0:
            return None
        s = settings if settings is not None else Tucker2Settings()
        in_rank, out_rank = steps[fit - 1][0]
        return {"in_rank": in_rank, "out_rank": out_rank, **dict(s.options)}
