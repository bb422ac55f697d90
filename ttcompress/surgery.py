"""Apply a :class:`~ttcompress.plan.Plan` to a model: find targets, build replacements, swap them.

The entry point is :func:`compress` (in place, like torchao's ``quantize_``)::

    model = compress(model, Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=8)))

:func:`compress_with_report` does the same and also returns one :class:`~ttcompress.layer_report.LayerReport` per
Linear/Conv2d (the data behind ``ttcompress decompose``'s table). :func:`decompose_file` is the
whole ``decompose`` command as a function: load → compress → save atomically.
:func:`summarize` / :func:`inspect_file` describe a model for ``ttcompress inspect``.

Every layer is reported as a :class:`~ttcompress.layer_report.LayerReport`; every replaced one is
also kept in the model's metadata (:class:`~ttcompress.meta.ModelMeta`), whose checkpoint record
``{"format", "config", "rel_error", "seconds", "params_before", "params_after"}`` is what
:func:`ttcompress.io.save` needs to rebuild the model later.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.formats import DENSE, format_of, get_format, layer_classes
from ttcompress.formats.base import build_note
from ttcompress.layer_report import LayerReport, count_params, format_label
from ttcompress.fsutil import strip_model_suffix
from ttcompress.io import load_checkpoint, save
from ttcompress.meta import copy_meta, read_meta, update_meta
from ttcompress.modtree import get_submodule, set_submodule
from ttcompress.formats.structure import Preparation, finish_model, parent_reason, prepare_model
from ttcompress.plan import LayerDecision, Plan, plan_layers
from ttcompress.scaleout import build_all, process_group

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
    model unchanged. A layer whose decomposition (e.g. at an ``eps``) would not be smaller than
    the dense layer stays dense.

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
    before = count_params(model)
    reference = None if check_input is None else _reference_output(model, check_input)
    prep = prepare_model(model)
    try:
        decisions, built = _plan_and_build(prep, plan, filter_fn, progress)
    except BaseException:
        prep.undo()
        raise
    records, meta_layers, swapped = _swap_in(prep, decisions, built)
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
        copy_meta(model, root)
    update_meta(root, layers={**prep.layer_records(root), **meta_layers})
    return CompressionResult(root, tuple(records), before, count_params(root), plan, output_error)


Swapped = dict[str, tuple[nn.Module, tuple[str, ...]]]


def _plan_and_build(
    prep: Preparation, plan: Plan, filter_fn: FilterFn | None, progress: ProgressFn | None
) -> tuple[list[LayerDecision], dict[str, tuple[nn.Module, float]]]:
    """The plan's decisions for the prepared model, and the replacement of every layer it compresses
    (name -> (layer, seconds)); nothing is swapped in yet."""
    decisions = _guard_decisions(prep, plan_layers(prep.model, plan))
    if filter_fn is not None:
        decisions = [
            LayerDecision(d.name, d.type, d.shape, DENSE, {}, d.params_before, d.params_before,
                          "filtered out by filter_fn", d.aliases)
            if d.skipped is None and not filter_fn(get_submodule(prep.model, d.name), d.name) else d
            for d in decisions
        ]
    todo = [d for d in decisions if d.skipped is None]
    # Under torchrun each process decomposes its share of the layers (ttcompress.scaleout).
    built = build_all(todo, lambda d: build_replacement(get_submodule(prep.model, d.name), d),
                      device_of=lambda d: _device_of(get_submodule(prep.model, d.name)), progress=progress)
    return decisions, built


def _swap_in(
    prep: Preparation, decisions: list[LayerDecision], built: Mapping[str, tuple[nn.Module, float]]
) -> tuple[list[LayerReport], dict[str, LayerReport], Swapped]:
    """Swap the built layers that shrink into ``prep.model`` (under every alias); return one record per
    decision, the metadata records by name, and the dense layers replaced (name -> (layer, aliases))."""
    records: list[LayerReport] = []
    meta_layers: dict[str, LayerReport] = {}
    swapped: Swapped = {}
    root = prep.model
    for d in decisions:
        if d.name not in built:
            records.append(_dense_record(d, d.skipped))
            continue
        new, seconds = built[d.name]
        record, meta = _record(d, new, seconds)
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


def _record(d: LayerDecision, new: nn.Module, seconds: float) -> tuple[LayerReport, LayerReport | None]:
    """The record of a built layer, and the same record for the metadata (None: stays dense, it does not shrink)."""
    after = count_params(new)
    rel_error = getattr(new, "rel_error", None)
    rel_error = None if rel_error is None else float(rel_error)
    fmt = format_of(new)
    if fmt is None:
        raise TypeError(f"layer {d.name!r}: format {d.format!r} built a {type(new).__name__}, which no format owns")
    note = build_note(new)
    if after >= d.params_before:
        skipped = f"would not shrink ({format_label(fmt.name)} needs {after} >= {d.params_before} params)"
        return _dense_record(d, skipped, rel_error=rel_error, seconds=seconds, note=note), None
    try:  # stored as JSON in checkpoints: keep the in-memory record identical to a reloaded one
        config = json.loads(json.dumps(new.config()))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"layer {d.name!r}: config() is not JSON-serializable: {exc}") from None
    desc = fmt.describe(new)
    record = LayerReport(d.name, fmt.name, d.type, d.shape, d.params_before, after, in_modes=desc.in_modes,
                         out_modes=desc.out_modes, ranks=desc.ranks, rel_error=rel_error, seconds=seconds,
                         aliases=d.aliases, detail=desc.text, note=note, config=config)
    return record, record


def compress(
    model: nn.Module,
    plan: Plan | Mapping[str, Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: ProgressFn | None = None,
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
    return compress_with_report(model, plan, filter_fn=filter_fn, progress=progress, check_input=check_input).model


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


def _reverted_record(r: LayerReport, reason: str) -> LayerReport:
    return replace(r, format=DENSE, params_after=r.params_before, in_modes=None, out_modes=None, ranks=None,
                   detail=None, config=None, skipped=reason)


# --------------------------------------------------------------------------------------------------
# File-level operation (what `ttcompress decompose` runs)
# --------------------------------------------------------------------------------------------------
def default_output_path(input_path: str | os.PathLike[str]) -> Path:
    """``dir/model.pt`` → ``dir/model.tt.pt`` (any extension is replaced by ``.tt.pt``)."""
    p = Path(input_path)
    return p.with_name(strip_model_suffix(p.name) + ".tt.pt")


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
) -> DecomposeResult:
    """Load a model file, compress it per ``plan`` and save a ttcompress checkpoint atomically.

    Parameters
    ----------
    input_path : path
        Any input :func:`ttcompress.io.load` accepts.
    output : path, optional
        Default :func:`default_output_path` (``model.tt.pt`` next to ``model.pt``). Must differ
        from the input. Nothing is written if anything fails.
    plan, progress
        As for :func:`compress_with_report`.
    arch, arch_kwargs, trust_pickle, trust_code
        As for :func:`ttcompress.io.load`.
    """
    plan = _as_plan(plan)
    src = Path(input_path)
    dest = Path(output) if output is not None else default_output_path(src)
    if src.exists() and dest.exists() and dest.resolve() == src.resolve():
        raise ValueError(f"output (-o) must differ from the input file: {dest}")
    loaded = load_checkpoint(src, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    with process_group() as rank:  # under torchrun: every rank decomposes a share, rank 0 writes
        result = compress_with_report(loaded.model, plan, progress=progress)
        if rank == 0:
            save(result.model, dest, info={"plan": plan.to_dict(), "source": src.name})
    return DecomposeResult(result, src, loaded.kind, dest)


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
    counted = 0
    done = layer_classes()
    decisions = {d.name: d for d in plan_layers(model, plan)}
    for name, m in model.named_modules():
        if isinstance(m, done):
            rows.append(_compressed_row(name, m, meta.layers.get(name), total))
        elif name in decisions:
            rows.append(_dense_row(decisions[name], m, plan, total))
        else:
            continue
        counted += rows[-1].params or 0
    info = {k: v for k, v in meta.info.items() if k != "history"}
    arch = None if meta.arch is None else meta.arch.to_dict()
    return ModelSummary(kind, arch, total, total - counted, tuple(rows), bool(meta.layers), info)


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
    """Load a model file (any accepted form; options as for :func:`ttcompress.io.load`) and :func:`summarize` it."""
    loaded = load_checkpoint(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    return summarize(loaded.model, plan=plan, kind=loaded.kind)

