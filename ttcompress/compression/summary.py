"""Describe a model for ``ttcompress inspect``: :func:`summarize` / :func:`inspect_file`.

Every compressible and compressed layer with its parameter share; dense layers say what the plan
would do with them (the same one-pass decisions :func:`ttcompress.compression.pipeline.run_compress`
takes), compressed ones their format, modes and ranks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ttcompress.checkpoint.io import load_checkpoint
from ttcompress.checkpoint.meta import read_meta
from ttcompress.compression.plan import LayerDecision, Plan
from ttcompress.compression.surgery import as_plan
from ttcompress.compression.surgery_checks import check_finite_parameters, guarded_plan
from ttcompress.formats import DENSE, format_of, get_format, layer_classes
from ttcompress.formats.structure import preview_preparation
from ttcompress.layer_report import LayerReport, count_params

__all__ = ["ModelSummary", "inspect_file", "summarize"]


@dataclass(frozen=True)
class ModelSummary:
    """A model's layers, parameter shares, and (for a compressed one) its plan and ranks."""

    kind: str
    arch: dict[str, Any] | None
    total_params: int
    other_params: int
    layers: tuple[LayerReport, ...]
    compressed: bool
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "total_params": self.total_params,
                "other_params": self.other_params, "compressed": self.compressed,
                "layers": [x.to_dict() for x in self.layers], "info": self.info}


def summarize(model: nn.Module, *, plan: Plan | None = None, kind: str = "model", total: int | None = None,
              decided: Mapping[str, LayerDecision] | None = None) -> ModelSummary:
    """Describe ``model``: every compressible and compressed layer with its parameter share.

    Dense layers say whether ``plan`` (default ``Plan()``) would compress them, with what the
    plan's format would build (the format's ``suggest``); compressed layers show their format,
    modes and ranks (the format's ``describe``).

    ``total``: the parameters of the larger model that ``model`` is a part of (one transformer
    block): shares are of this many, the plan's patterns are not checked against ``model`` (the
    caller checked them on the whole model), and ``decided`` holds the whole model's decisions
    under a target ratio (:func:`~ttcompress.compression.surgery_checks.guarded_plan`). The
    summary's ``total_params`` is then ``total`` and its ``other_params`` are ``model``'s own.
    """
    plan = as_plan(plan)
    meta = read_meta(model)
    own = count_params(model)
    part = total is not None
    total = own if total is None else total
    rows: list[LayerReport] = []
    counted: dict[int, int] = {}  # id -> elements of the parameters in some row: a tied one counts once
    owner: dict[int, str] = {}  # id -> the first row holding that parameter
    done = layer_classes()
    # what decompose would see: attention split into projections, Conv1D as Linear, tied layers dense
    if plan.target_ratio is not None and decided is None:  # allocating ranks needs every layer's spectrum
        check_finite_parameters(model)
    prep = preview_preparation(model)
    decisions = {d.name: d for d in guarded_plan(prep, plan, patterns_checked=part, decided=decided)}
    for name, m in prep.model.named_modules():
        if isinstance(m, done):
            row = _compressed_row(name, m, meta.layers.get(name), total)
        elif name in decisions:
            row = _dense_row(decisions[name], m, plan, total)
        else:
            continue
        params = list(m.parameters())
        if params and all(id(p) in owner for p in params):  # tied: every parameter is counted already
            row = dataclasses.replace(row, share=0.0, tied_to=owner[id(params[0])])
        rows.append(row)
        counted.update((id(p), p.numel()) for p in params)
        for p in params:
            owner.setdefault(id(p), name)
    info = {k: v for k, v in meta.info.items() if k != "history"}
    arch = None if meta.arch is None else meta.arch.to_dict()
    return ModelSummary(kind, arch, total, own - sum(counted.values()), tuple(rows), bool(meta.layers), info)


def _compressed_row(name: str, layer: nn.Module, record: LayerReport | None, total: int) -> LayerReport:
    """A factorized layer: its recorded facts (params before, error, config) and its structure now."""
    desc = format_of(layer).describe(layer)  # type: ignore[union-attr]  # an instance of a registered class
    params = count_params(layer)
    return dataclasses.replace(
        record or LayerReport(name, desc.format), name=name, format=desc.format, type=type(layer).__name__,
        shape=desc.shape, in_modes=desc.in_modes, out_modes=desc.out_modes, ranks=desc.ranks, detail=desc.text,
        params=params, share=params / total if total else 0.0, compressible=False, skipped="already compressed")


def _dense_row(d: LayerDecision, module: nn.Module, plan: Plan, total: int) -> LayerReport:
    """A dense layer: whether the plan would compress it, and into what."""
    params = count_params(module)
    fmt_name = d.format if d.format != DENSE else plan.format_for(module, plan.merged_rule(d.name))
    suggestion = None
    if d.options and fmt_name not in (None, DENSE):
        suggestion = get_format(fmt_name).suggest(d)
    return LayerReport(d.name, DENSE, d.type, d.shape, in_modes=d.options.get("in_modes"),
                       out_modes=d.options.get("out_modes"), skipped=d.skipped, params=params,
                       share=params / total if total else 0.0, compressible=d.skipped is None, suggestion=suggestion)


def inspect_file(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    plan: Plan | None = None,
) -> ModelSummary:
    """Load a model file (any accepted form; options as for :func:`ttcompress.checkpoint.io.load`) and :func:`summarize` it."""
    loaded = load_checkpoint(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    return summarize(loaded.model, plan=plan, kind=loaded.kind)

