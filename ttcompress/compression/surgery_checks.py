"""Structure around the swap of :func:`ttcompress.compression.pipeline.compress_with_report`.

Which layers a compressed replacement would break (attention internals, tied weights:
:func:`guard_reasons`), and the forward check that runs the compressed model on the user's
``check_input`` and puts the layers inside a failing module back to dense until it runs
(:func:`forward_check`, :func:`finish_checked`); and the check that the model runs on the
calibration inputs (:func:`calibration_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.data import HandedOverBatches, all_finite, calib_batches
from ttcompress.errors import InputError, UserInputError
from ttcompress.formats import DENSE
from ttcompress.formats.structure import Preparation, finish_model, parent_reason
from ttcompress.inputs import call_model, main_tensor, take_rows
from ttcompress.layer_report import LayerReport
from ttcompress.checkpoint.meta import read_meta
from ttcompress.modtree import eval_mode, set_submodule
from ttcompress.compression.plan import LayerDecision, Plan, compressible_layers, plan_layers

__all__ = [
    "Swapped",
    "calibration_batches",
    "default_check_input",
    "check_calib_fits",
    "check_finite_parameters",
    "failing_stack",
    "finish_checked",
    "forward_check",
    "guard_reasons",
    "guarded_plan",
    "nested_off",
    "output_error",
    "output_tensors",
    "reference_output",
    "reverted_record",
    "run_model",
    "tied_reason",
]

#: Dense layers replaced by compressed ones: name -> (dense layer, aliases).
Swapped = dict[str, tuple[nn.Module, tuple[str, ...]]]


def check_finite_parameters(model: nn.Module) -> None:
    """Refuse a model with a NaN or Inf parameter, naming the first one.

    Called once where every compression starts (:func:`ttcompress.compression.pipeline.compress_with_report`,
    :func:`ttcompress.compression.dryrun.preview_plan`, :func:`ttcompress.compression.summary.summarize` of a plan with a
    target ratio, and :func:`ttcompress.sweep.run_sweep` right after loading), before rank allocation,
    calibration or any decomposition: an SVD, eigendecomposition or least-squares fit of
    non-finite values fails deep inside the linear-algebra backend, and a layer kept dense would
    carry the values into the compressed model. Tensors on the ``meta`` device are skipped.

    Raises
    ------
    UserInputError
        A parameter holds NaN or Inf.
    """
    for name, p in model.named_parameters():
        if p.device.type == "meta" or not (p.is_floating_point() or p.is_complex()):
            continue
        if not all_finite(p.detach()):
            layer, _, what = name.rpartition(".")
            where = f"layer {layer!r} has NaN or Inf {what} values" if layer else f"parameter {name!r} has NaN or Inf values"
            raise UserInputError(f"{where}; a model with non-finite weights cannot be compressed")


def calibration_batches(model: nn.Module, calib_data: Any, calib_samples: int | None) -> list[torch.Tensor] | None:
    """The calibration inputs as a list of batches (None without calibration data), checked on ``model``."""
    if calib_data is None:
        return None
    if isinstance(calib_data, HandedOverBatches) and calib_samples is None and calib_data:
        batches: list[torch.Tensor] = calib_data  # checked by its maker; the collector empties it when done
    else:
        batches = list(calib_batches(calib_data, max_samples=calib_samples))
    if not batches:
        raise InputError("calib_data", "holds no samples")
    check_calib_fits(model, batches[0])
    return batches


def check_calib_fits(model: nn.Module, batch: Any) -> None:
    """:class:`InputError` naming ``calib_data`` when ``model`` cannot run on its inputs (one eval pass, 2 samples)."""
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, take_rows(batch, 2))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError("calib_data", f": the model cannot run on inputs of shape {tuple(main_tensor(batch).shape[1:])} "
                         f"per sample: {first[:200]}") from None


def guard_reasons(prep: Preparation) -> dict[str, str]:
    """The layers a compressed replacement would break, with the reason: they stay dense.

    * the ``out_proj`` of an ``nn.MultiheadAttention`` that could not be converted (its forward
      reads ``out_proj.weight``), and the feed-forward layers of a ``TransformerEncoderLayer``
      whose attention could not be converted (its fast path reads ``linear1.weight``);
    * a layer whose parameter is also registered under another module's name (tied weights,
      e.g. a language model's output layer sharing the embedding): compressing it would untie them.
    """
    owners: dict[int, list[str]] = {}
    for pname, p in prep.model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    reasons = {}
    for name, module, aliases in compressible_layers(prep.model):
        reason = parent_reason(prep, name) or tied_reason(module, (name, *aliases), owners)
        if reason is not None:
            reasons[name] = reason
    return reasons


def guarded_plan(prep: Preparation, plan: Plan, sensitivity: Any = None, *, patterns_checked: bool = False,
                 decided: Mapping[str, LayerDecision] | None = None) -> list[LayerDecision]:
    """The plan's decisions for the prepared model, in one pass of :func:`plan_layers`, with the layers a
    replacement would break (:func:`guard_reasons`) kept dense. Under a ``target_ratio`` those layers hold
    their dense parameters while the ranks are allocated, so that the budget goes to the layers that can take
    it (tied embeddings would otherwise hold a share the model never gets, and the target would be missed).
    Allocating ranks needs every layer's spectrum: callers refuse a model with non-finite weights first
    (:func:`check_finite_parameters`).

    ``patterns_checked`` as for :func:`plan_layers`. ``decided``: the decisions, by layer name, taken
    for a larger model that the prepared one is a part of (a whole-model rank allocation made one
    block at a time, :mod:`ttcompress.compression.blockwise`): returned for the model's layers, in
    order, instead of planning."""
    if decided is not None:
        names = [name for name, _m, _a in compressible_layers(prep.model)]
        missing = [n for n in names if n not in decided]
        if missing:
            raise ValueError(f"decided has no decision for layer {missing[0]!r}")
        return [decided[n] for n in names]
    return plan_layers(prep.model, plan, sensitivity=sensitivity, keep_dense=guard_reasons(prep),
                       patterns_checked=patterns_checked)


def tied_reason(module: nn.Module, names: tuple[str, ...], owners: Mapping[int, list[str]]) -> str | None:
    """Why ``module`` (registered under ``names``) shares a parameter with another module, or None."""
    prefixes = tuple(n + "." if n else "" for n in names)
    for p in module.parameters():
        others = [n for n in owners.get(id(p), ()) if not n.startswith(prefixes)]
        if others:
            return f"tied to {others[0]} (compressing it would untie them)"
    return None


@contextmanager
def nested_off(encoders: list[nn.Module]) -> Iterator[None]:
    for m in encoders:
        m.use_nested_tensor = False
    try:
        yield
    finally:
        for m in encoders:
            m.use_nested_tensor = True




def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` in eval mode without gradients, with every ``nn.TransformerEncoder``'s
    nested-tensor path off (it leaves padded positions at zero: dense and compressed runs compare
    like with like)."""
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor]
    with eval_mode(model), torch.no_grad(), nested_off(encoders):
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, tuple):
            return model(*inputs)
        return model(inputs)


