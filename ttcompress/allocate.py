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

With calibration data (``sensitivity``: the input Gram matrix ``G = X^T X`` of every layer in the
dense model, :func:`input_grams`) the same ladders are computed on the *whitened* weight
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.progress import report_batch
from ttcompress.calibration.stats import MAX_POSITIONS, input_rows
from ttcompress.formats import DENSE, LayerDecision, get_format
from ttcompress.formats.base import Ladder
from ttcompress.inputs import call_model

__all__ = ["MIN_LAYER_RATIO", "Slot", "allocate", "greedy", "input_grams", "whitened"]

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


def input_grams(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], *,
                max_positions: int = MAX_POSITIONS) -> dict[str, torch.Tensor]:
    """``G = X^T X`` (float64, ``(groups, K, K)``) of the inputs of each layer ``names`` in ``model``.

    One forward pass per batch in eval mode without gradients, with a hook per layer; conv inputs
    are unfolded into patch rows (at most ``max_positions`` seeded positions per sample). Holds one
    ``K x K`` matrix per layer. Layers the batches never reach are left out.
    """
    grams: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str) -> Callable[..., None]:
        def run(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            positions = None
            if isinstance(module, nn.Conv2d):
                rows = input_rows(module, x[:1] if x.dim() == 4 else x.unsqueeze(0))
                total = rows.shape[1]
                if total > max_positions:
                    positions = torch.randperm(total, generator=gen)[:max_positions].sort().values.to(x.device)
            rows = input_rows(module, x, positions=positions).to("cpu", torch.float64)
            g = rows.transpose(1, 2) @ rows
            grams[name] = grams[name] + g if name in grams else g
        return run

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for done, x in enumerate(batches, 1):
                call_model(model, x)
                report_batch("statistics", done, len(batches))
    finally:
        for h in handles:
            h.remove()
        for m, flag in training:
            m.training = flag
    return grams


def whitened(module: nn.Module, gram: torch.Tensor) -> nn.Module:
    """A copy of ``module`` whose weight is ``W G^{1/2}`` (per group; symmetric square root).

    Its Frobenius weight error under any factorization equals the output error of the original
    weight on inputs with Gram matrix ``G``, so a format's spectral ladder on it estimates output
    errors.
    """
    weight = module.weight.detach().to("cpu", torch.float64)
    groups = gram.shape[0]
    evals, q = torch.linalg.eigh(gram)
    root = (q * evals.clamp_min(0).sqrt()[:, None, :]) @ q.transpose(1, 2)
    w = weight.reshape(groups, weight.shape[0] // groups, -1) @ root
    twin = copy.deepcopy(module).to("cpu")
    with torch.no_grad():
        twin.weight = nn.Parameter(w.reshape(weight.shape).to(module.weight.dtype), requires_grad=False)
    return twin


def _ladders(slots: Sequence[Slot], decisions: list[LayerDecision],
             sensitivity: Mapping[str, torch.Tensor] | None) -> dict[int, Ladder]:
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
    return ladders


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
    sensitivity : mapping of str to torch.Tensor, optional
        Input Gram matrices by layer name (:func:`input_grams`): error estimates are then output
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
    on the layer whose next step buys the largest decrease of the estimated squared relative
    error per added parameter (:func:`greedy`), as long as the step fits the budget. A layer never
    grows to a rank at which it would not shrink.
    """
    budget = total / target_ratio
    slots = list(slots)
    for _ in range(len(slots) + 1):
        decisions = [s.decision for s in slots]
        ladders = _ladders(slots, decisions, sensitivity)
        fixed_params = total - sum(d.params_before for d in decisions) + sum(
            (d.params_after if d.skipped is None and d.params_after is not None else d.params_before)
            for d in decisions)
        if fixed_params > budget:
            raise ValueError(
                f"target ratio (--target-ratio) {target_ratio:g} is out of reach: rank 1 in every compressible "
                f"layer gives {total / fixed_params:.2f}x ({fixed_params} of {total} params)"
            )
        levels = greedy(ladders, fixed_params, budget)
        dropped = False
        for idx, k in levels.items():
            ladder = ladders[idx]
            decisions[idx] = replace(decisions[idx], options=ladder.options[k], params_after=ladder.params[k])
            dec = decisions[idx]
            saved = dec.params_before - ladder.params[k]
            error = math.sqrt(max(ladder.errors[k], 0.0))
            reason = None
            if saved < min_saving * total and error > max_error:
                kind = "output" if sensitivity is not None and dec.name in sensitivity else "weight"
                reason = (f"kept dense: saves only {saved:,} params ({saved / total:.2%} of the model) at estimated "
                          f"{kind} error {error:.2f} (min_saving {min_saving:g}, max_error {max_error:g})")
            elif (dec.params_before < MIN_LAYER_RATIO * ladder.params[k]
                  and (sensitivity is None or dec.name not in sensitivity)
                  and fixed_params + dec.params_before - ladder.params[0] <= budget):
                reason = (f"kept dense: the ranks the budget allows would shrink it only "
                          f"{dec.params_before / ladder.params[k]:.2f}x (< {MIN_LAYER_RATIO:g}x): more kernels and "
                          "error for almost no saving")
            if reason is not None:
                slots[idx] = replace(slots[idx], decision=replace(dec, format=DENSE, options={},
                                                                  params_after=dec.params_before, skipped=reason))
                dropped = True
                fixed_params += dec.params_before - ladder.params[0]
        if not dropped:
            return decisions
    return decisions
