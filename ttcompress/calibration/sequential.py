"""Sequential calibration: compress layers in forward order, each fitted on the inputs that the
already-compressed model gives it, against the dense model's outputs (GPTQ, SVD-LLM).

Only one layer's statistics are held at a time (three ``K x K`` float64 Gram matrices per group)
and the activations of one batch; the calibration inputs themselves are kept in memory so that
they can be replayed for every layer.

References
----------
.. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training
       Quantization for Generative Pre-trained Transformers", ICLR 2023.
.. [2] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", 2024.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.data import calib_batches
from ttcompress.inputs import call_model, move_inputs
from ttcompress.calibration.fit import FitResult, output_error
from ttcompress.calibration.progress import report_batch
from ttcompress.calibration.reconstruct import dense_weight, effective_bias
from ttcompress.calibration.stats import MAX_POSITIONS, LayerStats, StatsAccumulator

__all__ = ["BuildFn", "LayerCalibration", "calibrate_sequentially", "forward_order"]

#: ``build(name, dense_module, stats)``: the replacement, or a :class:`FitResult` holding it.
BuildFn = Callable[[str, nn.Module, LayerStats], "nn.Module | FitResult"]


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration did to one layer.

    Attributes
    ----------
    name : str
        Qualified name of the layer.
    reached : bool
        False when no calibration batch reached the layer: it was left dense.
    alias_of : str or None
        The name under which this same module object was calibrated (it is compressed once).
    error_before, error_after : float or None
        Relative output error on the calibration data (bias included) of the replacement before
        and after fitting; ``error_before`` is None when ``build`` returned a bare module.
    method : str or None
        How the fit was done (see :class:`ttcompress.calibration.fit.FitResult`).
    samples : int
        Calibration samples used.
    rows : int
        Rows of the statistics (samples times positions).
    seconds : float
        Time for statistics, build and swap.
    """

    name: str
    reached: bool
    alias_of: str | None = None
    error_before: float | None = None
    error_after: float | None = None
    method: str | None = None
    samples: int = 0
    rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for pairs in flags:
            for module, training in pairs:
                module.training = training


