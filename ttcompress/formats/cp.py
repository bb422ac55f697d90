"""The ``cp`` format: ``nn.Conv2d`` -> :class:`~ttcompress.layers.cp_conv.CPConv2d` by CP-ALS.

References
----------
V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up Convolutional Neural
Networks Using Fine-tuned CP-Decomposition", ICLR 2015.
T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.decompose._threads import at_most_threads
from ttcompress.decompose.cp import CPDecomposition, cp_param_count, cp_rank_for_ratio
from ttcompress.decompose.spectra import singular_tails, unfold
from ttcompress.formats.base import (
    ESTIMATE,
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
from ttcompress.formats.checks import check_build_options, check_pos_int, check_ratio, freeze_options
from ttcompress.formats.fitting import calibrated
from ttcompress.formats.registry import register_format
from ttcompress.layers.cp_conv import CPConv2d

__all__ = ["DEFAULT_CP_RATIO", "DEFAULT_TOL", "CPFormat", "CPSettings", "cp_error_curve", "cp_params", "cp_rank_for"]

#: CP compression factor per conv used when neither rank nor ratio is given anywhere.
DEFAULT_CP_RATIO = 4.0
#: CP-ALS stopping tolerance of the format's builds when a plan sets none: stop once a sweep lowers the
#: relative error by less than 0.1 %. Measured on a 256x256x3x3 resnet50 conv at rank 284
#: (docs/benchmarks.md, "CP-ALS of every resnet50 conv"): 19 sweeps and a 1.8 % higher error than
#: 100 sweeps, in one fifth of the time; ``cp_als``'s own default (1e-6) runs all 100 sweeps on
#: such kernels. A plan's ``cp: {options: {tol: 1e-6}}`` asks for the longer fit.
DEFAULT_TOL = 1e-3
#: A trial fit (:meth:`CPFormat.build_trial`, used by ``auto`` to compare formats) runs at most
#: this many ALS sweeps, and stops once a sweep improves the error by less than :data:`TRIAL_TOL`.
TRIAL_SWEEPS = 10
TRIAL_TOL = 1e-3
#: The keyword options of ``CPConv2d.from_conv`` a plan may set (``cp: {options: {...}}``), with their kinds.
BUILD_OPTIONS = {"n_iter_max": int, "tol": float, "init": ("auto", "svd", "random"), "n_restarts": int, "seed": int}


@dataclass(frozen=True)
class CPSettings:
    """How ``nn.Conv2d`` layers become :class:`~ttcompress.layers.cp_conv.CPConv2d`.

    Parameters
    ----------
    rank : int, optional
        CP rank. Mutually exclusive with ``ratio``.
    ratio : float, optional
        Choose, per conv, the largest rank that compresses it by at least this factor (> 1).
    options : tuple of (str, value), optional
        Extra keyword arguments for ``CPConv2d.from_conv`` (e.g. ``n_iter_max``, ``tol``); a dict
        is accepted and frozen. ``tol`` defaults to :data:`DEFAULT_TOL` (1e-3) here, not to
        ``from_conv``'s 1e-6.
    """

    rank: int | None = setting(
        group="size", excludes=("ratio",), flag="--cp-ranks", metavar="INT|none",
        help="CP rank of Conv2d layers; 'none' keeps them dense.")
    ratio: float | None = setting(
        group="size", excludes=("rank",), kind="float", metavar="FLOAT|none",
        help="Per conv, the rank that compresses it by this factor (> 1; default 4).")
    options: tuple[tuple[str, Any], ...] = setting((), merge=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", None if self.rank is None else check_pos_int(self.rank, "cp.rank"))
        object.__setattr__(self, "ratio", check_ratio(self.ratio, "cp.ratio"))
        object.__setattr__(self, "options", freeze_options(self.options, "cp.options"))
        check_build_options(self.options, BUILD_OPTIONS, "cp.options")
        if self.rank is not None and self.ratio is not None:
            raise InputError("cp.rank", "and cp.ratio are mutually exclusive; give one")


def cp_params(out_channels: int, in_per_group: int, kh: int, kw: int, rank: int, groups: int = 1) -> int:
    """Parameters of the CP factors (no bias) of a conv kernel at ``rank``."""
    return int(cp_param_count(out_channels, in_per_group, kh, kw, rank, groups=groups))


def cp_rank_for(conv: nn.Conv2d, ratio: float) -> int:
    """Largest CP rank whose layer (bias included) is at least ``ratio`` times smaller than ``conv``.

    Returns 0 when even rank 1 does not reach ``ratio``.
    """
    out_c, in_g, kh, kw = conv.weight.shape
    return int(cp_rank_for_ratio(out_c, in_g, kh, kw, ratio, conv.groups, bias=conv.bias is not None))


#: Calibration of :func:`cp_error_curve`'s proxy: CP-ALS (``tol=1e-3``) ends at about
#: ``U * max(1 - CP_GAIN * (1 - U) ** CP_POWER, CP_FLOOR)`` where ``U`` is the squared relative error of
#: the per-tap SVD model of the same rank. Fitted on Gaussian (randomly initialised) kernels from
#: 10x1x3x3 to 128x128x3x3 and 64x3x7x7 at 1.2x-20x: within 0.074 of CP-ALS's relative error
#: (0.03 for 3x3 kernels of 64+ channels at 2x-20x), 0.026 on resnet18's random convs at 4x.
CP_GAIN, CP_POWER, CP_FLOOR = 1.7, 3.8, 0.3


def _tap_svd_tails(weight: torch.Tensor, rmax: int) -> torch.Tensor:
    """Squared error of the explicit rank-``R`` CP model from per-tap SVDs, ``R = 0..rmax``.

    The kernel is a sum over spatial taps of ``slice (x) e_tap``; keeping the ``R`` largest singular
    triplets over all slices is a CP model of rank ``R``. The same holds after rotating the taps into
    the principal directions of the spatial unfolding (an orthogonal change of basis of that mode),
    which concentrates trained kernels' energy in few slices; the smaller of both errors is kept.
    """
    o, i, kh, kw = weight.shape
    flat = weight.reshape(o, i, kh * kw)
    # principal spatial directions: eigenvectors of the (kh kw x kh kw) Gram matrix of the spatial
    # unfolding, not its SVD, which also formed the (o i x kh kw) left factor: 3 s of the 9 s a
    # 512x256x64x1 kernel took here (issue 25)
    spatial = flat.reshape(o * i, kh * kw)
    with at_most_threads(1):
        _, vecs = torch.linalg.eigh(spatial.T @ spatial)
    best = None
    for taps in (flat, flat @ vecs):
        sl = taps.permute(2, 0, 1).contiguous()
        gram = sl @ sl.transpose(1, 2) if o <= i else sl.transpose(1, 2) @ sl
        with at_most_threads(1):
            sq = torch.linalg.eigvalsh(gram).clamp_min(0.0).reshape(-1)
        sq = torch.sort(sq, descending=True).values
        kept = torch.cat([sq.new_zeros(1), sq.cumsum(0)])
        tails = (kept[-1] - kept).clamp_min(0.0)
        tails = torch.cat([tails, tails.new_zeros(max(rmax + 1 - tails.numel(), 0))])[: rmax + 1]
        best = tails if best is None else torch.minimum(best, tails)
    return best


def cp_error_curve(weight: torch.Tensor, rmax: int) -> list[float]:
    """Estimated squared relative error of the CP-ALS fit at rank ``R = 1..rmax``, non-increasing.

    Between two honest bounds: a rank-``R`` CP tensor has multilinear ranks ``<= R``, so
    ``L(R) = max_n tail_n(R)^2`` over the out/in/spatial unfoldings is a lower bound of the best
    rank-``R`` error [Kolda & Bader 2009]; the explicit per-tap SVD model of rank ``R``
    (:func:`_tap_svd_tails`) has error ``U(R)``, an upper bound of the best. CP-ALS lands between them;
    the estimate is ``max(L, U max(1 - CP_GAIN (1 - U)^CP_POWER, CP_FLOOR))``, calibrated against
    CP-ALS on Gaussian kernels (:data:`CP_GAIN`). On kernels with strongly decaying spectra CP-ALS can
    stall above ``U`` itself; the estimate then is below the real run's error. Unlike ``L`` alone it is above 0 at ranks beyond the channel
    counts, where ``L`` is 0 but a 4-way kernel is not yet exact. For a 1x1 kernel ``L = U`` is the
    exact (SVD) error.
    """
    key = (weight._version, tuple(weight.shape), weight.dtype, weight.device)
    hit = _CURVES.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key and len(hit[2]) >= rmax:
        return hit[2][:rmax]
    curve = _error_curve(weight, rmax)
    ident = id(weight)
    _CURVES[ident] = (weakref.ref(weight, lambda _dead: _CURVES.pop(ident, None)), key, curve)
    return list(curve)


#: :func:`cp_error_curve` by weight tensor (while it lives and is unchanged; entries go with it): the rank allocator asks
#: again for every layer each time it keeps one layer dense and starts over (11 curves instead of 6,
#: 2-9 s each, for the 22 M-parameter CREPE net at 4x; issue 25).
_CURVES: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...], list[float]]] = {}


def _error_curve(weight: torch.Tensor, rmax: int) -> list[float]:
    """:func:`cp_error_curve`, computed."""
    w = weight.detach().to(torch.float64)
    o, i, kh, kw = w.shape
    norm2 = float(w.square().sum())
    if norm2 == 0.0 or rmax < 1:
        return [0.0] * max(rmax, 0)
    tails = [singular_tails(unfold(w, 0)), singular_tails(unfold(w, 1)),
             singular_tails(w.permute(2, 3, 0, 1).reshape(kh * kw, -1))]
    upper = _tap_svd_tails(w, rmax) / norm2
    curve = []
    for r in range(1, rmax + 1):
        low = max(float(tl[min(r, len(tl) - 1)]) for tl in tails) / norm2
        up = min(float(upper[r]), 1.0)
        curve.append(max(low, up * max(1.0 - CP_GAIN * (1.0 - up) ** CP_POWER, CP_FLOOR)))
    return curve


def _trial_options(module: nn.Module, options: Mapping[str, Any], calib: Any) -> dict[str, Any] | None:
    """Build options of a shortened trial fit, or None when the trial is the full build."""
    if calib is not None or module.groups > 1 or int(options.get("n_restarts") or 1) > 1:
        return None
    n_iter_max = int(options.get("n_iter_max") or 100)
    tol = float(options.get("tol") if options.get("tol") is not None else DEFAULT_TOL)
    if n_iter_max <= TRIAL_SWEEPS and tol >= TRIAL_TOL:
        return None
    return {**options, "n_iter_max": min(n_iter_max, TRIAL_SWEEPS), "tol": max(tol, TRIAL_TOL)}


@register_format
class CPFormat(CompressionFormat):
    """CP-decomposed Conv2d layers (CP-ALS of the kernel)."""

    name = "cp"
    targets = (nn.Conv2d,)
    layer_class = CPConv2d
    settings = CPSettings
    default_for = (nn.Conv2d,)
    summary = "Conv2d -> CP (CP-ALS; Lebedev et al. 2015)"
    settings_aliases = {"ranks": "rank"}

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        conv: nn.Conv2d = module  # type: ignore[assignment]
        if conv.groups > 1:
            reason = "depthwise conv" if conv.groups == conv.in_channels else f"grouped conv (groups={conv.groups}) unsupported"
            return self.dense_decision(conv, name, reason, aliases)
        s = settings
        rank, ratio = s.rank, s.ratio
        options = dict(s.options)
        if lowest:
            rank, ratio = 1, None
        if rank is None and ratio is None:
            ratio = DEFAULT_CP_RATIO
        if rank is None:
            rank = cp_rank_for(conv, ratio)  # type: ignore[arg-type]
            if rank < 1:
                return self.dense_decision(conv, name, f"would not shrink {ratio:g}x even at CP rank 1", aliases)
        out_c, in_g, kh, kw = conv.weight.shape
        after = cp_params(out_c, in_g, kh, kw, rank, conv.groups) + bias_params(conv)
        return self.decision(conv, name, {"rank": rank, **options}, after, aliases, f"CP rank {rank}")

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        opts = {"tol": DEFAULT_TOL, **{k: v for k, v in options.items() if v is not None}}
        rank = opts.pop("rank")
        if name is not None:
            opts.setdefault("name", name)  # degenerate-fit warnings name the layer
        return calibrated(module, CPConv2d.from_conv(module, rank=rank, **opts), calib)

    def build_trial(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
                   name: str | None = None) -> BuildResult:
        """A shortened CP-ALS fit (:data:`TRIAL_SWEEPS`, :data:`TRIAL_TOL`) to compare formats with.

        ALS never raises the error, so the trial's error is an upper bound of the full fit's, and
        :meth:`finish_trial` continues from its factors. With calibration data, several restarts or
        grouped convs the trial is the full build.
        """
        trial = _trial_options(module, options, calib)
        return self.build(module, options if trial is None else trial, calib=calib, name=name)

    def finish_trial(self, module: nn.Module, trial: BuildResult, options: Mapping[str, Any], *,
                     calib: Any = None, name: str | None = None) -> BuildResult:
        """The full fit: the remaining ALS sweeps under the full ``tol``, warm-started from ``trial``."""
        if _trial_options(module, options, calib) is None:
            return trial
        left = int(options.get("n_iter_max") or 100) - int(trial.layer.n_iter)
        if left < 1:
            return trial
        trial_layer = trial.layer
        with torch.no_grad():
            start = CPDecomposition(
                factors=(trial_layer.out_factor, trial_layer.in_factor.T, trial_layer.kh_factor.T,
                         trial_layer.kw_factor.T),
                rank=int(trial_layer.rank), rel_error=float(trial_layer.rel_error), n_iter=int(trial_layer.n_iter))
        built = self.build(module, {**options, "init": start, "n_iter_max": left}, name=name)
        built.layer.n_iter = int(trial_layer.n_iter) + int(built.layer.n_iter)
        return built

    def describe(self, layer: nn.Module) -> FormatDescription:
        kh, kw = layer.kernel_size
        shape = (int(layer.out_channels), int(layer.in_channels) // int(layer.groups), int(kh), int(kw))
        return FormatDescription(self.name, shape, (int(layer.rank),), text=f"r={int(layer.rank)}")

    def suggest(self, decision: LayerDecision) -> str:
        ratio = decision.params_before / decision.params_after if decision.params_after else None
        return f"CP rank {decision.options['rank']}" + (f" ({ratio:.1f}x)" if ratio else "")

    def flops(self, layer: nn.Module) -> int:
        kh, kw = layer.kernel_size
        g = layer.groups
        return int(layer.rank * g * (layer.in_channels // g + kh * kw + layer.out_channels // g))

    def ladder(self, module: nn.Module, decision: LayerDecision) -> Ladder | None:
        o, i, kh, kw = decision.shape
        bias = bias_params(module)
        params: list[int] = []
        r = 1
        while (p := cp_params(o, i, kh, kw, r, 1) + bias) < decision.params_before:
            params.append(p)
            r += 1
        errors = cp_error_curve(module.weight, len(params))
        options = tuple({**decision.options, "rank": k + 1} for k in range(len(params)))
        return Ladder(tuple(params), tuple(errors), options)

    def preview_cost(self, module: nn.Module, options: Mapping[str, Any]) -> float:
        """CP-ALS's work: about 20 sweeps (``tol=1e-3``) of three MTTKRPs, ``2 R numel`` each."""
        sweeps = min(int(options.get("n_iter_max") or 100), 20) * max(int(options.get("n_restarts") or 1), 1)
        return float(sweeps * 6 * int(options["rank"]) * module.weight.numel())

    def estimate(self, module: nn.Module, options: Mapping[str, Any]) -> ErrorPreview | None:
        """:func:`cp_error_curve` at the rank (a calibrated estimate, not a bound)."""
        if module.groups > 1:
            return None
        curve = cp_error_curve(module.weight, int(options["rank"]))
        return ErrorPreview(math.sqrt(max(curve[-1], 0.0)), ESTIMATE, self.name)

    def fit_budget(self, module: nn.Module, budget: int, settings: Any) -> dict[str, Any] | None:
        if module.groups > 1:
            return None
        o, i, kh, kw = module.weight.shape
        bias = bias_params(module)
        per_rank = cp_params(o, i, kh, kw, 1, 1)
        rank = (budget - bias) // per_rank
        if rank < 1:
            return None
        s = settings if settings is not None else CPSettings()
        return {"rank": int(rank), **dict(s.options)}
