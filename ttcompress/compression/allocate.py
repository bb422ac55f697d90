"""Rank allocation for a whole-model target ratio: spend a parameter budget where it lowers the error most.

:func:`allocate` takes one :class:`Slot` per compressible layer (its lowest-rank decision from
the plan) and raises ranks greedily. Each format gives its rank steps and error estimates
(:meth:`~ttcompress.formats.base.CompressionFormat.ladder`), computed from singular values without
decomposing, e.g.

* TT (uniform max rank ``r``): TT-SVD's bound ``||W - W_r||^2 <= sum_k tail_k(r)^2``, where
  ``tail_k(r)`` is the error of the best rank-``r`` approximation of the ``k``-th unfolding of
  the reshaped weight [1]_ (:func:`ttcompress.formats.tt.tt_error_curve`);
* CP (rank ``R``): an estimate of CP-ALS's error, at least ``max_n tail_n(R)^2`` over the
  out/in/spatial unfoldings (a lower bound of the best rank-R CP error [2]_) and otherwise the
  per-tap SVD model's error scaled by a factor calibrated against CP-ALS
  (:func:`ttcompress.formats.cp.cp_error_curve`); above 0 at every rank short of exact.

With calibration data (``sensitivity``: the input statistics ``G = X^T X`` of every layer in the
dense model, exact or sketched, from the one statistics collector: :func:`input_grams`) the same ladders are computed on the *whitened* weight
``W G^{1/2}`` (one block per conv group): since ``||(W - W^) G^{1/2}||_F = ||X W^T - X W^^T||_F``,
the error curves then estimate the relative **output** error on the calibration data, exactly
for the SVD format's truncation of the whitened weight (SVD-LLM [3]_) and as the spectral
estimate of the whitened weight for TT and CP. The budget then goes where the measured output
error drops most per parameter: a layer whose inputs excite few directions gets low ranks.

A layer whose allocated compression saves fewer than ``min_saving`` times the model's parameters
at an estimated error above ``max_error`` stays dense, and the allocation is redone without it.
Without calibration data, so does a layer whose allocated ranks would shrink it by less than
:data:`MIN_LAYER_RATIO`, as long as the target stays reachable without it. The greedy gives small
layers ranks near full (``1.0``-``1.09x`` for resnet18's downsample convs and fc, the seed CNN's
first conv and last layer, at every target from 2x to 32x), where the spectral estimates are
optimistic: the seed CNN's first conv at 1.05x came out of CP-ALS with a 0.28 relative weight
error. Keeping such layers dense measured better (seed CNN at 10x, data-free: 61.7% instead of
53.3% before fine-tuning, 92.7% instead of 92.1% after). With calibration the layers are fitted to
their outputs and the estimates are output errors; there the rule measured worse (91.0 / 93.2%
instead of 91.9 / 94.1%, seed 0; 91.1 / 93.6% instead of 91.8 / 93.9%, seed 1) and is not applied.

References
----------
.. [3] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", 2024.
.. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
.. [2] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ttcompress.calibration.collector import StatsCollector
from ttcompress.calibration.stats import MAX_POSITIONS, InputStats
from ttcompress.formats import DENSE, LayerDecision, get_format
from ttcompress.formats.base import Ladder
from ttcompress.errors import InputError

__all__ = ["MIN_LAYER_RATIO", "Slot", "allocate", "allocate_ladders", "allocate_levels", "greedy", "input_grams",
           "slot_ladders", "whitened"]

#: Below this compression of its own weights a layer stays dense under a whole-model target ratio
#: without calibration data: a factorized layer keeping more than 80 % of its parameters costs at
#: least ~80 % of the dense layer's FLOPs in two or more kernels, and its approximation error buys
#: less than 20 % of its parameters.
MIN_LAYER_RATIO = 1.25


@dataclass(frozen=True)
class Slot:
    """One compressible layer offered to :func:`allocate`.

    Attributes
    ----------
    module : nn.Module
        The dense layer.
    decision : LayerDecision
        Its decision at the lowest rank (or at the ranks a plan rule fixed, or dense).
    fixed : bool
        True when a plan rule fixed the ranks: the layer keeps ``decision`` and its parameters
        count against the budget.
    """

    module: nn.Module
    decision: LayerDecision
    fixed: bool = False


def lost_energy(squared_error: float) -> float:
    """``-log(1 - e^2)``: what a layer with squared relative error ``e^2`` costs the model.

    The layers of a network act in sequence, so the energies they keep multiply: the sum of
    ``-log(1 - e_i^2)`` is minus the log of the fraction the whole stack keeps. Unlike the sum of
    ``e_i^2`` it grows without bound as one layer approaches losing everything, so the greedy never
    starves one layer to rank 1 to save parameters elsewhere (resnet18 at 8x with honest CP
    estimates: layer4 at CP rank 1 under ``sum e^2``, at 11-22x under this objective).
    """
    return -math.log(max(1.0 - squared_error, 1e-12))


def greedy(ladders: Mapping[int, Ladder], spent: int, budget: float) -> dict[int, int]:
    """Raise levels where the error drops most per parameter while the budget allows; idx -> level.

    Every ladder starts at level 0 (already counted in ``spent``). The step with the largest
    ``(f(errors[k]) - f(errors[k+1])) / (params[k+1] - params[k])`` over all ladders is taken next,
    with ``f`` = :func:`lost_energy`, as long as it fits ``budget`` (a greedy marginal-gain
    allocation).

    Equal gains go first to the ladder whose level is the smallest fraction of its top level. In
    practice these are zero gains, where an estimate has flattened out (CP's lower bound is 0 once
    the rank reaches every mode's rank): the rest of the budget is then spread so that those layers
    grow in proportion to their size. (Before, ties went to the first layer: on a 22 M-parameter
    CREPE net at 4x, the first (64, 1) conv took all of it, CP rank 3,013 instead of 1,024, and its
    CP-ALS alone ran for more than 10 minutes.)
    """
    level = {idx: 0 for idx in ladders}
    heap: list[tuple[float, float, int, int]] = []

    def push(idx: int) -> None:
        params, errs = ladders[idx].params, ladders[idx].errors
        k = level[idx]
        if k + 1 < len(params):
            cost = params[k + 1] - params[k]
            gain = lost_energy(errs[k]) - lost_energy(errs[k + 1])
            heapq.heappush(heap, (-(gain / max(cost, 1)), params[k] / max(params[-1], 1), idx, k))

    for idx in ladders:
        push(idx)
    while heap:
        _neg, _frac, idx, k = heapq.heappop(heap)
        if level[idx] != k:
            continue
        params = ladders[idx].params
        cost = params[k + 1] - params[k]
        if spent + cost > budget:
            continue  # this layer cannot grow further; others may
        spent += cost
        level[idx] = k + 1
        push(idx)
    return level


def input_grams(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], *,
                max_positions: int = MAX_POSITIONS, memory: int | str | None = None) -> dict[str, InputStats]:
    """Input statistics (``G = X^T X``, exact or sketched) of each layer ``names`` in ``model``.

    A shortcut for :meth:`ttcompress.calibration.collector.StatsCollector.input_stats` (one
    forward pass per batch in eval mode without gradients; conv inputs unfolded into patch rows,
    at most ``max_positions`` seeded positions per sample) under the memory budget ``memory``.
    Layers the batches never reach, or for which the budget has no room, are left out.
    """
    collector = StatsCollector(list(batches), memory=memory, max_positions=max_positions)
    return collector.input_stats(model, names)[0]


def whitened(module: nn.Module, gram: torch.Tensor | InputStats) -> nn.Module:
    """A copy of ``module`` whose weight is ``W G^{1/2}`` (per group; symmetric square root).

    ``gram`` is the ``(groups, K, K)`` Gram matrix or the layer's :class:`InputStats` (exact or
    sketched: ``W G^{1/2} = (W R^T) (R R^T)^{-1/2} R`` from sketch rows ``R``, never ``K x K``).
    Its Frobenius weight error under any factorization equals the output error of the original
    weight on inputs with Gram matrix ``G``, so a format's spectral ladder on it estimates output
    errors.
    """
    stats = gram if isinstance(gram, InputStats) else InputStats(gram=gram)
    weight = module.weight.detach().to("cpu", torch.float64)
    groups = (stats.gram if stats.gram is not None else stats.rows).shape[0]  # type: ignore[union-attr]
    w = stats.whiten(weight.reshape(groups, weight.shape[0] // groups, -1))
    twin = copy.deepcopy(module).to("cpu")
    with torch.no_grad():
        twin.weight = nn.Parameter(w.reshape(weight.shape).to(module.weight.dtype), requires_grad=False)
    return twin


def slot_ladders(slots: Sequence[Slot], sensitivity: Mapping[str, torch.Tensor] | None = None,
                 ) -> tuple[list[LayerDecision], dict[int, Ladder]]:
    """Every free slot's rank ladder (index -> :class:`~ttcompress.formats.base.Ladder`), and the slots'
    decisions with each laddered one at the ladder's lowest level: what :func:`allocate_ladders` needs,
    small per layer (the modules are not kept). ``sensitivity`` as for :func:`allocate`."""
    decisions = [s.decision for s in slots]
    ladders: dict[int, Ladder] = {}
    for idx, slot in enumerate(slots):
        dec = slot.decision
        if slot.fixed or dec.skipped is not None:
            continue
        module = slot.module
        if sensitivity is not None and dec.name in sensitivity:
            module = whitened(module, sensitivity[dec.name])
        ladder = get_format(dec.format).ladder(module, dec)
        if ladder is not None and ladder.params:
            ladders[idx] = ladder
            decisions[idx] = replace(dec, options=ladder.options[0], params_after=ladder.params[0])
    return decisions, ladders


def allocate(slots: Sequence[Slot], *, total: int, target_ratio: float,
             sensitivity: Mapping[str, torch.Tensor] | None = None, min_saving: float = 0.0,
             max_error: float = 1.0) -> list[LayerDecision]:
    """Choose every free slot's ranks so that the model has at most ``total / target_ratio`` parameters.

    Parameters
    ----------
    slots : sequence of Slot
        The compressible layers, in module order.
    total : int
        Parameters of the whole model.
    target_ratio : float
        Whole-model compression factor (> 1).
    sensitivity : mapping of str to InputStats or torch.Tensor, optional
        Input statistics by layer name (:func:`input_grams`): error estimates are then output
        errors (on the whitened weight, :func:`whitened`) instead of weight errors.
    min_saving, max_error : float
        A free layer whose allocated level saves fewer than ``min_saving * total`` parameters at
        an estimated relative error above ``max_error`` stays dense (then the budget is
        allocated again among the others).

    Returns
    -------
    list of LayerDecision
        One per slot, in order.

    Raises
    ------
    ValueError
        The lowest rank everywhere still exceeds the budget (the message gives the best ratio).

    Notes
    -----
    Every free layer starts at its lowest rank; then ranks are raised one step at a time, always
    on the layer whose next step buys the largest decrease of the estimated error per added
    parameter (:func:`greedy`, errors counted as :func:`lost_energy`), as long as the step fits
    the budget. A layer never
    grows to a rank at which it would not shrink. The same as :func:`slot_ladders` then
    :func:`allocate_ladders`.
    """
    decisions, ladders = slot_ladders(slots, sensitivity)
    return allocate_ladders(decisions, ladders, total=total, target_ratio=target_ratio,
                            measured=frozenset(sensitivity or ()), min_saving=min_saving, max_error=max_error)


def allocate_ladders(decisions: Sequence[LayerDecision], ladders: Mapping[int, Ladder], *, total: int,
                     target_ratio: float, measured: Container[str] = frozenset(), min_saving: float = 0.0,
                     max_error: float = 1.0) -> list[LayerDecision]:
    """:func:`allocate` from the ladders :func:`slot_ladders` gave: :func:`allocate_levels`, then each
    layer's decision at its level.

    ``decisions`` are every compressible layer's (laddered ones at their lowest level), in module
    order; ``ladders`` by index into them; ``measured`` the names whose ladders estimate output
    errors on calibration data (the ``sensitivity`` of :func:`allocate`). Other arguments, the
    result and the errors as for :func:`allocate`.
    """
    levels, dense = allocate_levels(decisions, ladders, total=total, target_ratio=target_ratio, measured=measured,
                                    min_saving=min_saving, max_error=max_error)
    return [dense[i] if i in dense else
            replace(d, options=ladders[i].options[levels[i]], params_after=ladders[i].params[levels[i]])
            if i in levels else d for i, d in enumerate(decisions)]


def allocate_levels(decisions: Sequence[LayerDecision], ladders: Mapping[int, Ladder], *, total: int,
                    target_ratio: float, measured: Container[str] = frozenset(), min_saving: float = 0.0,
                    max_error: float = 1.0) -> tuple[dict[int, int], dict[int, LayerDecision]]:
    """The allocation of :func:`allocate_ladders` as levels: ``(levels, dense)``, the level of every
    layer compressed at a ladder's level (index -> level) and the decision of every laddered layer put
    back to dense (index -> decision, with the reason). Only the ladders' ``params`` and ``errors``
    are read: a model too large for memory is allocated from the ladders' numbers gathered one block
    at a time, and each layer's options at its level are computed again when its block is built.
    """
    budget = total / target_ratio
    dense: dict[int, LayerDecision] = {}  # layers the loop put back to dense, with the reason
    decisions = list(decisions)
    levels: dict[int, int] = {}
    for _ in range(len(decisions) + 1):  # each pass but the last puts at least one more layer back to dense
        current = [dense.get(i, d) for i, d in enumerate(decisions)]
        free = {i: ladder for i, ladder in ladders.items() if i not in dense}
        fixed_params = total - sum(d.params_before for d in current) + sum(
            (d.params_after if d.skipped is None and d.params_after is not None else d.params_before)
            for d in current)
        if fixed_params > budget:
            raise InputError(
                "target_ratio", f"{target_ratio:g} is out of reach: rank 1 in every compressible "
                f"layer gives {total / fixed_params:.2f}x ({fixed_params} of {total} params)"
            )
        levels = greedy(free, fixed_params, budget)
        dropped = False
        for idx, k in levels.items():
            ladder, dec = free[idx], current[idx]
            saved = dec.params_before - ladder.params[k]
            error = math.sqrt(max(ladder.errors[k], 0.0))
            reason = None
            if saved < min_saving * total and error > max_error:
                kind = "output" if dec.name in measured else "weight"
                reason = (f"kept dense: saves only {saved:,} params ({saved / total:.2%} of the model) at estimated "
                          f"{kind} error {error:.2f} (min_saving {min_saving:g}, max_error {max_error:g})")
            elif (dec.params_before < MIN_LAYER_RATIO * ladder.params[k]
                  and dec.name not in measured
                  and fixed_params + dec.params_before - ladder.params[0] <= budget):
                reason = (f"kept dense: the ranks the budget allows would shrink it only "
                          f"{dec.params_before / ladder.params[k]:.2f}x (< {MIN_LAYER_RATIO:g}x): more kernels and "
                          "error for almost no saving")
            if reason is not None:
                dense[idx] = replace(dec, format=DENSE, options={}, params_after=dec.params_before, skipped=reason)
                dropped = True
                fixed_params += dec.params_before - ladder.params[0]
        if not dropped:
            break
    return {i: k for i, k in levels.items() if i not in dense}, dense
