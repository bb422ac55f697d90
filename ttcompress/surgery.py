"""Apply a :class:`~ttcompress.plan.Plan` to a model: find targets, build replacements, swap them.

The entry point is :func:`compress` (in place, like torchao's ``quantize_``)::

    model = compress(model, Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=8)))

:func:`compress_with_report` does the same and also returns one :class:`LayerRecord` per
Linear/Conv2d (the data behind ``ttcompress decompose``'s table). :func:`decompose_file` is the
whole ``decompose`` command as a function: load → compress → save atomically.
:func:`summarize` / :func:`inspect_file` describe a model for ``ttcompress inspect``.

Every replaced layer is recorded in ``model.ttcompress_meta["layers"][name]`` as
``{"format", "config", "rel_error", "seconds", "params_before", "params_after"}``, which is what
:func:`ttcompress.io.save` needs to rebuild the model later.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.allocate import input_grams
from ttcompress.calibration.data import calib_batches
from ttcompress.calibration.fit import FitResult
from ttcompress.calibration.sequential import calibrate_sequentially
from ttcompress.calibration.stats import LayerStats
from ttcompress.formats import DENSE, format_of, get_format, layer_classes
from ttcompress.formats.base import build_note
from ttcompress.formats.fitting import calibration_fit
from ttcompress.io import get_meta, load_checkpoint, save, update_meta
from ttcompress.formats.structure import Preparation, finish_model, parent_reason, prepare_model
from ttcompress.plan import LayerDecision, Plan, compressible_layers, plan_layers
from ttcompress.scaleout import build_all, process_group
from ttcompress.teacher import source_record

__all__ = [
    "CompressionResult",
    "DecomposeResult",
    "LayerRecord",
    "LayerSummary",
    "ModelSummary",
    "build_replacement",
    "compress",
    "compress_with_report",
    "decompose_file",
    "default_output_path",
    "get_submodule",
    "inspect_file",
    "keep_dense_reason",
    "set_submodule",
    "summarize",
]

#: ``progress(done, total, name)``: called before each layer is decomposed (``done`` layers are
#: finished, ``name`` is the next one) and once at the end with ``done == total`` and ``name == ""``.
ProgressFn = Callable[[int, int, str], None]
FilterFn = Callable[[nn.Module, str], bool]


# --------------------------------------------------------------------------------------------------
# Module surgery
# --------------------------------------------------------------------------------------------------
def get_submodule(root: nn.Module, name: str) -> nn.Module:
    """The module at qualified ``name`` (``""`` is ``root``); ``AttributeError`` if absent."""
    module = root
    if name == "":
        return module
    for part in name.split("."):
        children = module._modules
        if part not in children or children[part] is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking up {name!r})")
        module = children[part]  # type: ignore[assignment]
    return module


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` and return the (possibly new) root.

    ``new`` takes the train/eval flag of the module it replaces. Replacing ``""`` returns ``new``
    itself as the root (with ``root``'s metadata).
    """
    old = get_submodule(root, name)
    new.train(old.training)
    if name == "":
        if hasattr(root, "ttcompress_meta"):
            object.__setattr__(new, "ttcompress_meta", get_meta(root))
        return new
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(root, parent_name)
    parent._modules[child] = new  # also works for nn.Sequential/ModuleList/ModuleDict children
    return root


