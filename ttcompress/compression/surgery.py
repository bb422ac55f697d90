"""Build the replacements a plan decides and swap them into the model: the in-memory surgery.

:func:`prepare_and_build` puts the structure the formats need in place (:func:`prepare_model`),
takes the plan's decisions for the prepared model in one pass (:func:`guarded_plan`) and builds
every replacement: data-free (spread over processes under torchrun) or fitted one after the other
on calibration statistics (:func:`build_calibrated`). :func:`swap_in` then swaps the layers worth
it into the model and returns one :class:`~ttcompress.layer_report.LayerReport` per decision.

The pipeline around it (calibration inputs, forward check, metadata, the file job) is
:func:`ttcompress.compression.pipeline.run_compress`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.collector import StatsCollector, rank_hint
from ttcompress.calibration.fit import FitResult
from ttcompress.calibration.sequential import calibrate_sequentially
from ttcompress.calibration.stats import LayerStats
from ttcompress.formats import DENSE, format_of, get_format
from ttcompress.formats.base import BuildResult
from ttcompress.layer_report import LayerReport, count_params, format_label
from ttcompress.memory import RELEASE_AFTER_VALUES, release_freed
from ttcompress.modtree import get_submodule, set_submodule
from ttcompress.formats.structure import Preparation, prepare_model
from ttcompress.compression.plan import LayerDecision, Plan, compressible_layers
from ttcompress.compression.scaleout import build_all
from ttcompress.compression.surgery_checks import Swapped, guarded_plan

__all__ = [
    "Built",
    "FilterFn",
    "ProgressFn",
    "as_plan",
    "build_calibrated",
    "build_replacement",
    "keep_dense_reason",
    "prepare_and_build",
    "swap_in",
]

#: ``progress(done, total, name)``: called before each layer is decomposed (``done`` layers are
#: finished, ``name`` is the next one) and once at the end with ``done == total`` and ``name == ""``.
ProgressFn = Callable[[int, int, str], None]
FilterFn = Callable[[nn.Module, str], bool]


# --------------------------------------------------------------------------------------------------
# Module surgery
# --------------------------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device | None:
    weight = getattr(module, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else None


def build_replacement(module: nn.Module, decision: LayerDecision, *, calib: Any = None,
                      device: torch.device | None = None) -> BuildResult:
    """Decompose ``module`` as ``decision`` says, with the decision's registered format: its build result.

    ``calib`` (optional calibration statistics) is passed to the format's ``build``. With
    ``device``, a copy of the layer is decomposed there (only this layer is moved) and the new
    layer is moved back to where ``module``'s weight lives.
    """
    if decision.format == DENSE:
        raise ValueError(f"layer {decision.name!r}: nothing to build for format {decision.format!r}")
    for what in ("weight", "bias"):  # name the layer (a decomposition alone cannot); a NaN bias would pass
        tensor = getattr(module, what, None)
        if isinstance(tensor, torch.Tensor) and not bool(tensor.isfinite().all()):
            raise ValueError(f"layer {decision.name!r} has NaN or Inf {what} values; cannot decompose it")
    weight = getattr(module, "weight", None)
    source = _on_device(module, device)
    new = get_format(decision.format).build(source, decision.options, calib=calib, name=decision.name)
    del source  # the device copy of the dense layer: freed before the next layer moves there
    if weight is not None:
        new = dataclasses.replace(new, layer=new.layer.to(device=weight.device))
    return new


def _on_device(module: nn.Module, device: torch.device | None) -> nn.Module:
    """``module`` itself when it already lives on ``device`` (or ``device`` is None), else a copy there."""
    here = _device_of(module)
    if device is None or here is None or here == device:
        return module
    return copy.deepcopy(module).to(device)


def as_plan(plan: Plan | Mapping[str, Any] | None) -> Plan:
    """``plan`` as a :class:`Plan` (None: ``Plan()``; a dict: :meth:`Plan.from_dict`)."""
    if plan is None:
        return Plan()
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    raise TypeError(f"plan must be a Plan, a dict or None, got {type(plan).__name__}")


def prepare_and_build(
    model: nn.Module, plan: Plan, filter_fn: FilterFn | None, progress: ProgressFn | None,
    collector: StatsCollector | None, device: torch.device | None = None, total: int | None = None, *,
    part: bool = False, decided: Mapping[str, LayerDecision] | None = None,
) -> tuple[Preparation, list[LayerDecision], Built]:
    """:func:`prepare_model`, then :func:`_plan_and_build`; the preparation is undone if that fails.

    ``part``: ``model`` is a part of the model the plan is for (its patterns are not checked against
    it); ``decided``: decisions taken for that model, by layer name (:func:`guarded_plan`)."""
    prep = prepare_model(model)
    try:
        decisions, built = _plan_and_build(prep, plan, filter_fn, progress, collector, device, total,
                                           part=part, decided=decided)
    except BaseException:
        prep.undo()
        raise
    return prep, decisions, built


#: A layer's build result and its decomposition time, or why the layer stays dense (calibration never reached it).
Built = dict[str, "tuple[BuildResult, float] | str"]


def _plan_and_build(
    prep: Preparation, plan: Plan, filter_fn: FilterFn | None, progress: ProgressFn | None,
    collector: StatsCollector | None = None, device: torch.device | None = None, total: int | None = None, *,
    part: bool = False, decided: Mapping[str, LayerDecision] | None = None,
) -> tuple[list[LayerDecision], Built]:
    """The plan's decisions for the prepared model, and the replacement of every layer it compresses
    (name -> (layer, seconds), or name -> reason it stays dense); nothing is swapped in yet.

    With calibration data (``collector``), a ``target_ratio`` plan allocates ranks by the output
    error the data measure, and the layers are fitted one after the other in forward order."""
    sensitivity = None
    if collector is not None and plan.target_ratio is not None and decided is None:
        names = [n for n, m, _a in compressible_layers(prep.model) if isinstance(m, (nn.Linear, nn.Conv2d))]
        sensitivity = collector.input_stats(prep.model, names)[0]
    decisions = guarded_plan(prep, plan, sensitivity, patterns_checked=part, decided=decided)
    del sensitivity  # every layer's input statistics: not held while the layers are fitted (issue 25)
    if filter_fn is not None:
        decisions = [
            LayerDecision(d.name, d.type, d.shape, DENSE, {}, d.params_before, d.params_before,
                          "filtered out by filter_fn", d.aliases)
            if d.skipped is None and not filter_fn(get_submodule(prep.model, d.name), d.name) else d
            for d in decisions
        ]
    todo = [d for d in decisions if d.skipped is None]
    if collector is None:  # under torchrun each process decomposes its share of the layers (ttcompress.compression.scaleout)
        built: Built = dict(build_all(todo, lambda d: build_replacement(get_submodule(prep.model, d.name), d,
                                                                         device=device),
                                      device_of=lambda d: _device_of(get_submodule(prep.model, d.name)),
                                      progress=progress))
    else:  # sequential: each layer's statistics depend on the layers before it
        built = build_calibrated(prep.model, todo, collector, plan, progress, device, total)
        if progress is not None:
            progress(len(todo), len(todo), "")
    return decisions, built


def swap_in(
    prep: Preparation, decisions: list[LayerDecision], built: Built, plan: Plan, total: int
) -> tuple[list[LayerReport], dict[str, LayerReport], Swapped]:
    """Swap the built layers that are worth it into ``prep.model`` (under every alias); return one
    record per decision, the metadata records by name, and the dense layers replaced (name ->
    (layer, aliases))."""
    records: list[LayerReport] = []
    meta_layers: dict[str, LayerReport] = {}
    swapped: Swapped = {}
    root = prep.model
    slack = target_slack(plan, total, [d for d in decisions if d.skipped is None])
    for d in decisions:
        entry = built.get(d.name)
        if not isinstance(entry, tuple):
            records.append(_dense_record(d, entry if isinstance(entry, str) else d.skipped))
            continue
        result, seconds = entry
        record, meta = _record(d, result, seconds, plan, total, slack)
        records.append(record)
        if meta is None:
            continue
        swapped[d.name] = (get_submodule(root, d.name), d.aliases)
        for name in (d.name, *d.aliases):
            root = set_submodule(root, name, result.layer)
            meta_layers[name] = meta
    prep.model = root
    return records, meta_layers, swapped


def _dense_record(d: LayerDecision, skipped: str | None, **measured: Any) -> LayerReport:
    return LayerReport(d.name, DENSE, d.type, d.shape, d.params_before, d.params_before, skipped=skipped,
                       aliases=d.aliases, **measured)


def build_calibrated(model: nn.Module, todo: list[LayerDecision], collector: StatsCollector, plan: Plan,
                     progress: ProgressFn | None, device: torch.device | None = None,
                     total: int | None = None) -> dict[str, tuple[BuildResult, float] | str]:
    """Build every layer of ``todo`` fitted on sequential calibration statistics.

    The layers are replaced one by one in forward order on a copy of ``model``
    (:func:`ttcompress.calibration.sequential.calibrate_sequentially`): each is decomposed by its
    format and fitted (``build(..., calib=stats)``) on the inputs that the copy, whose earlier
    layers are already compressed, feeds it, against the dense outputs of ``model`` (which is
    not modified). A layer kept dense (:func:`keep_dense_reason`) stays dense in the copy too, so
    the next layers see its exact outputs. Returns ``name -> (build result, seconds)``, or ``name ->
    reason`` for layers the calibration data never reach. Layers that are not ``nn.Linear`` /
    ``nn.Conv2d`` (attention modules, embeddings) are built data-free, and so are layers whose
    statistics do not fit the collector's memory budget (with a note). Memory: a copy of the model's
    modules (sharing its parameters), the calibration inputs and one layer's statistics at a time.
    """
    # the copy's modules are new, their parameters and buffers those of ``model``: layers are only swapped
    # in the copy, never written to, and a 7B layer's weights are not held twice
    work = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})
    fitted = [d for d in todo if isinstance(get_submodule(model, d.name), (nn.Linear, nn.Conv2d))]
    by_name = {d.name: d for d in fitted}
    total = count_params(model) if total is None else total
    layers: dict[str, BuildResult] = {}

    slack = target_slack(plan, total, todo)

    def build(name: str, dense: nn.Module, stats: LayerStats | None) -> nn.Module | FitResult:
        new = build_replacement(dense, by_name[name], calib=stats, device=device)
        layers[name] = new
        if dense.weight.numel() >= RELEASE_AFTER_VALUES:
            release_freed()  # the fit's temporaries, before the next layer's statistics
        if keep_dense_reason(by_name[name], new, plan, total, slack) is not None:
            return FitResult(copy.deepcopy(dense), 0.0, 0.0, "none")
        return new.fit if new.fit is not None else new.layer

    def step(name: str, index: int, count: int) -> None:
        if progress is not None:
            progress(index, count, name)

    hints = {d.name: rank_hint(d.options) for d in fitted}
    done = calibrate_sequentially(model, work, list(by_name), build, None, progress=step, collector=collector,
                                  rank_hints=hints)
    out: dict[str, tuple[BuildResult, float] | str] = {}
    for name, cal in done.items():
        if cal.statistics is not None:  # how the statistics were kept (sketched, or none within the budget)
            layers[name] = dataclasses.replace(
                layers[name], note="; ".join(x for x in (layers[name].note, cal.statistics) if x))
        out[name] = (layers[name], cal.seconds) if cal.reached else "not reached by the calibration data"
    for d in todo:  # layers without calibration statistics (attention, embeddings): data-free
        if d.name not in by_name:
            start = time.perf_counter()
            out[d.name] = (build_replacement(get_submodule(model, d.name), d, device=device),
                           time.perf_counter() - start)
    return out


def target_slack(plan: Plan, total: int, todo: list[LayerDecision]) -> list[int] | None:
    """The parameters a ``target_ratio`` plan still allows above its planned layers (a one-item
    list, spent by :func:`keep_dense_reason`); None without a target."""
    if plan.target_ratio is None:
        return None
    planned = total - sum(d.params_before - (d.params_after if d.params_after is not None else d.params_before)
                          for d in todo)
    return [int(total / plan.target_ratio) - planned]


def keep_dense_reason(d: LayerDecision, built: BuildResult, plan: Plan, total: int,
                      slack: list[int] | None = None) -> str | None:
    """Why the built layer should not replace the dense layer of decision ``d``, or None.

    It does not shrink the layer; or it saves fewer than ``plan.min_saving * total`` parameters
    while its error is above ``plan.max_error`` (the relative output error on calibration data
    after fitting when there is one, else the relative weight error): a small saving is not
    worth a large error (e.g. a 128 -> 10 classifier). Under a target ratio (``slack``, see
    :func:`target_slack`) the second rule keeps a layer dense only while the model still meets the
    target, and spends the slack: before, a GPT-2 asked for 5x came out at 4.25x, its four
    attention projections kept dense after their fits.
    """
    after = count_params(built.layer)
    fmt = format_of(built.layer)
    label = format_label(fmt.name) if fmt is not None else type(built.layer).__name__
    if after >= d.params_before:
        return f"would not shrink ({label} needs {after} >= {d.params_before} params)"
    fit = built.fit
    error = fit.error_after if fit is not None else built.error
    saved = d.params_before - after
    floor = plan.saving_floor(fit is not None)
    if error is not None and saved < floor * total and float(error) > plan.max_error:
        if slack is not None:
            if saved > slack[0]:
                return None
            slack[0] -= saved
        kind = "output" if fit is not None else "weight"
        return (f"kept dense: {label} saves only {saved:,} params ({saved / total:.2%} of the model) at "
                f"{kind} error {float(error):.2f} (min_saving {floor:g}, max_error {plan.max_error:g})")
    return None


def _record(d: LayerDecision, built: BuildResult, seconds: float, plan: Plan,
            total: int, slack: list[int] | None = None) -> tuple[LayerReport, LayerReport | None]:
    """The record of a built layer, and the same record for the metadata (None: it stays dense, see
    :func:`keep_dense_reason`)."""
    new = built.layer
    after = count_params(new)
    rel_error = built.error
    fmt = format_of(new)
    if fmt is None:
        raise TypeError(f"layer {d.name!r}: format {d.format!r} built a {type(new).__name__}, which no format owns")
    note = built.note
    fit = built.fit
    errors = {} if fit is None else {"out_error_before": float(fit.error_before),
                                     "out_error_after": float(fit.error_after), "fit_method": fit.method}
    reason = keep_dense_reason(d, built, plan, total, slack)
    if reason is not None:
        return _dense_record(d, reason, rel_error=rel_error, seconds=seconds, note=note, **errors), None
    try:  # stored as JSON in checkpoints: keep the in-memory record identical to a reloaded one
        config = json.loads(json.dumps(new.config()))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"layer {d.name!r}: config() is not JSON-serializable: {exc}") from None
    desc = fmt.describe(new)
    record = LayerReport(d.name, fmt.name, d.type, d.shape, d.params_before, after, in_modes=desc.in_modes,
                         out_modes=desc.out_modes, ranks=desc.ranks, rel_error=rel_error, seconds=seconds,
                         aliases=d.aliases, detail=desc.text, note=note, config=config, **errors)
    return record, record