def _input_hook(store: list[torch.Tensor]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            store.append(args[0].detach())
    return hook


def forward_order(model: nn.Module, names: Sequence[str], batch: torch.Tensor) -> list[str]:
    """The names among ``names`` in the order their modules are first called by ``model(batch)``.

    Names never called are left out. Runs one forward pass in eval mode without gradients.
    """
    order: list[str] = []
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in order:
                order.append(name)
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make(name)))
    try:
        with torch.no_grad(), _eval_mode(model):
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _layer_stats(dense_model: nn.Module, model: nn.Module, name: str,
                 batches: Sequence[torch.Tensor], max_positions: int) -> LayerStats:
    """Run every batch through both models, hooking ``name`` in each; pair the calls in order."""
    dense_layer, layer = dense_model.get_submodule(name), model.get_submodule(name)
    acc = StatsAccumulator(dense_layer, max_positions=max_positions)
    for done, x in enumerate(batches, 1):
        seen_dense: list[torch.Tensor] = []
        seen: list[torch.Tensor] = []
        handles = [dense_layer.register_forward_pre_hook(_input_hook(seen_dense)),
                   layer.register_forward_pre_hook(_input_hook(seen))]
        try:
            call_model(dense_model, x)
            call_model(model, x)
        finally:
            for h in handles:
                h.remove()
        if len(seen_dense) != len(seen):
            raise ValueError(f"layer {name!r} was called {len(seen_dense)} times by the dense model "
                             f"but {len(seen)} times by the compressed one on the same batch")
        for xd, xc in zip(seen_dense, seen):
            acc.update(xd, xc)
        report_batch(f"statistics {name}", done, len(batches))
    return acc.finalize()


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place ``old`` is a child in ``model`` (keeps shared modules shared)."""
    new.train(old.training)
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[child_name] = new


def _checked_names(names: Sequence[str], *, model: nn.Module, dense_model: nn.Module) -> list[str]:
    """``names`` without repeats; ValueError naming ``names`` when one is not in both models."""
    names = list(dict.fromkeys(names))
    for name in names:
        for label, root in (("model", model), ("dense_model", dense_model)):
            try:
                root.get_submodule(name)
            except AttributeError:
                raise ValueError(f"names: {name!r} is not a submodule of {label}") from None
    return names


def _first_names(model: nn.Module, order: Sequence[str]) -> dict[str, str]:
    """Each name of ``order`` -> the first name in ``order`` of the same module object."""
    first_name: dict[int, str] = {}
    return {name: first_name.setdefault(id(model.get_submodule(name)), name) for name in order}


def calibrate_sequentially(
    dense_model: nn.Module,
    model: nn.Module,
    names: Sequence[str],
    build: BuildFn,
    calib_data: Any,
    *,
    device: torch.device | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    max_samples: int | None = None,
    max_positions: int = MAX_POSITIONS,
) -> dict[str, LayerCalibration]:
    """Replace the layers ``names`` of ``model`` one by one, each fitted on sequential statistics.

    For each layer in forward-execution order, every calibration batch is run through
    ``dense_model`` and ``model`` (whose earlier layers are already replaced) with hooks on that
    layer; its :class:`LayerStats` (Gram of ``model``'s inputs, cross-Gram with ``dense_model``'s
    inputs) go to ``build``, and the module it returns is swapped into ``model`` wherever the
    layer's module object sits. Later layers thus compensate earlier errors [1]_ [2]_.

    Parameters
    ----------
    dense_model : nn.Module
        The reference model (not modified).
    model : nn.Module
        A copy of ``dense_model`` with the same module names, modified in place.
    names : sequence of str
        Qualified names of the ``nn.Linear`` / ``nn.Conv2d`` layers to replace. Names of the same
        module object are compressed once (the others are reported as aliases); names that the
        forward pass never reaches stay dense and are reported with ``reached=False``.
    build : callable
        ``build(name, dense_module, stats)`` returning the replacement module, or a
        :class:`~ttcompress.calibration.fit.FitResult` (e.g. from
        :func:`~ttcompress.calibration.fit.fit_layer`) whose errors are then recorded.
    calib_data : any
        Input batches in any form :func:`~ttcompress.calibration.data.calib_batches` accepts.
    device : torch.device or str, optional
        Where the batches go (default: the device of ``model``'s first parameter).
    progress : callable, optional
        Called as ``progress(name, index, total)`` before each layer.
    max_samples : int, optional
        Use at most this many calibration samples.
    max_positions : int, default MAX_POSITIONS
        Conv layers: spatial positions kept per sample.

    Returns
    -------
    dict of str to LayerCalibration
        One entry per name, in forward order (unreached names last).

    Raises
    ------
    TypeError
        ``build`` returned something else than a module or a FitResult, or a layer is not an
        ``nn.Linear`` / ``nn.Conv2d``; also the errors of ``calib_batches``.
    ValueError
        A name is not in ``model`` / ``dense_model``, or the calibration data are empty.
    """
    names = _checked_names(names, model=model, dense_model=dense_model)
    target = torch.device(device) if device is not None else _device_of(model)
    batches = [move_inputs(x, target) for x in calib_batches(calib_data, max_samples=max_samples)]
    results: dict[str, LayerCalibration] = {}
    with torch.no_grad(), _eval_mode(dense_model, model):
        order = forward_order(model, names, batches[0])
        alias_of = _first_names(model, order)  # before any swap: module identities of the original model
        for index, name in enumerate(order):
            if alias_of[name] != name:
                results[name] = LayerCalibration(name, reached=True, alias_of=alias_of[name])
                continue
            if progress is not None:
                progress(name, index, len(order))
            results[name] = _calibrate_one(dense_model, model, name, build, batches, max_positions)
    for name in names:
        if name not in results:
            results[name] = LayerCalibration(name, reached=False)
    return results


def _calibrate_one(dense_model: nn.Module, model: nn.Module, name: str, build: BuildFn,
                   batches: Sequence[torch.Tensor], max_positions: int) -> LayerCalibration:
    start = time.perf_counter()
    layer = model.get_submodule(name)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"layer {name!r} must be an nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    stats = _layer_stats(dense_model, model, name, batches, max_positions)
    dense_layer = dense_model.get_submodule(name)
    with torch.enable_grad():
        built = build(name, dense_layer, stats)
    if isinstance(built, FitResult):
        new, before, after, method = built.module, built.error_before, built.error_after, built.method
    elif isinstance(built, nn.Module):
        new, before, method = built, None, None
        after = output_error(dense_weight(dense_layer), dense_weight(new).detach(), stats,
                             bias=effective_bias(dense_layer), new_bias=effective_bias(new))
    else:
        raise TypeError(f"build must return an nn.Module or a FitResult, got {type(built).__name__}")
    _swap(model, layer, new)
    return LayerCalibration(name, reached=True, error_before=before, error_after=after, method=method,
                            samples=stats.samples, rows=stats.count,
                            seconds=time.perf_counter() - start)