def _device_of(module: nn.Module) -> torch.device | None:
    weight = getattr(module, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else None


def build_replacement(module: nn.Module, decision: LayerDecision, *, calib: Any = None) -> nn.Module:
    """Decompose ``module`` as ``decision`` says, with the decision's registered format.

    ``calib`` (optional calibration statistics) is passed to the format's ``build``.
    """
    if decision.format == DENSE:
        raise ValueError(f"layer {decision.name!r}: nothing to build for format {decision.format!r}")
    for what in ("weight", "bias"):  # name the layer (a decomposition alone cannot); a NaN bias would pass
        tensor = getattr(module, what, None)
        if isinstance(tensor, torch.Tensor) and not bool(tensor.isfinite().all()):
            raise ValueError(f"layer {decision.name!r} has NaN or Inf {what} values; cannot decompose it")
    new = get_format(decision.format).build(module, decision.options, calib=calib, name=decision.name)
    weight = getattr(module, "weight", None)
    if weight is not None:
        new = new.to(device=weight.device)
    return new


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRecord:
    """One Linear/Conv2d of a compression run (a row of the decompose table).

    ``format`` is a registered format name or ``"dense"`` (then ``skipped`` says why). ``ranks``
    and the modes come from the format's ``describe`` (e.g. the full TT rank tuple, or
    ``(rank,)`` for CP), ``detail`` is their table cell. ``rel_error`` is the relative Frobenius
    reconstruction error of the weight, ``seconds`` the decomposition wall time, ``note`` why the
    format was chosen (``auto``). With calibration data, ``out_error_before`` / ``out_error_after``
    are the relative output errors on the calibration data (bias included) of the data-free
    decomposition and of the fitted layer, and ``fit_method`` how it was fitted.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    format: str
    params_before: int
    params_after: int
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    rel_error: float | None = None
    seconds: float | None = None
    skipped: str | None = None
    aliases: tuple[str, ...] = ()
    detail: str | None = None
    note: str | None = None
    out_error_before: float | None = None
    out_error_after: float | None = None
    fit_method: str | None = None

    @property
    def ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        for k in ("shape", "in_modes", "out_modes", "ranks", "aliases"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress_with_report` did: the model, per-layer records and whole-model totals."""

    model: nn.Module
    records: tuple[LayerRecord, ...]
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
    def compressed(self) -> tuple[LayerRecord, ...]:
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


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        measured output error (:func:`ttcompress.allocate.input_grams`). Any input shape the
        model accepts works (e.g. ``(batch, seq, features)``).
    calib_samples : int, optional
        Use at most this many samples of ``calib_data``.
    check_input : tensor, tuple of tensors or dict, optional
        An input of the model (positional arguments as a tuple, keyword arguments as a dict).
        The dense model runs on it first (it must run), and the compressed one at the end, in eval
        mode without gradients: a layer in whose forward (or whose parent's forward) the
        compressed model fails is put back to dense, with the error as its reason, until the
        model runs. The result's ``output_error`` compares the two outputs.

    Returns
    -------
    CompressionResult

    Notes
    -----
    All replacements are built before any is swapped in, so a failing decomposition leaves the
    model unchanged (with calibration data they are fitted on a copy of the model). A layer
    whose decomposition would not be smaller than the dense layer, or that saves less than
    ``plan.min_saving`` of the model's parameters at an error above ``plan.max_error`` (by
    default only with calibration data, see :class:`~ttcompress.plan.Plan`), stays dense
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
    batches = None
    if calib_data is not None:
        batches = list(calib_batches(calib_data, max_samples=calib_samples))
        if not batches:
            raise ValueError("calib_data holds no samples")
        _check_calib_fits(model, batches[0])
    before = _count(model)
    reference = None if check_input is None else _reference_output(model, check_input)
    prep = prepare_model(model)
    try:
        sensitivity = None
        if batches is not None and plan.target_ratio is not None:
            names = [n for n, m, _a in compressible_layers(prep.model) if isinstance(m, (nn.Linear, nn.Conv2d))]
            sensitivity = input_grams(prep.model, names, batches)
        decisions = _guard_decisions(prep, plan_layers(prep.model, plan, sensitivity=sensitivity))
        if filter_fn is not None:
            decisions = [
                LayerDecision(d.name, d.type, d.shape, DENSE, {}, d.params_before, d.params_before,
                              "filtered out by filter_fn", d.aliases)
                if d.skipped is None and not filter_fn(get_submodule(prep.model, d.name), d.name) else d
                for d in decisions
            ]
        todo = [d for d in decisions if d.skipped is None]
        built: dict[str, tuple[nn.Module, float] | str]
        if batches is None:  # under torchrun each process decomposes its share of the layers (ttcompress.scaleout)
            built = dict(build_all(todo, lambda d: build_replacement(get_submodule(prep.model, d.name), d),
                                   device_of=lambda d: _device_of(get_submodule(prep.model, d.name)),
                                   progress=progress))
        else:  # sequential: each layer's statistics depend on the layers before it
            built = _build_calibrated(prep.model, todo, batches, plan, progress)
            if progress is not None:
                progress(len(todo), len(todo), "")
    except BaseException:
        prep.undo()
        raise

    records: list[LayerRecord] = []
    meta_layers: dict[str, dict[str, Any]] = {}
    swapped: dict[str, tuple[nn.Module, tuple[str, ...]]] = {}
    root = prep.model
    for d in decisions:
        entry = built.get(d.name)
        if not isinstance(entry, tuple):
            records.append(LayerRecord(d.name, d.type, d.shape, DENSE, d.params_before, d.params_before,
                                       skipped=entry if isinstance(entry, str) else d.skipped, aliases=d.aliases))
            continue
        new, seconds = entry
        record, meta = _record(d, new, seconds, plan, before)
        records.append(record)
        if record.format == DENSE:
            continue
        swapped[d.name] = (get_submodule(root, d.name), d.aliases)
        for name in (d.name, *d.aliases):
            root = set_submodule(root, name, new)
            meta_layers[name] = meta
    prep.model = root
    root = finish_model(prep)
    output_error = None
    if reference is not None:
        reverted = _forward_check(prep, swapped, check_input)
        records = [_reverted_record(r, reverted[r.name]) if r.name in reverted else r for r in records]
        for name in reverted:
            for alias in (name, *swapped[name][1]):
                meta_layers.pop(alias, None)
        root = finish_model(prep)
        output_error = _output_error(_run_model(root, check_input), reference)
    if root is not model and not hasattr(root, "ttcompress_meta"):
        object.__setattr__(root, "ttcompress_meta", get_meta(model))
    update_meta(root, layers={**prep.layer_records(root), **meta_layers})
    return CompressionResult(root, tuple(records), before, _count(root), plan, output_error)


def _check_calib_fits(model: nn.Module, batch: torch.Tensor) -> None:
    """``ValueError`` naming ``calib_data`` when ``model`` cannot run on its inputs (one eval pass, 2 samples)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(batch[:2])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"calib_data: the model cannot run on inputs of shape {tuple(batch.shape[1:])} "
                         f"per sample: {first[:200]}") from None
    finally:
        for m, flag in flags:
            m.training = flag


def _build_calibrated(model: nn.Module, todo: list[LayerDecision], batches: list[torch.Tensor], plan: Plan,
                      progress: ProgressFn | None) -> dict[str, tuple[nn.Module, float] | str]:
    """Build every layer of ``todo`` fitted on sequential calibration statistics.

    The layers are replaced one by one in forward order on a copy of ``model``
    (:func:`ttcompress.calibration.sequential.calibrate_sequentially`): each is decomposed by its
    format and fitted (``build(..., calib=stats)``) on the inputs that the copy, whose earlier
    layers are already compressed, feeds it, against the dense outputs of ``model`` (which is
    not modified). A layer kept dense (:func:`keep_dense_reason`) stays dense in the copy too, so
    the next layers see its exact outputs. Returns ``name -> (layer, seconds)``, or ``name ->
    reason`` for layers the calibration data never reach. Layers that are not ``nn.Linear`` /
    ``nn.Conv2d`` (attention modules, embeddings) are built data-free. Memory: the copy of the model, the
    calibration inputs and one layer's Gram matrices at a time.
    """
    work = copy.deepcopy(model)
    fitted = [d for d in todo if isinstance(get_submodule(model, d.name), (nn.Linear, nn.Conv2d))]
    by_name = {d.name: d for d in fitted}
    total = _count(model)
    layers: dict[str, nn.Module] = {}

    def build(name: str, dense: nn.Module, stats: LayerStats) -> nn.Module | FitResult:
        new = build_replacement(dense, by_name[name], calib=stats)
        layers[name] = new
        if keep_dense_reason(by_name[name], new, plan, total) is not None:
            return FitResult(copy.deepcopy(dense), 0.0, 0.0, "none")
        fit = calibration_fit(new)
        return fit if fit is not None else new

    def step(name: str, index: int, count: int) -> None:
        if progress is not None:
            progress(index, count, name)

    done = calibrate_sequentially(model, work, list(by_name), build, batches, progress=step)
    out: dict[str, tuple[nn.Module, float] | str] = {}
    for name, cal in done.items():
        out[name] = (layers[name], cal.seconds) if cal.reached else "not reached by the calibration data"
    for d in todo:  # layers without calibration statistics (attention, embeddings): data-free
        if d.name not in by_name:
            start = time.perf_counter()
            out[d.name] = (build_replacement(get_submodule(model, d.name), d), time.perf_counter() - start)
    return out


def keep_dense_reason(d: LayerDecision, new: nn.Module, plan: Plan, total: int) -> str | None:
    """Why the built layer ``new`` should not replace the dense layer of decision ``d``, or None.

    It does not shrink the layer; or it saves fewer than ``plan.min_saving * total`` parameters
    while its error is above ``plan.max_error`` (the relative output error on calibration data
    after fitting when there is one, else the relative weight error): a small saving is not
    worth a large error (e.g. a 128 -> 10 classifier).
    """
    after = _count(new)
    fmt = format_of(new)
    label = fmt.name.upper() if fmt is not None else type(new).__name__
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
            total: int) -> tuple[LayerRecord, dict[str, Any]]:
    """The table record and the checkpoint record of a built layer (dense if :func:`keep_dense_reason`)."""
    after = _count(new)
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
        return LayerRecord(
            d.name, d.type, d.shape, DENSE, d.params_before, d.params_before, rel_error=rel_error, seconds=seconds,
            skipped=reason, aliases=d.aliases, note=note, **errors), {}
    desc = fmt.describe(new)
    record = LayerRecord(d.name, d.type, d.shape, fmt.name, d.params_before, after, desc.in_modes, desc.out_modes,
                         desc.ranks, rel_error, seconds, None, d.aliases, desc.text, note, **errors)
    meta = {"format": fmt.name, "config": new.config(), "rel_error": rel_error, "seconds": seconds,
            "params_before": d.params_before, "params_after": after, **errors}
    if note is not None:
        meta["note"] = note
    try:  # stored as JSON in checkpoints: keep the in-memory record identical to a reloaded one
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"layer {d.name!r}: config() is not JSON-serializable: {exc}") from None
    return record, meta


def compress(
    model: nn.Module,
    plan: Plan | Mapping[str, Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: ProgressFn | None = None,
    calib_data: Any = None,
    calib_samples: int | None = None,
    check_input: Any = None,
) -> nn.Module:
    """Compress ``model`` in place per ``plan``; return it (see :func:`compress_with_report`).

    Examples
    --------
    >>> from ttcompress.plan import Plan, TTSettings
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> model = compress(model, Plan(tt=TTSettings(ranks=2)))
    >>> sorted(model.ttcompress_meta["layers"])
    ['0']
    """
    return compress_with_report(model, plan, filter_fn=filter_fn, progress=progress, calib_data=calib_data,
                                calib_samples=calib_samples, check_input=check_input).model


# --------------------------------------------------------------------------------------------------
# Structure around the swap: attention, GPT-2 Conv1D, tied weights, the forward check
# --------------------------------------------------------------------------------------------------
def _keep_dense(d: LayerDecision, reason: str) -> LayerDecision:
    return LayerDecision(d.name, d.type, d.shape, DENSE, {}, d.params_before, d.params_before, reason, d.aliases)


def _guard_decisions(prep: Preparation, decisions: list[LayerDecision]) -> list[LayerDecision]:
    """Keep dense the layers a compressed replacement would break.

    * the ``out_proj`` of an ``nn.MultiheadAttention`` that could not be converted (its forward
      reads ``out_proj.weight``), and the feed-forward layers of a ``TransformerEncoderLayer``
      whose attention could not be converted (its fast path reads ``linear1.weight``);
    * a layer whose parameter is also registered under another module's name (tied weights,
      e.g. a language model's output layer sharing the embedding): compressing it would untie them.
    """
    owners: dict[int, list[str]] = {}
    for pname, p in prep.model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    out = []
    for d in decisions:
        if d.skipped is None:
            reason = parent_reason(prep, d.name) or _tied_reason(prep.model, d, owners)
            if reason is not None:
                d = _keep_dense(d, reason)
        out.append(d)
    return out


def _tied_reason(model: nn.Module, d: LayerDecision, owners: Mapping[int, list[str]]) -> str | None:
    prefixes = tuple(n + "." if n else "" for n in (d.name, *d.aliases))
    for p in get_submodule(model, d.name).parameters():
        others = [n for n in owners.get(id(p), ()) if not n.startswith(prefixes)]
        if others:
            return f"tied to {others[0]} (compressing it would untie them)"
    return None


@contextmanager
def _nested_off(encoders: list[nn.Module]) -> Iterator[None]:
    for m in encoders:
        m.use_nested_tensor = False
    try:
        yield
    finally:
        for m in encoders:
            m.use_nested_tensor = True


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` in eval mode without gradients, with every ``nn.TransformerEncoder``'s
    nested-tensor path off (it leaves padded positions at zero: dense and compressed runs compare
    like with like)."""
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor]
    with _eval_no_grad(model), _nested_off(encoders):
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, tuple):
            return model(*inputs)
        return model(inputs)


