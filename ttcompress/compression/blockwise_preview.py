"""``decompose --dry-run`` and ``inspect`` of a sharded directory, one transformer block at a time.

The directory :func:`~ttcompress.compression.blockwise.is_blockwise_dir` accepts is never loaded
whole: its shapes are checked against a skeleton on the ``meta`` device and the shard headers,
the plan's patterns against the whole model's layer names, then the layers outside the blocks
and each block in turn are read from the shards, previewed
(:func:`~ttcompress.compression.dryrun.preview_plan`) or summarized
(:func:`~ttcompress.compression.summary.summarize`) and freed: peak memory is the layers outside
the blocks plus one block, as in :func:`~ttcompress.compression.blockwise.compress_sharded`.

The results are those of the whole model: the same decisions (a ``target_ratio`` is allocated
over the whole model from the layers' rank ladders,
:func:`~ttcompress.compression.blockwise.whole_model_allocation`, as the data-free block-wise
run allocates it), parameter counts and shares of the whole model, the layers in its order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ttcompress.checkpoint.hf import hf_arch
from ttcompress.checkpoint.hf_files import open_weights
from ttcompress.compression.blockwise import model_parts, rest_model, for_each_part, whole_model_allocation
from ttcompress.compression.dryrun import PREVIEW_BUDGET, PlanPreview, preview_plan
from ttcompress.compression.plan import Plan, check_patterns_match, pattern_names
from ttcompress.compression.summary import ModelSummary, summarize
from ttcompress.compression.surgery import as_plan
from ttcompress.layer_report import count_params

__all__ = ["inspect_sharded", "preview_sharded"]

_T = TypeVar("_T")


def _by_part(source: str | Path, plan: Plan, look: Callable[[nn.Module, int, Any], _T]) -> tuple[list[_T], Any]:
    """``look(shell, total, decided)`` on every part of the sharded model at ``source``, one part in
    memory at a time (``total``: the whole model's parameters; ``decided``: the part's decisions in the
    whole-model allocation of a target ratio, else None); the results and the model's parts."""
    src = Path(source)
    where = str(src)
    out: list[_T] = []
    with open_weights(src, trust_pickle=False) as (shapes, read):
        parts = model_parts(src, shapes)
        check_patterns_match(plan, pattern_names(parts.probe))
        total = count_params(parts.probe)
        rest = rest_model(parts, read, where)
        allocation = whole_model_allocation(parts, rest, read, where, plan)
        for_each_part(parts, rest, read, where, lambda shell: out.append(
            look(shell, total, None if allocation is None else allocation.for_part(shell))))
    return out, parts


def _in_model_order(items: list[_T], name: Callable[[_T], str], probe: nn.Module) -> tuple[_T, ...]:
    order = {n: i for i, n in enumerate(pattern_names(probe))}
    return tuple(sorted(items, key=lambda item: order.get(name(item), len(order))))


def preview_sharded(source: str | Path, plan: Plan | None = None, *, budget: float = PREVIEW_BUDGET) -> PlanPreview:
    """:func:`~ttcompress.compression.dryrun.preview_plan` of the sharded model at ``source`` (a
    directory :func:`~ttcompress.compression.blockwise.is_blockwise_dir` accepts), one block in memory
    at a time: what :func:`~ttcompress.compression.blockwise.compress_sharded` would do without
    calibration data.

    Raises
    ------
    CheckpointError
        As for :func:`~ttcompress.compression.blockwise.compress_sharded`.
    ValueError
        The plan does not fit the model (a pattern matching no layer, an unreachable target ratio).
    """
    plan = as_plan(plan)
    previews, parts = _by_part(source, plan, lambda shell, _total, decided: preview_plan(
        shell, plan, budget=budget, patterns_checked=True, decided=decided))
    layers = _in_model_order([lp for p in previews for lp in p.layers], lambda lp: lp.decision.name, parts.probe)
    before = count_params(parts.probe)
    saved = sum(p.params_before - p.params_after for p in previews)
    return PlanPreview(layers, before, before - saved)


def inspect_sharded(source: str | Path, plan: Plan | None = None) -> ModelSummary:
    """:func:`~ttcompress.compression.summary.summarize` of the sharded model at ``source`` (see
    :func:`preview_sharded`), one block in memory at a time; its kind is ``hf_dir``."""
    plan = as_plan(plan)
    summaries, parts = _by_part(source, plan, lambda shell, total, decided: summarize(
        shell, plan=plan, kind="hf_dir", total=total, decided=decided))
    rows = _in_model_order([r for s in summaries for r in s.layers], lambda r: r.name, parts.probe)
    total = count_params(parts.probe)
    return ModelSummary("hf_dir", hf_arch(parts.probe), total, sum(s.other_params for s in summaries), rows,
                        False, {})
