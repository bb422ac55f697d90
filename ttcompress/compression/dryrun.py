"""Preview a plan: per-layer decisions, projected parameters, and the data-free weight error each
layer would have.

What ``ttcompress decompose --dry-run`` prints. Each compressed layer's relative weight error comes
from the format's :meth:`~ttcompress.formats.base.CompressionFormat.preview`:

* **exact** when the layer's decomposition is cheap (its
  :meth:`~ttcompress.formats.base.CompressionFormat.preview_cost` at most ``budget``, default
  :data:`PREVIEW_BUDGET` multiply-adds): the layer is decomposed exactly as the real run would
  (without calibration data) and measured, then dropped. SVD is always exact (Eckart-Young: the
  tail of the spectrum the build computes);
* otherwise an **upper bound** (TT-SVD's bound [Oseledets 2011, Thm. 2.2], capped at 1; Tucker-2's
  truncated HOSVD, which the HOOI sweeps only improve) or a calibrated **estimate** (CP:
  :func:`~ttcompress.formats.cp.cp_error_curve`).

``auto`` shows the format it would pick: within the budget by running its own build (the same
choice as the real run), else by comparing the candidates' previews.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ttcompress.formats import DENSE, get_format
from ttcompress.formats.base import ESTIMATE, ErrorPreview, LayerDecision
from ttcompress.layer_report import count_params
from ttcompress.formats.structure import preview_preparation
from ttcompress.compression.plan import Plan
from ttcompress.compression.surgery_checks import check_finite_parameters, guarded_plan

__all__ = ["LARGE_ERROR", "PREVIEW_BUDGET", "LayerPreview", "PlanPreview", "preview_plan"]

#: A relative weight error above this is flagged in the per-layer tables (decompose, inspect, report):
#: past it the layer keeps less than about half of its weight's energy.
LARGE_ERROR = 0.5

#: A dry run decomposes a layer for real (exact error) when the format's cost model puts its
#: decomposition at most this many multiply-adds: about a second of one idle core. Under it on
#: resnet18: every Tucker-2 conv up to 128x128x3x3, CP convs up to 64x64x3x3 at 4x; small CNNs and
#: MLPs entirely.
PREVIEW_BUDGET = 5e8


@dataclass(frozen=True)
class LayerPreview:
    """One layer of a preview: the plan's decision and the data-free weight error it would have.

    Attributes
    ----------
    decision : LayerDecision
        What the plan says for the layer.
    est_error : float or None
        Relative Frobenius error of the weight without calibration data (None: no preview).
    error_kind : str or None
        ``"exact"`` (decomposed and measured), ``"upper bound"`` or ``"estimate"``
        (:class:`~ttcompress.formats.base.ErrorPreview`).
    format : str
        The format that would be built: the decision's, or the one ``auto`` would pick.
    note : str or None
        Why ``auto`` would pick it.
    built_params : int or None
        Parameters of the layer the preview decomposed (exact previews), else None.
    """

    decision: LayerDecision
    est_error: float | None
    error_kind: str | None = None
    format: str = DENSE
    note: str | None = None
    built_params: int | None = None

    @property
    def params_after(self) -> int | None:
        """Projected parameters: those of the layer the preview built when it built one (exactly what
        the real run builds, e.g. where ``auto``'s pick or an error bound sets the ranks), else the
        plan's (None when neither is known)."""
        d = self.decision
        if d.format == DENSE:
            return d.params_before
        return self.built_params if self.built_params is not None else d.params_after

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {"name": d.name, "type": d.type, "shape": list(d.shape), "plan_format": d.format,
                "format": self.format, "params_before": d.params_before,
                "params_after": self.params_after,
                "weight_error": self.est_error, "weight_error_kind": self.error_kind,
                "skipped": d.skipped, "note": self.note}


@dataclass(frozen=True)
class PlanPreview:
    """A whole-model preview: layers, and parameters before and after (projected)."""

    layers: tuple[LayerPreview, ...]
    params_before: int
    params_after: int

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals and one record per layer (``weight_error`` is data-free)."""
        return {"dry_run": True, "params_before": self.params_before, "params_after": self.params_after,
                "ratio": self.ratio,
                "compressed": sum(lp.decision.format != DENSE for lp in self.layers),
                "layers": [lp.to_dict() for lp in self.layers]}


def _ladder_estimate(module: nn.Module, decision: LayerDecision) -> ErrorPreview | None:
    """sqrt of the ladder's squared error at the largest level within the decision's parameters."""
    ladder = get_format(decision.format).ladder(module, decision)
    if ladder is None or not ladder.params or decision.params_after is None:
        return None
    fits = [k for k, p in enumerate(ladder.params) if p <= decision.params_after]
    k = fits[-1] if fits else 0
    return ErrorPreview(math.sqrt(max(float(ladder.errors[k]), 0.0)), ESTIMATE, decision.format)


def _preview_layer(module: nn.Module, decision: LayerDecision, budget: float) -> LayerPreview:
    if decision.format == DENSE:
        return LayerPreview(decision, None)
    p = get_format(decision.format).preview(module, decision.options, budget=budget)
    if p is None:
        p = _ladder_estimate(module, decision)
    if p is None:
        return LayerPreview(decision, None, None, decision.format)
    return LayerPreview(decision, p.error, p.kind, p.format, p.note, p.params)


def preview_plan(model: nn.Module, plan: Plan, *, budget: float = PREVIEW_BUDGET, patterns_checked: bool = False,
                 decided: Mapping[str, LayerDecision] | None = None) -> PlanPreview:
    """What :func:`ttcompress.compression.pipeline.compress` would do to ``model`` under ``plan``, without writing it.

    Layers whose decomposition costs at most ``budget`` multiply-adds are decomposed one at a time
    (and dropped) to give their exact data-free weight error; others get a bound or an estimate
    (module docstring). ``budget=0`` decomposes nothing. ``patterns_checked`` and ``decided``: ``model``
    is a part of a larger model (one transformer block) that the plan's patterns were checked against
    and, under a target ratio, whose ranks were allocated (:func:`~ttcompress.compression.surgery_checks.guarded_plan`).

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module`` or ``plan`` not a :class:`Plan`.
    ValueError
        The plan does not fit the model (a pattern matching nothing, an unreachable target ratio).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # The structure compression would put in place first (attention split into its projections,
    # GPT-2's Conv1D as Linear), on a copy, and the same guards (tied weights stay dense).
    check_finite_parameters(model)  # as compress does: a preview of what would be refused is no preview
    prep = preview_preparation(model)
    modules = dict(prep.model.named_modules(remove_duplicate=False))
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise ValueError(f"budget must be a non-negative number, got {budget!r}")
    decisions = guarded_plan(prep, plan, patterns_checked=patterns_checked, decided=decided)
    layers = tuple(_preview_layer(modules[d.name], d, float(budget)) for d in decisions)
    before = count_params(model)
    saved = sum(lp.decision.params_before - lp.params_after for lp in layers
                if lp.decision.format != DENSE and lp.params_after is not None)  # fmt: skip
    return PlanPreview(layers, before, before - saved)