def _reference_output(model: nn.Module, inputs: Any) -> Any:
    try:
        return _run_model(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported as bad input
        raise ValueError(f"check_input does not run through the dense model: {type(exc).__name__}: {exc}") from None


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _output_error(out: Any, reference: Any) -> float:
    """Relative Frobenius difference over the floating tensors of two outputs of the same structure."""
    num = den = 0.0
    for a, b in zip(_tensors(out), _tensors(reference)):
        if a.is_floating_point() and a.shape == b.shape:
            num += float((a.double() - b.double()).square().sum())
            den += float(b.double().square().sum())
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def _failing_stack(model: nn.Module, inputs: Any) -> tuple[list[str], BaseException | None]:
    """Run ``model``; on failure return the qualified names of the modules whose forward was running."""
    stack: list[str] = []
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, _n=name: stack.append(_n)))
        handles.append(m.register_forward_hook(lambda mod, args, out: None if stack.pop() else None))
    try:
        _run_model(model, inputs)
        return [], None
    except Exception as exc:  # noqa: BLE001 - reported per layer below
        return list(stack), exc
    finally:
        for h in handles:
            h.remove()


def _forward_check(prep: Preparation, swapped: Mapping[str, tuple[nn.Module, tuple[str, ...]]],
                   inputs: Any) -> dict[str, str]:
    """Run the compressed model; revert the compressed layers inside the innermost failing module
    until it runs. Returns ``{layer: reason}`` of the reverted layers."""
    reverted: dict[str, str] = {}
    while True:
        stack, exc = _failing_stack(prep.model, inputs)
        if exc is None:
            return reverted
        live = [n for n in swapped if n not in reverted]
        victims: list[str] = []
        for where in reversed(stack or [""]):
            victims = [n for n in live if where == "" or n == where or n.startswith(where + ".")]
            if victims:
                break
        if not victims:
            raise RuntimeError(f"the compressed model fails on check_input, and no compressed layer is the cause: "
                               f"{type(exc).__name__}: {exc}")
        where_text = f"in {where!r}" if where else "in the model"
        reason = f"forward check failed {where_text}: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
        for n in victims:
            dense, aliases = swapped[n]
            for alias in (n, *aliases):
                prep.model = set_submodule(prep.model, alias, dense)
            reverted[n] = reason
        finish_model(prep)


