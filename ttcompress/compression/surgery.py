"""Apply a :class:`~ttcompress.compression.plan.Plan` to a model: find targets, build replacements, swap them.

The entry point is :func:`compress` (in place, like torchao's ``quantize_``)::

    model = compress(model, Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=8)))

:func:`compress_with_report` does the same and also returns one :class:`~ttcompress.layer_report.LayerReport` per
Linear/Conv2d (the data behind ``ttcompress decompose``'s table). :func:`decompose_file` is the
whole ``decompose`` command as a function: load → compress → save atomically.
:func:`summarize` / :func:`inspect_file` describe a model for ``ttcompress inspect``.

Every layer is reported as a :class:`~ttcompress.layer_report.LayerReport`; every replaced one is
also kept in the model's metadata (:class:`~ttcompress.checkpoint.meta.ModelMeta`), whose checkpoint record
``{"format", "config", "rel_error", "seconds", "params_before", "params_after"}`` is what
:func:`ttcompress.checkpoint.io.save` needs to rebuild the model later.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.budget import check_calib_memory
from ttcompress.calibration.collector import StatsCollector, rank_hint
from ttcompress.calibration.data import named_calibration
from ttcompress.calibration.fit import FitResult
from ttcompress.calibration.sequential import calibrate_sequentially
from ttcompress.calibration.stats import LayerStats
from ttcompress.report.evaluation import resolve_device
from ttcompress.formats import DENSE, format_of, get_format, layer_classes
from ttcompress.formats.base import build_note, set_build_note
from ttcompress.layer_report import KEPT_DENSE_INFO, LayerReport, count_params, format_label, kept_dense
from ttcompress.fsutil import check_not_inputs, strip_model_suffix
from ttcompress.errors import UserInputError
from ttcompress.checkpoint.io import load_checkpoint, save
from ttcompress.checkpoint.meta import copy_meta, read_meta, update_meta
from ttcompress.modtree import get_submodule, set_submodule
from ttcompress.formats.fitting import calibration_fit
from ttcompress.formats.structure import Preparation, prepare_model, preview_preparation
from ttcompress.compression.plan import LayerDecision, Plan, compressible_layers, plan_layers
from ttcompress.compression.scaleout import build_all, process_group
from ttcompress.compression.surgery_checks import (
    default_check_input,
    guarded_plan,
    Swapped,
    calibration_batches,
    check_finite_parameters,
    finish_checked,
    guard_decisions,
    reference_output,
)
from ttcompress.checkpoint.teacher import source_record

__all__ = [
    "CompressionResult",
    "DecomposeResult",
    "ModelSummary",
    "build_replacement",
    "compress",
    "compress_with_report",
    "decompose_file",
    "default_output_path",
    "inspect_file",
    "keep_dense_reason",
    "summarize",
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
                      device: torch.device | None = None) -> nn.Module:
    """Decompose ``module`` as ``decision`` says, with the decision's registered format.

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
        new = new.to(device=weight.device)
    return new


def _on_device(module: nn.Module, device: torch.device | None) -> nn.Module:
    """``module`` itself when it already lives on ``device`` (or ``device`` is None), else a copy there."""
    here = _device_of(module)
    if device is None or here is None or here == device:
        return module
    return copy.deepcopy(module).to(device)


