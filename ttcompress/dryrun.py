"""Preview a plan without decomposing: per-layer decisions, projected parameters and cheap error estimates.

What ``ttcompress decompose --dry-run`` prints. The relative errors are *estimates* from each
format's error ladder (:meth:`~ttcompress.formats.base.CompressionFormat.ladder`: singular values of
the weight's unfoldings, no decomposition), e.g. TT-SVD's bound [Oseledets 2011, Thm. 2.2] for TT
and a multilinear-rank proxy for CP [Kolda & Bader 2009]; a format without a ladder gives none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ttcompress.formats import DENSE, get_format
from ttcompress.formats.base import LayerDecision
from ttcompress.layer_report import count_params
from ttcompress.formats.structure import preview_preparation
from ttcompress.plan import Plan
from ttcompress.surgery_checks import check_finite_parameters, guarded_plan

__all__ = ["LARGE_ERROR", "LayerPreview", "PlanPreview", "preview_plan"]

#: A relative weight error above this is flagged in the per-layer tables (decompose, inspect, report):
#: past it the layer keeps less than about half of its weight's energy.
LARGE_ERROR = 0.5


@dataclass(frozen=True)
class LayerPreview:
    """One layer of a preview: the plan's decision and the estimated relative error (None: no estimate)."""

    decision: LayerDecision
    est_error: float | None


@dataclass(frozen=True)
class PlanPreview:
    """A whole-model preview: layers, and parameters before and after (projected)."""

    layers: tuple[LayerPreview, ...]
    params_before: int
    params_after: int

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)


def _estimate(module: nn.Module, decision: LayerDecision) -> float | None:
    """sqrt of the ladder's squared error at the largest level within the decision's parameters."""
    if decision.format == DENSE or decision.params_after is None:
        return None
    ladder = get_format(decision.format).ladder(module, decision)
    if ladder is None or not ladder.params:
        return None
    fits = [k for k, p in enumerate(ladder.params) if p <= decision.params_after]
    k = fits[-1] if fits else 0
    return math.sqrt(max(float(ladder.errors[k]), 0.0))


def preview_plan(model: nn.Module, plan: Plan) -> PlanPreview:
    """What :func:`ttcompress.surgery.compress` would do to ``model`` under ``plan``, without doing it.

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
    layers = tuple(LayerPreview(d, _estimate(modules[d.name], d)) for d in guarded_plan(prep, plan))
    before = count_params(model)
    saved = sum(d.decision.params_before - d.decision.params_after for d in layers
                if d.decision.format != DENSE and d.decision.params_after is not None)  # fmt: skip
    return PlanPreview(layers, before, before - saved)