def _reverted_record(r: LayerRecord, reason: str) -> LayerRecord:
    return replace(r, format=DENSE, params_after=r.params_before, in_modes=None, out_modes=None, ranks=None,
                   detail=None, skipped=reason)


# --------------------------------------------------------------------------------------------------
# File-level operation (what `ttcompress decompose` runs)
# --------------------------------------------------------------------------------------------------
def default_output_path(input_path: str | os.PathLike[str]) -> Path:
    """``dir/model.pt`` → ``dir/model.tt.pt`` (any extension is replaced by ``.tt.pt``)."""
    p = Path(input_path)
    stem = p.name
    for ext in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        if stem.endswith(ext) and len(stem) > len(ext):
            stem = stem[: -len(ext)]
            break
    return p.with_name(stem + ".tt.pt")


@dataclass(frozen=True)
class DecomposeResult:
    """:func:`decompose_file`'s result: the compression report plus where it came from and went."""

    result: CompressionResult
    input: Path
    input_kind: str
    output: Path

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "input_kind": self.input_kind, "output": str(self.output),
                **self.result.to_dict()}


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
) -> DecomposeResult:
    """Load a model file, compress it per ``plan`` and save a ttcompress checkpoint atomically.

    Parameters
    ----------
    input_path : path
        Any input :func:`ttcompress.io.load` accepts.
    output : path, optional
        Default :func:`default_output_path` (``model.tt.pt`` next to ``model.pt``). Must differ
        from the input. Nothing is written if anything fails.
    plan, progress, calib_data, calib_samples
        As for :func:`compress_with_report`.
    arch, arch_kwargs, trust_pickle, trust_code
        As for :func:`ttcompress.io.load`.
    calib_info : mapping, optional
        How the calibration data were chosen (dataset, samples, seed), stored in the checkpoint
        info under ``"calibration"`` (with ``{"used": False}`` when there were none).

    Notes
    -----
    The checkpoint info records the source file: ``source`` (its name), ``source_path`` (absolute
    path) and ``source_sha256`` (content hash), which ``finetune`` uses to find the dense model as
    its default teacher (:func:`ttcompress.teacher.default_teacher`).
    """
    plan = _as_plan(plan)
    src = Path(input_path)
    dest = Path(output) if output is not None else default_output_path(src)
    if src.exists() and dest.exists() and dest.resolve() == src.resolve():
        raise ValueError(f"output (-o) must differ from the input file: {dest}")
    loaded = load_checkpoint(src, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    with process_group() as rank:  # under torchrun: every rank decomposes a share, rank 0 writes
        result = compress_with_report(loaded.model, plan, progress=progress, calib_data=calib_data,
                                      calib_samples=calib_samples)
        if rank == 0:
            calibration = {"used": calib_data is not None, **dict(calib_info or {})}
            info = {"plan": plan.to_dict(), "source": src.name, "calibration": calibration, **source_record(src)}
            save(result.model, dest, info=info)
    return DecomposeResult(result, src, loaded.kind, dest)


# --------------------------------------------------------------------------------------------------
# Description (what `ttcompress inspect` shows)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSummary:
    """One layer of :class:`ModelSummary`: a dense Linear/Conv2d or a compressed layer."""

    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    share: float
    format: str
    compressible: bool
    reason: str | None = None
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    suggestion: str | None = None
    params_before: int | None = None
    rel_error: float | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("shape", "in_modes", "out_modes", "ranks"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


@dataclass(frozen=True)
class ModelSummary:
    """A model's layers, parameter shares, and (for a compressed one) its plan and ranks."""

    kind: str
    arch: dict[str, Any] | None
    total_params: int
    other_params: int
    layers: tuple[LayerSummary, ...]
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
    meta = get_meta(model)
    total = _count(model)
    rows: list[LayerSummary] = []
    counted = 0
    done = layer_classes()
    decisions = {d.name: d for d in plan_layers(model, plan)}
    for name, m in model.named_modules():
        if isinstance(m, done):
            rows.append(_compressed_row(name, m, meta["layers"].get(name, {}), total))
        elif name in decisions:
            rows.append(_dense_row(decisions[name], m, plan, total))
        else:
            continue
        counted += rows[-1].params
    return ModelSummary(kind, meta["arch"], total, total - counted, tuple(rows), bool(meta["layers"]),
                        {k: v for k, v in meta["info"].items() if k != "history"})


def _compressed_row(name: str, layer: nn.Module, record: Mapping[str, Any], total: int) -> LayerSummary:
    fmt = format_of(layer)
    desc = fmt.describe(layer)  # type: ignore[union-attr]  # layer is an instance of a registered class
    params = _count(layer)
    return LayerSummary(name, type(layer).__name__, desc.shape, params, params / total if total else 0.0, desc.format,
                        False, "already compressed", desc.in_modes, desc.out_modes, desc.ranks, None,
                        record.get("params_before"), record.get("rel_error"), desc.text)


def _dense_row(d: LayerDecision, module: nn.Module, plan: Plan, total: int) -> LayerSummary:
    params = _count(module)
    fmt_name = d.format if d.format != DENSE else plan.format_for(module, plan.merged_rule(d.name))
    suggestion = None
    if d.options and fmt_name not in (None, DENSE):
        suggestion = get_format(fmt_name).suggest(d)
    in_modes, out_modes = d.options.get("in_modes"), d.options.get("out_modes")
    return LayerSummary(d.name, d.type, d.shape, params, params / total if total else 0.0, DENSE,
                        d.skipped is None, d.skipped, None if in_modes is None else tuple(in_modes),
                        None if out_modes is None else tuple(out_modes), None, suggestion)


def inspect_file(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    plan: Plan | None = None,
) -> ModelSummary:
    """Load a model file (any accepted form; options as for :func:`ttcompress.io.load`) and :func:`summarize` it."""
    loaded = load_checkpoint(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    return summarize(loaded.model, plan=plan, kind=loaded.kind)

