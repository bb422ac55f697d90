"""The ``tt`` format: ``nn.Linear`` -> :class:`~ttcompress.layers.tt_linear.TTLinear` by TT-SVD.

References
----------
A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.decompose.modes import choose_modes, max_num_cores, validate_modes
from ttcompress.decompose.spectra import singular_tails
from ttcompress.decompose.tt import tt_param_count, tt_ranks
from ttcompress.formats.base import (
    UPPER_BOUND,
    BuildResult,
    CompressionFormat,
    ErrorPreview,
    FormatDescription,
    Ladder,
    LayerDecision,
    bias_params,
    join,
    setting,
)
from ttcompress.errors import InputError
from ttcompress.formats.checks import check_d, check_eps, check_modes, check_ranks
from ttcompress.formats.fitting import calibrated
from ttcompress.formats.registry import register_format
from ttcompress.layers.tt_linear import TTLinear

__all__ = ["DEFAULT_TT_RANKS", "TTFormat", "TTSettings", "require_modes", "tt_error_curve", "tt_params"]

#: TT max rank used when neither ranks nor eps is given anywhere.
DEFAULT_TT_RANKS = 8


@dataclass(frozen=True)
class TTSettings:
    """How ``nn.Linear`` layers become :class:`~ttcompress.layers.tt_linear.TTLinear`.

    Parameters
    ----------
    ranks : int or tuple of int, optional
        Max TT rank (int) or the full rank tuple ``(1, r1, ..., 1)``.
    eps : float, optional
        Relative Frobenius error per layer for TT-SVD, in (0, 1). With ``ranks`` too, both apply.
    d : int, optional
        Number of TT cores (2 to 64, at most what each layer holds: a layer too small stays
        dense); the layer's default when None.
    in_modes, out_modes : tuple of int, optional
        Explicit factorizations of in/out features (rules only, usually).
    """

    ranks: int | tuple[int, ...] | None = setting(
        group="size", metavar="INT|none",
        help="Max TT rank of Linear layers (default 8 when neither --tt-ranks nor --tt-eps is given).")
    eps: float | None = setting(
        group="size", kind="float", metavar="FLOAT|none",
        help="Relative reconstruction error per Linear layer, in (0, 1) (TT-SVD truncation).")
    d: int | None = setting(metavar="INT|none", help="Number of TT cores (2 to 64; default: by layer size, 2-4).")
    in_modes: tuple[int, ...] | None = setting()
    out_modes: tuple[int, ...] | None = setting()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", check_ranks(self.ranks, "tt.ranks"))
        object.__setattr__(self, "eps", check_eps(self.eps, "tt.eps"))
        object.__setattr__(self, "d", check_d(self.d, "tt.d"))
        object.__setattr__(self, "in_modes", check_modes(self.in_modes, "tt.in_modes"))
        object.__setattr__(self, "out_modes", check_modes(self.out_modes, "tt.out_modes"))


def tt_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int]) -> int:
    """Parameters of the TT cores (no bias) for these modes and ranks (int = max-rank cap)."""
    return int(tt_param_count(tuple(in_modes), tuple(out_modes), ranks if isinstance(ranks, int) else tuple(ranks)))


def tt_error_curve(weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int], rmax: int) -> list[float]:
    """Estimated squared relative error of TT-SVD at max rank ``r = 1..rmax``.

    TT-SVD's bound ``||W - W_r||^2 <= sum_k tail_k(r)^2`` over the unfoldings of the reshaped
    weight [Oseledets 2011, Thm. 2.2].
    """
    d = len(in_modes)
    w = weight.detach().to(torch.float64)
    pad_out, pad_in = math.prod(out_modes) - w.shape[0], math.prod(in_modes) - w.shape[1]
    if pad_out or pad_in:  # modes may zero-pad the layer's sizes
        w = torch.nn.functional.pad(w, (0, pad_in, 0, pad_out))
    w = w.reshape(*out_modes, *in_modes)
    perm = [x for k in range(d) for x in (k, d + k)]
    t = w.permute(*perm).reshape([out_modes[k] * in_modes[k] for k in range(d)])
    norm2 = float(t.square().sum()) or 1.0
    sizes = list(t.shape)
    tails = [singular_tails(t.reshape(math.prod(sizes[:k]), -1)) for k in range(1, d)]
    return [sum(float(tl[min(r, len(tl) - 1)]) for tl in tails) / norm2 for r in range(1, rmax + 1)]


def require_modes(config: Mapping[str, Any], keys: tuple[str, ...]) -> Mapping[str, Any]:
    """``config`` if it lists every one of ``keys`` (a TT layer's modes), else a ValueError.

    A saved TT layer always records its modes; a record without them would make the loader choose
    modes from the sizes and ``d`` in the file, work that those numbers alone could make huge.
    """
    missing = [k for k in keys if k not in config]
    if isinstance(config, Mapping) and missing:
        raise ValueError(f"config lacks {' and '.join(missing)} (a saved TT layer records its modes)")
    return config


@register_format
class TTFormat(CompressionFormat):
    """TT-matrix Linear layers (TT-SVD of the reshaped weight)."""

    name = "tt"
    targets = (nn.Linear,)
    layer_class = TTLinear
    settings = TTSettings
    default_for = (nn.Linear,)
    summary = "Linear -> TT-matrix (TT-SVD; Novikov et al. 2015)"

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        s = settings
        ranks, eps, d = s.ranks, s.eps, s.d
        in_modes, out_modes = s.in_modes, s.out_modes
        if ranks is None and eps is None:
            ranks = DEFAULT_TT_RANKS
        score = ranks
        if lowest:
            ranks, eps, score = 1, None, DEFAULT_TT_RANKS
        out_f, in_f = module.weight.shape
        if in_modes is None or out_modes is None:
            d_eff = d if d is not None else (len(in_modes or out_modes or ()) or None)
            if d_eff is not None and d_eff > max_num_cores(in_f, out_f):
                return self.dense_decision(module, name, f"{in_f}x{out_f} is too small for {d_eff} TT cores "
                                           f"(at most {max_num_cores(in_f, out_f)})", aliases)
            try:
                sug_in, sug_out = choose_modes(in_f, out_f, d=d_eff, ranks=score if score is not None else DEFAULT_TT_RANKS)
            except (TypeError, ValueError) as exc:  # a full ranks tuple that does not fit this layer's cores
                raise InputError("tt.ranks", f"{score!r} do not fit layer {name!r} ({in_f} -> {out_f}): {exc}") from None
            in_modes, out_modes = in_modes or sug_in, out_modes or sug_out
        try:
            in_modes = validate_modes(in_modes, in_f, name="in_modes")
            out_modes = validate_modes(out_modes, out_f, name="out_modes", d=len(in_modes))
        except (TypeError, ValueError) as exc:
            raise InputError(f"layer {name!r}", f"({in_f} -> {out_f}): {exc}") from None
        if isinstance(ranks, Sequence) and len(ranks) != len(in_modes) + 1:
            raise InputError("tt.ranks", f"{tuple(ranks)!r} do not fit layer {name!r} ({in_f} -> {out_f}): "
                             f"{len(in_modes)} cores need {len(in_modes) + 1} entries (1, r_1, ..., 1)")
        options: dict[str, Any] = {"ranks": list(ranks) if isinstance(ranks, tuple) else ranks, "eps": eps,
                                   "in_modes": list(in_modes), "out_modes": list(out_modes)}
        if len(in_modes) < 2:
            return self.dense_decision(module, name, f"{in_f}x{out_f} cannot be split into TT cores", aliases)
        after = None if ranks is None else tt_params(in_modes, out_modes, ranks) + bias_params(module)
        return self.decision(module, name, options, after, aliases, f"TT ranks {ranks}")

    def rebuild(self, config: Mapping[str, Any]) -> nn.Module:
        """As recorded by ``TTLinear.config()``, modes included: nothing is chosen from a file's sizes."""
        return super().rebuild(require_modes(config, ("in_modes", "out_modes")))

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        opts = {k: v for k, v in options.items() if v is not None}
        if isinstance(opts.get("ranks"), list):
            opts["ranks"] = tuple(opts["ranks"])
        for key in ("in_modes", "out_modes"):
            if key in opts:
                opts[key] = tuple(opts[key])
        return calibrated(module, TTLinear.from_linear(module, **opts), calib)

    def describe(self, layer: nn.Module) -> FormatDescription:
        ranks = tuple(int(r) for r in layer.ranks)
        ins, outs = tuple(layer.in_modes), tuple(layer.out_modes)
        text = f"{join(outs)}<-{join(ins)} r={join(ranks, ',')}"
        return FormatDescription(self.name, (int(layer.out_features), int(layer.in_features)), ranks, ins, outs, text)

    def suggest(self, decision: LayerDecision) -> str:
        return f"TT {join(decision.options['out_modes'])} <- {join(decision.options['in_modes'])}"

    def flops(self, layer: nn.Module) -> int:
        rows = 256
        return int(math.ceil(layer.forward_plan(rows).flops / rows))

    def ladder(self, module: nn.Module, decision: LayerDecision) -> Ladder | None:
        in_m, out_m = decision.options["in_modes"], decision.options["out_modes"]
        bias = bias_params(module)
        params: list[int] = []
        for r in range(1, max(tt_ranks(in_m, out_m, 10**9)) + 1):
            p = tt_params(in_m, out_m, r) + bias
            if p >= decision.params_before:
                break
            params.append(p)
        errors = tt_error_curve(module.weight, in_m, out_m, len(params))
        options = tuple({**decision.options, "ranks": k + 1, "eps": None} for k in range(len(params)))
        return Ladder(tuple(params), tuple(errors), options)

    def preview_cost(self, module: nn.Module, options: Mapping[str, Any]) -> float:
        """TT-SVD's work: one truncated SVD per core, the ``k``-th of an ``(r_{k-1} m_k n_k) x rest``
        unfolding, about ``numel * max_k r_{k-1} m_k n_k`` multiply-adds."""
        in_m, out_m = options["in_modes"], options["out_modes"]
        cap = options.get("ranks")
        ranks = tt_ranks(in_m, out_m, 10**9 if cap is None else (tuple(cap) if isinstance(cap, list) else cap))
        numel = math.prod(in_m) * math.prod(out_m)
        return float(numel) * max(ranks[k] * in_m[k] * out_m[k] for k in range(len(in_m)))

    def estimate(self, module: nn.Module, options: Mapping[str, Any]) -> ErrorPreview | None:
        """TT-SVD's error bound (at most 1): ``eps`` with an error bound only, else the discarded
        singular-value tails of the unfoldings at the rank cap [Oseledets 2011, Thm. 2.2]; None with
        both (the eps truncation may cut further than the cap)."""
        cap, eps = options.get("ranks"), options.get("eps")
        if cap is None:
            return None if eps is None else ErrorPreview(float(eps), UPPER_BOUND, self.name)
        if eps is not None or not isinstance(cap, int):
            return None
        curve = tt_error_curve(module.weight, options["in_modes"], options["out_modes"], cap)
        return ErrorPreview(min(math.sqrt(max(curve[-1], 0.0)), 1.0), UPPER_BOUND, self.name)

    def fit_budget(self, module: nn.Module, budget: int, settings: Any) -> dict[str, Any] | None:
        s = settings if settings is not None else TTSettings()
        out_f, in_f = module.weight.shape
        in_m, out_m = s.in_modes, s.out_modes
        if in_m is None or out_m is None:
            in_m, out_m = choose_modes(in_f, out_f, d=s.d, ranks=DEFAULT_TT_RANKS)
        if len(in_m) < 2:
            return None
        bias = bias_params(module)
        best = None
        for r in range(1, max(tt_ranks(in_m, out_m, 10**9)) + 1):
            if tt_params(in_m, out_m, r) + bias > budget:
                break
            best = r
        if best is None:
            return None
        return {"ranks": best, "eps": None, "in_modes": list(in_m), "out_modes": list(out_m)}
