"""Sequential calibration: compress layers in forward order, each fitted on the inputs that the
already-compressed model gives it, against the dense model's outputs (GPTQ, SVD-LLM).

Only one layer's statistics are held at a time (exact Gram matrices for narrow layers, a sketch of
``O(l K)`` for wide ones, within the collector's memory budget:
:class:`~ttcompress.calibration.collector.StatsCollector`) and the activations of one batch; the
calibration inputs themselves are kept in memory so that they can be replayed for every layer
(batches handed over by their maker are released once the last layer's statistics are taken).

References
----------
.. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training
       Quantization for Generative Pre-trained Transformers", ICLR 2023.
.. [2] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", 2024.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.modtree import eval_mode, replace_module
from ttcompress.calibration.collector import StatsCollector
from ttcompress.inputs import call_model, main_tensor, take_rows
from ttcompress.calibration.fit import FitResult, output_error
from ttcompress.calibration.reconstruct import dense_weight, effective_bias
from ttcompress.calibration.stats import MAX_POSITIONS, LayerStats

__all__ = ["BuildFn", "LayerCalibration", "calibrate_sequentially", "forward_calls", "forward_order"]

#: ``build(name, dense_module, stats)``: the replacement, or a :class:`FitResult` holding it. ``stats``
#: is None when the memory budget had no room for the layer's statistics (build it data-free).
BuildFn = Callable[[str, nn.Module, "LayerStats | None"], "nn.Module | FitResult"]


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
    statistics : str or None
        How the statistics were kept when not exactly (sketched, or fitted data-free because they
        did not fit the memory budget).
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
    statistics: str | None = None
    samples: int = 0
    rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")




def forward_order(model: nn.Module, names: Sequence[str], batch: torch.Tensor) -> list[str]:
    """The names among ``names`` in the order their modules are first called by ``model(batch)``.

    Names never called are left out. Runs one forward pass in eval mode without gradients.
    """
    return list(forward_calls(model, names, batch))


def forward_calls(model: nn.Module, names: Sequence[str], batch: torch.Tensor) -> dict[str, int]:
    """How often ``model(batch)`` calls each module of ``names``, in the order of their first calls
    (names never called are left out). One forward pass in eval mode without gradients."""
    order: dict[str, int] = {}
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            order[name] = order.get(name, 0) + 1
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make(name)))
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


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
    collector: StatsCollector | None = None,
    rank_hints: Mapping[str, int | None] | None = None,
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
    collector : StatsCollector, optional
        The statistics collector to ask (its batches, budget and device); by default one is made
        from ``calib_data``, ``max_samples``, ``device`` and ``max_positions`` with the default
        memory budget. A layer whose statistics do not fit the budget is built with ``stats=None``.
    rank_hints : mapping of str to int, optional
        The rank each layer will be fitted at, for the sketch size
        (:func:`~ttcompress.calibration.collector.sketch_rows_for`).

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
    if collector is None:
        target = torch.device(device) if device is not None else _device_of(model)
        collector = StatsCollector(calib_data, max_samples=max_samples, device=target, max_positions=max_positions)
    hints = dict(rank_hints or {})
    results: dict[str, LayerCalibration] = {}
    with torch.no_grad(), eval_mode(dense_model, model):
        first = collector.batches[0]
        # one sample is enough to see which layers run, and in what order
        calls = forward_calls(model, names, take_rows(first, 1) if main_tensor(first).dim() > 1 else first)
        del first  # no reference here to the batches: the collector may release them (StatsCollector.release)
        order = list(calls)
        alias_of = _first_names(model, order)  # before any swap: module identities of the original model
        last = [n for n in order if alias_of[n] == n][-1:]
        for index, name in enumerate(order):
            if alias_of[name] != name:
                results[name] = LayerCalibration(name, reached=True, alias_of=alias_of[name])
                continue
            if progress is not None:
                progress(name, index, len(order))
            results[name] = _calibrate_one(dense_model, model, name, build, collector, hints.get(name),
                                           once=calls[name] == 1, last=[name] == last)
    for name in names:
        if name not in results:
            results[name] = LayerCalibration(name, reached=False)
    return results


def _calibrate_one(dense_model: nn.Module, model: nn.Module, name: str, build: BuildFn,
                   collector: StatsCollector, rank: int | None, *, once: bool = False,
                   last: bool = False) -> LayerCalibration:
    start = time.perf_counter()
    layer = model.get_submodule(name)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"layer {name!r} must be an nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    stats, choice = collector.layer_stats(dense_model, model, name, rank=rank, once=once)
    if last:  # the last statistics: handed-over batches are freed before this layer is fitted
        collector.release()
    if stats is None and choice.kind != "none":
        raise ValueError(f"no calibration rows reached layer {name!r}")
    dense_layer = dense_model.get_submodule(name)
    with torch.enable_grad():
        built = build(name, dense_layer, stats)
    if isinstance(built, FitResult):
        new, before, after, method = built.module, built.error_before, built.error_after, built.method
    elif isinstance(built, nn.Module):
        new, before, method, after = built, None, None, None
        if stats is not None:
            after = output_error(dense_weight(dense_layer), dense_weight(new).detach(), stats,
                                 bias=effective_bias(dense_layer), new_bias=effective_bias(new))
    else:
        raise TypeError(f"build must return an nn.Module or a FitResult, got {type(built).__name__}")
    replace_module(model, layer, new)  # a layer, never the root: the root stays
    return LayerCalibration(name, reached=True, error_before=before, error_after=after, method=method,
                            statistics=choice.note, samples=stats.samples if stats is not None else 0,
                            rows=stats.count if stats is not None else 0, seconds=time.perf_counter() - start)
