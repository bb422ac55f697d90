"""Rank allocation for a whole-model target ratio: spend a parameter budget where it lowers the error most.

:func:`allocate` takes one :class:`Slot` per compressible layer (its lowest-rank decision from
the plan) and raises ranks greedily. Each format gives its rank steps and error estimates
(:meth:`~ttcompress.formats.base.CompressionFormat.ladder`), computed from singular values without
decomposing, e.g.

* TT (uniform max rank ``r``): TT-SVD's bound ``||W - W_r||^2 <= sum_k tail_k(r)^2``, where
  ``tail_k(r)`` is the error of the best rank-``r`` approximation of the ``k``-th unfolding of
  the reshaped weight [1]_ (:func:`ttcompress.formats.tt.tt_error_curve`);
* CP (rank ``R``): a CP tensor of rank ``R`` has multilinear ranks ``<= R``, so
  ``max_n tail_n(R)^2`` over the out/in/spatial unfoldings is a lower bound of the best rank-R
  CP error [2]_; it serves as a cheap proxy (:func:`ttcompress.formats.cp.cp_error_curve`).

References
----------
.. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
.. [2] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import nn

from ttcompress.formats import LayerDecision, get_format
from ttcompress.formats.base import Ladder

__all__ = ["Slot", "allocate", "greedy"]


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


def greedy(ladders: Mapping[int, Ladder], spent: int, budget: float) -> dict[int, int]:
    """Raise levels where the error drops most per parameter while the budget allows; idx -> level.

    Every ladder starts at level 0 (already counted in ``spent``). The step with the largest
    ``(errors[k] - errors[k+1]) / (params[k+1] - params[k])`` over all ladders is taken next, as
    long as it fits ``budget`` (a greedy marginal-gain allocation).
    """
    level = {idx: 0 for idx in ladders}
    heap: list[tuple[float, int, int]] = []

    def push(idx: int) -> None:
        params, errs = ladders[idx].params, ladders[idx].errors
        k = level[idx]
        if k + 1 < len(params):
            cost = params[k + 1] - params[k]
            gain = errs[k] - errs[k + 1]
            heapq.heappush(heap, (-(gain / max(cost, 1)), idx, k))

    for idx in ladders:
        push(idx)
    while heap:
        _neg, idx, k = heapq.heappop(heap)
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


def allocate(slots: Sequence[Slot], *, total: int, target_ratio: float) -> list[LayerDecision]:
    """Choose every free slot's ranks so that the model has at most ``total / target_ratio`` parameters.

    Parameters
    ----------
    slots : sequence of Slot
        The compressible layers, in module order.
    total : int
        Parameters of the whole model.
    target_ratio : float
        Whole-model compression factor (> 1).

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
    on the layer whose next step buys the largest decrease of the estimated squared relative
    error per added parameter (:func:`greedy`), as long as the step fits the budget. A layer never
    grows to a rank at which it would not shrink.
    """
    budget = total / target_ratio
    decisions = [s.decision for s in slots]
    ladders: dict[int, Ladder] = {}
    for idx, slot in enumerate(slots):
        dec = slot.decision
        if slot.fixed or dec.skipped is not None:
            continue
        ladder = get_format(dec.format).ladder(slot.module, dec)
        if ladder is not None and ladder.params:
            ladders[idx] = ladder
            decisions[idx] = replace(dec, options=ladder.options[0], params_after=ladder.params[0])
    fixed_params = total - sum(d.params_before for d in decisions) + sum(
        (d.params_after if d.skipped is None and d.params_after is not None else d.params_before) for d in decisions
    )
    if fixed_params > budget:
        raise ValueError(
            f"target ratio (--target-ratio) {target_ratio:g} is out of reach: rank 1 in every compressible layer "
            f"gives {total / fixed_params:.2f}x ({fixed_params} of {total} params)"
        )
    for idx, k in greedy(ladders, fixed_params, budget).items():
        ladder = ladders[idx]
        decisions[idx] = replace(decisions[idx], options=ladder.options[k], params_after=ladder.params[k])
    return decisions