def default_check_input(model: nn.Module) -> Any:
    """An input the dense ``model`` runs on, for the forward check of a compression that was given
    none (``decompose`` from the command line), or None when none can be made.

    The shape the model records (models trained by ttcompress), else for a transformers model
    token ids below its vocabulary (``input_ids``) or images of its configured size
    (``pixel_values``); seeded. An input the dense model does not run on gives None: the check
    must not fail a model for an input it was never meant to take (T5 also needs decoder ids).
    """
    from ttcompress.report.measure import example_input

    config = getattr(model, "config", None)
    shape = read_meta(model).info.get("input_shape")
    main = getattr(model, "main_input_name", None)
    inputs: Any = None
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, int) and 0 < s <= 4096 for s in shape):
        inputs = example_input(model, tuple(shape), 2)
    elif main == "input_ids" and isinstance(getattr(config, "vocab_size", None), int):
        inputs = example_input(model, (8,), 2)
    elif main == "pixel_values" and isinstance(getattr(config, "image_size", None), int):
        size, channels = config.image_size, getattr(config, "num_channels", 3)
        inputs = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    if inputs is None:
        return None
    try:
        run_model(model, inputs)
    except Exception:  # noqa: BLE001 - the dense model does not take it: no check
        return None
    return inputs


def reference_output(model: nn.Module, inputs: Any) -> Any:
    try:
        return run_model(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported as bad input
        raise ValueError(f"check_input does not run through the dense model: {type(exc).__name__}: {exc}") from None


def output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def output_error(out: Any, reference: Any) -> float:
    """Relative Frobenius difference over the floating tensors of two outputs of the same structure."""
    num = den = 0.0
    for a, b in zip(output_tensors(out), output_tensors(reference)):
        if a.is_floating_point() and a.shape == b.shape:
            num += float((a.double() - b.double()).square().sum())
            den += float(b.double().square().sum())
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def failing_stack(model: nn.Module, inputs: Any) -> tuple[list[str], BaseException | None]:
    """Run ``model``; on failure return the qualified names of the modules whose forward was running."""
    stack: list[str] = []
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, _n=name: stack.append(_n)))
        handles.append(m.register_forward_hook(lambda mod, args, out: None if stack.pop() else None))
    try:
        run_model(model, inputs)
        return [], None
    except Exception as exc:  # noqa: BLE001 - reported per layer below
        return list(stack), exc
    finally:
        for h in handles:
            h.remove()


def forward_check(prep: Preparation, swapped: Mapping[str, tuple[nn.Module, tuple[str, ...]]],
                   inputs: Any) -> dict[str, str]:
    """Run the compressed model; revert the compressed layers inside the innermost failing module
    until it runs. Returns ``{layer: reason}`` of the reverted layers."""
    reverted: dict[str, str] = {}
    while True:
        stack, exc = failing_stack(prep.model, inputs)
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


def reverted_record(r: LayerReport, reason: str) -> LayerReport:
    return replace(r, format=DENSE, params_after=r.params_before, in_modes=None, out_modes=None, ranks=None,
                   detail=None, config=None, skipped=reason)


def finish_checked(
    prep: Preparation,
    swapped: Swapped,
    records: list[LayerReport],
    meta_layers: dict[str, LayerReport],
    *,
    check_input: Any,
    reference: Any,
) -> tuple[nn.Module, list[LayerReport], float | None]:
    """Finish the swapped model; with a ``reference`` output, forward-check it on ``check_input``.

    Layers reverted by :func:`forward_check` get their reason in the records and lose their
    ``meta_layers`` entries (under every alias). Returns ``(root, records, output_error)``;
    ``output_error`` is None without a reference.
    """
    root = finish_model(prep)
    if reference is None:
        return root, records, None
    reverted = forward_check(prep, swapped, check_input)
    records = [reverted_record(r, reverted[r.name]) if r.name in reverted else r for r in records]
    for name in reverted:
        for alias in (name, *swapped[name][1]):
            meta_layers.pop(alias, None)
    root = finish_model(prep)
    return root, records, output_error(run_model(root, check_input), reference)