def _target_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` resolved (``auto``: CUDA when present); None stays None (each layer where it lives).

    Under torchrun (``WORLD_SIZE > 1``) ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``: each process
    decomposes its share of the layers on its own GPU.
    """
    if device is None:
        return None
    resolved = resolve_device(device)
    if (resolved.type == "cuda" and resolved.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return resolved


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress_with_report` did: the model, per-layer records and whole-model totals."""

    model: nn.Module
    records: tuple[LayerReport, ...]
    params_before: int
    params_after: int
    plan: Plan
    #: Relative Frobenius difference of the compressed model's output from the dense one on
    #: ``check_input`` (None when no check input was given).
    output_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def compressed(self) -> tuple[LayerReport, ...]:
        return tuple(r for r in self.records if r.format != DENSE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "output_error": self.output_error,
            "layers": [r.to_dict() for r in self.records],
            "plan": self.plan.to_dict(),
        }


def _as_plan(plan: Plan | Mapping[str, Any] | None) -> Plan:
    if plan is None:
        return Plan()
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    raise TypeError(f"plan must be a Plan, a dict or None, got {type(plan).__name__}")


def compress_with_report(
    model: nn.Module,
    plan: Plan | Mapping[str, Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: ProgressFn | None = None,
    calib_data: Any = None,
    calib_samples: int | None = None,
    check_input: Any = None,
    device: str | torch.device | None = None,
    calib_memory: int | str | None = None,
    total_params: int | None = None,
) -> CompressionResult:
    """Compress ``model`` in place per ``plan`` and report every compressible layer.

    Parameters
    ----------
    model : nn.Module
        Modified in place (its Linear/Conv2d/Embedding children are replaced). If the root itself is
        a compressible layer, the result's ``model`` is the new root.
    plan : Plan or dict, optional
        What to compress and how (default ``Plan()``: TT max rank 8 for Linear and Embedding, CP
        at 4x for Conv2d).
    filter_fn : callable, optional
        ``filter_fn(module, qualified_name) -> bool``; layers for which it is False stay dense.
    progress : callable, optional
        ``progress(done, total, name)``, see :data:`ProgressFn`.
    calib_data : optional
        Calibration inputs: a tensor (first dimension the batch), an iterable of tensors or of
        ``(input, target)`` pairs (targets are ignored), a ``DataLoader`` or a map-style
        ``Dataset`` (:func:`ttcompress.calibration.data.calib_batches`). When given, every layer
        is fitted to the dense layer's outputs on these inputs, sequentially
        (:func:`_build_calibrated`), and under ``plan.target_ratio`` ranks are allocated by the
        measured output error (:func:`ttcompress.compression.allocate.input_grams`). Any input shape the
        model accepts works (e.g. ``(batch, seq, features)``).
    calib_samples : int, optional
        Use at most this many samples of ``calib_data``.
    calib_memory : int or str, optional
        Memory budget of one layer's calibration statistics, in bytes or as a size such as
        ``"4G"`` (default: a quarter of the available memory;
        :mod:`ttcompress.calibration.budget`). Wide layers are sketched to fit it, and a layer
        whose smallest sketch does not fit is fitted data-free; the layer's note says which.
    check_input : tensor, tuple of tensors or dict, optional
        An input of the model (positional arguments as a tuple, keyword arguments as a dict).
        The dense model runs on it first (it must run), and the compressed one at the end, in eval
        mode without gradients: a layer in whose forward (or whose parent's forward) the
        compressed model fails is put back to dense, with the error as its reason, until the
        model runs. The result's ``output_error`` compares the two outputs.
    device : str or torch.device, optional
        Where the decompositions (CP-ALS, Tucker-2, TT-SVD, SVD) and their calibration fits run:
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` (CUDA when present). Only the
        layer in flight is moved there; each new layer is moved back to where the model lives.
        Default: each layer where it lives. A device that is not available is a
        :class:`~ttcompress.errors.UserInputError`.
    total_params : int, optional
        The parameters of the whole model that ``model`` is a part of (one transformer block
        compressed at a time, :mod:`ttcompress.compression.blockwise`): ``plan.min_saving`` is a
        share of this many. Default: ``model``'s own.

    Returns
    -------
    CompressionResult

    Notes
    -----
    All replacements are built before any is swapped in, so a failing decomposition leaves the
    model unchanged (with calibration data they are fitted on a copy of the model). A layer
    whose decomposition would not be smaller than the dense layer, or that saves less than
    ``plan.min_saving`` of the model's parameters at an error above ``plan.max_error`` (by
    default only with calibration data, see :class:`~ttcompress.compression.plan.Plan`), stays dense
    (:func:`keep_dense_reason`).

    Before planning, structure the formats need is put in place, exactly (:func:`prepare_model`):
    every ``nn.MultiheadAttention`` becomes a
    :class:`~ttcompress.layers.attention.FactorizedMultiheadAttention` whose projections ``q``,
    ``k``, ``v``, ``out`` are layers of their own, and GPT-2's ``Conv1D`` layers become
    ``nn.Linear``. Layers a parent reads directly (the ``out_proj`` of an attention module that
    cannot be converted) and layers whose weight is tied to another module's parameter stay dense
    with the reason. After the swap, attention modules none of whose projections changed are put
    back (unless their encoder layer's feed-forward part changed), and ``nn.TransformerEncoder``
    nested-tensor fast paths that read changed weights are turned off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = _as_plan(plan)
    target = _target_device(device)
    check_finite_parameters(model)  # before allocation, calibration and every decomposition
    memory = None if calib_memory is None else check_calib_memory(calib_memory)
    batches = calibration_batches(model, calib_data, calib_samples)
    collector = None if batches is None else StatsCollector(batches, memory=memory)
    before = count_params(model)
    total = before if total_params is None else int(total_params)
    reference = None if check_input is None else reference_output(model, check_input)
    prep, decisions, built = _prepare_and_build(model, plan, filter_fn, progress, collector, target, total)
    records, meta_layers, swapped = _swap_in(prep, decisions, built, plan, total)
    root, records, error = finish_checked(
        prep, swapped, records, meta_layers, check_input=check_input, reference=reference
    )
    if root is not model and not hasattr(root, "ttcompress_meta"):
        copy_meta(model, root)
    dense = kept_dense(records)  # recorded only when some layer stayed dense
    update_meta(root, layers={**prep.layer_records(root), **meta_layers}, info={KEPT_DENSE_INFO: dense} if dense else {})
    return CompressionResult(root, tuple(records), before, count_params(root), plan, error)


def _prepare_and_build(
    model: nn.Module, plan: Plan, filter_fn: FilterFn | None, progress: ProgressFn | None,
    collector: StatsCollector | None, device: torch.device | None = None, total: int | None = None,
) -> tuple[Preparation, list[LayerDecision], Built]:
    """:func:`prepare_model`, then :func:`_plan_and_build`; the preparation is undone if that fails."""
    prep = prepare_model(model)
    try:
        decisions, built = _plan_and_build(prep, plan, filter_fn, progress, collector, device, total)
    except BaseException:
        prep.undo()
        raise
    return prep, decisions, built


#: A built layer and its decomposition time, or why the layer stays dense (calibration never reached it).
Built = dict[str, "tuple[nn.Module, float] | str"]


def _plan_and_build(
    prep: Preparation, plan: Plan, filter_fn: FilterFn | None, progress: ProgressFn | None,
    collector: StatsCollector | None = None, device: torch.device | None = None, total: int | None = None,
) -> tuple[list[LayerDecision], Built]:
    """The plan's decisions for the prepared model, and the replacement of every layer it compresses
    (name -> (layer, seconds), or name -> reason it stays dense); nothing is swapped in yet.

    With calibration data (``collector``), a ``target_ratio`` plan allocates ranks by the output
    error the data measure, and the layers are fitted one after the other in forward order."""
    sensitivity = None
    if collector is not None and plan.target_ratio is not None:
        names = [n for n, m, _a in compressible_layers(prep.model) if isinstance(m, (nn.Linear, nn.Conv2d))]
        sensitivity = collector.input_stats(prep.model, names)[0]
    decisions = guarded_plan(prep, plan, sensitivity)
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
        built = _build_calibrated(prep.model, todo, collector, plan, progress, device, total)
        if progress is not None:
            progress(len(todo), len(todo), "")
    return decisions, built


def _swap_in(
    prep: Preparation, decisions: list[LayerDecision], built: Built, plan: Plan, total: int
) -> tuple[list[LayerReport], dict[str, LayerReport], Swapped]:
    """Swap the built layers that are worth it into ``prep.model`` (under every alias); return one
    record per decision, the metadata records by name, and the dense layers replaced (name ->
    (layer, aliases))."""
    records: list[LayerReport] = []
    meta_layers: dict[str, LayerReport] = {}
    swapped: Swapped = {}
    root = prep.model
    for d in decisions:
        entry = built.get(d.name)
        if not isinstance(entry, tuple):
            records.append(_dense_record(d, entry if isinstance(entry, str) else d.skipped))
            continue
        new, seconds = entry
        record, meta = _record(d, new, seconds, plan, total)
        records.append(record)
        if meta is None:
            continue
        swapped[d.name] = (get_submodule(root, d.name), d.aliases)
        for name in (d.name, *d.aliases):
            root = set_submodule(root, name, new)
            meta_layers[name] = meta
    prep.model = root
    return records, meta_layers, swapped


def _dense_record(d: LayerDecision, skipped: str | None, **measured: Any) -> LayerReport:
    return LayerReport(d.name, DENSE, d.type, d.shape, d.params_before, d.params_before, skipped=skipped,
                       aliases=d.aliases, **measured)


def _build_calibrated(model: nn.Module, todo: list[LayerDecision], collector: StatsCollector, plan: Plan,
                      progress: ProgressFn | None, device: torch.device | None = None,
                      total: int | None = None) -> dict[str, tuple[nn.Module, float] | str]:
    """Build every layer of ``todo`` fitted on sequential calibration statistics.

    The layers are replaced one by one in forward order on a copy of ``model``
    (:func:`ttcompress.calibration.sequential.calibrate_sequentially`): each is decomposed by its
    format and fitted (``build(..., calib=stats)``) on the inputs that the copy, whose earlier
    layers are already compressed, feeds it, against the dense outputs of ``model`` (which is
    not modified). A layer kept dense (:func:`keep_dense_reason`) stays dense in the copy too, so
    the next layers see its exact outputs. Returns ``name -> (layer, seconds)``, or ``name ->
    reason`` for layers the calibration data never reach. Layers that are not ``nn.Linear`` /
    ``nn.Conv2d`` (attention modules, embeddings) are built data-free, and so are layers whose
    statistics do not fit the collector's memory budget (with a note). Memory: the copy of the model,
    the calibration inputs and one layer's statistics at a time.
    """
    work = copy.deepcopy(model)
    fitted = [d for d in todo if isinstance(get_submodule(model, d.name), (nn.Linear, nn.Conv2d))]
    by_name = {d.name: d for d in fitted}
    total = count_params(model) if total is None else total
    layers: dict[str, nn.Module] = {}

    def build(name: str, dense: nn.Module, stats: LayerStats | None) -> nn.Module | FitResult:
        new = build_replacement(dense, by_name[name], calib=stats, device=device)
        layers[name] = new
        note = collector.choose(dense, rank=hints[name]).note
        if note is not None:
            set_build_note(new, "; ".join(x for x in (build_note(new), note) if x))
        if keep_dense_reason(by_name[name], new, plan, total) is not None:
            return FitResult(copy.deepcopy(dense), 0.0, 0.0, "none")
        fit = calibration_fit(new)
        return fit if fit is not None else new

    def step(name: str, index: int, count: int) -> None:
        if progress is not None:
            progress(index, count, name)

    hints = {d.name: rank_hint(d.options) for d in fitted}
    done = calibrate_sequentially(model, work, list(by_name), build, None, progress=step, collector=collector,
                                  rank_hints=hints)
    out: dict[str, tuple[nn.Module, float] | str] = {}
    for name, cal in done.items():
        out[name] = (layers[name], cal.seconds) if cal.reached else "not reached by the calibration data"
    for d in todo:  # layers without calibration statistics (attention, embeddings): data-free
        if d.name not in by_name:
            start = time.perf_counter()
            out[d.name] = (build_replacement(get_submodule(model, d.name), d, device=device),
                           time.perf_counter() - start)
    return out


def keep_dense_reason(d: LayerDecision, new: nn.Module, plan: Plan, total: int) -> str | None:
    """Why the built layer ``new`` should not replace the dense layer of decision ``d``, or None.

    It does not shrink the layer; or it saves fewer than ``plan.min_saving * total`` parameters
    while its error is above ``plan.max_error`` (the relative output error on calibration data
    after fitting when there is one, else the relative weight error): a small saving is not
    worth a large error (e.g. a 128 -> 10 classifier).
    """
    after = count_params(new)
    fmt = format_of(new)
    label = format_label(fmt.name) if fmt is not None else type(new).__name__
    if after >= d.params_before:
        return f"would not shrink ({label} needs {after} >= {d.params_before} params)"
    fit = calibration_fit(new)
    error = fit.error_after if fit is not None else getattr(new, "rel_error", None)
    saved = d.params_before - after
    floor = plan.saving_floor(fit is not None)
    if error is not None and saved < floor * total and float(error) > plan.max_error:
        kind = "output" if fit is not None else "weight"
        return (f"kept dense: {label} saves only {saved:,} params ({saved / total:.2%} of the model) at "
                f"{kind} error {float(error):.2f} (min_saving {floor:g}, max_error {plan.max_error:g})")
    return None


def _record(d: LayerDecision, new: nn.Module, seconds: float, plan: Plan,
            total: int) -> tuple[LayerReport, LayerReport | None]:
    """The record of a built layer, and the same record for the metadata (None: it stays dense, see
    :func:`keep_dense_reason`)."""
    after = count_params(new)
    rel_error = getattr(new, "rel_error", None)
    rel_error = None if rel_error is None else float(rel_error)
    fmt = format_of(new)
    if fmt is None:
        raise TypeError(f"layer {d.name!r}: format {d.format!r} built a {type(new).__name__}, which no format owns")
    note = build_note(new)
    fit = calibration_fit(new)
    errors = {} if fit is None else {"out_error_before": float(fit.error_before),
                                     "out_error_after": float(fit.error_after), "fit_method": fit.method}
    reason = keep_dense_reason(d, new, plan, total)
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


def compress(
    model: nn.Module,
    plan: Plan | Mapping[str, Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: ProgressFn | None = None,
    calib_data: Any = None,
    calib_samples: int | None = None,
    check_input: Any = None,
    device: str | torch.device | None = None,
    calib_memory: int | str | None = None,
) -> nn.Module:
    """Compress ``model`` in place per ``plan``; return it (see :func:`compress_with_report`).

    Examples
    --------
    >>> from ttcompress.compression.plan import Plan, TTSettings
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> model = compress(model, Plan(tt=TTSettings(ranks=2)))
    >>> sorted(model.ttcompress_meta["layers"])
    ['0']
    """
    return compress_with_report(model, plan, filter_fn=filter_fn, progress=progress, calib_data=calib_data,
                                calib_samples=calib_samples, check_input=check_input, device=device,
                                calib_memory=calib_memory).model


# --------------------------------------------------------------------------------------------------
# File-level operation (what `ttcompress decompose` runs)
# --------------------------------------------------------------------------------------------------
def default_output_path(input_path: str | os.PathLike[str]) -> Path:
    """``dir/model.pt`` → ``dir/model.tt.pt`` (any extension is replaced by ``.tt.pt``)."""
    p = Path(input_path)
    return p.with_name(strip_model_suffix(p.name) + ".tt.pt")


def nothing_compressed(result: CompressionResult) -> str:
    """Why a compression left every layer dense, in one line (the first reasons, and what would help).

    Layers the plan did not select (``--layers``/``--exclude``) are left out of the reasons.
    """
    unselected = ("not matched by layers", "excluded by pattern")
    selected = [r for r in result.records if not (r.skipped or "").startswith(unselected)]
    if not selected:
        return "nothing to compress: the plan selects no layer of this model (see `ttcompress inspect`)"
    reasons = [f"{r.name}: {r.skipped or r.note or 'kept dense'}" for r in selected[:3]]
    more = f"; ... (+{len(selected) - 3} more)" if len(selected) > 3 else ""
    return (f"nothing was compressed, every selected layer stays dense ({'; '.join(reasons)}{more}): lower the "
            "ranks or the error bound, or set a target ratio; nothing written")


@dataclass(frozen=True)
class DecomposeResult:
    """:func:`decompose_file`'s result: the compression report plus where it came from and went."""

    result: CompressionResult
    input: Path
    input_kind: str
    output: Path
    calibration: Mapping[str, Any] = field(default_factory=lambda: {"used": False})  # as recorded in the file

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "input_kind": self.input_kind, "output": str(self.output),
                "calibration": dict(self.calibration), **self.result.to_dict()}


def decompose_file(
    input_path: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    progress: ProgressFn | None = None,
    calib_data: Any = None,
    calib_samples: int | None = None,
    calib_info: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    calib_memory: int | str | None = None,
) -> DecomposeResult:
    """Load a model file, compress it per ``plan`` and save a ttcompress checkpoint atomically.

    Parameters
    ----------
    input_path : path
        Any input :func:`ttcompress.checkpoint.io.load` accepts.
    output : path, optional
        Default :func:`default_output_path` (``model.tt.pt`` next to ``model.pt``). Must differ
        from the input. Nothing is written if anything fails.
    plan, progress, calib_data, calib_samples, device, calib_memory
        As for :func:`compress_with_report`.
    arch, arch_kwargs, trust_pickle, trust_code
        As for :func:`ttcompress.checkpoint.io.load`.
    calib_info : mapping, optional
        How the calibration data were chosen (dataset, samples, seed), stored in the checkpoint
        info under ``"calibration"`` (with ``{"used": False}`` when there were none).

    Notes
    -----
    The checkpoint info records the source file: ``source`` (its name), ``source_path`` (absolute
    path) and ``source_sha256`` (content hash), which ``finetune`` uses to find the dense model as
    its default teacher (:func:`ttcompress.checkpoint.teacher.default_teacher`).
    """
    plan = _as_plan(plan)
    device = _target_device(device)  # an unavailable device fails before anything is loaded
    src = Path(input_path)
    dest = Path(output) if output is not None else default_output_path(src)
    check_not_inputs([dest], [src])
    loaded = load_checkpoint(src, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    with process_group() as rank:  # under torchrun: every rank decomposes a share, rank 0 writes
        # The forward check of the compressed model (a layer whose replacement breaks the model
        # stays dense), on an input the model is known to take, when one can be made.
        with named_calibration(calib_info):
            result = compress_with_report(loaded.model, plan, progress=progress, calib_data=calib_data,
                                          calib_samples=calib_samples, check_input=default_check_input(loaded.model),
                                          device=device, calib_memory=calib_memory)
        if not result.compressed:
            raise UserInputError(nothing_compressed(result))
        calibration = {"used": calib_data is not None, **dict(calib_info or {})}
        if rank == 0:
            info = {"plan": plan.to_dict(), "source": src.name, "calibration": calibration, **source_record(src)}
            save(result.model, dest, info=info)
    return DecomposeResult(result, src, loaded.kind, dest, calibration)


# --------------------------------------------------------------------------------------------------
# Description (what `ttcompress inspect` shows)
# --------------------------------------------------------------------------------------------------
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


def summarize(model: nn.Module, *, plan: Plan | None = None, kind: str = "model") -> ModelSummary:
    """Describe ``model``: every compressible and compressed layer with its parameter share.

    Dense layers say whether ``plan`` (default ``Plan()``) would compress them, with what the
    plan's format would build (the format's ``suggest``); compressed layers show their format,
    modes and ranks (the format's ``describe``).
    """
    plan = _as_plan(plan)
    meta = read_meta(model)
    total = count_params(model)
    rows: list[LayerReport] = []
    counted: dict[int, int] = {}  # id -> elements of the parameters in some row: a tied one counts once
    owner: dict[int, str] = {}  # id -> the first row holding that parameter
    done = layer_classes()
    # what decompose would see: attention split into projections, Conv1D as Linear, tied layers dense
    if plan.target_ratio is not None:  # allocating ranks needs every layer's spectrum
        check_finite_parameters(model)
    prep = preview_preparation(model)
    decisions = {d.name: d for d in guarded_plan(prep, plan)}
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
    return ModelSummary(kind, arch, total, total - sum(counted.values()), tuple(rows), bool(meta.layers), info)


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

