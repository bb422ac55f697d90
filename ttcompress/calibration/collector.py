"""One statistics collector for everything calibration asks of the data, within a memory budget.

The calibration inputs are normalised once (:func:`ttcompress.calibration.data.calib_batches`)
into a :class:`StatsCollector`; the rank allocator asks it for the dense model's input statistics
of every layer (:meth:`StatsCollector.input_stats`, one pass) and the sequential fit for one
layer's paired statistics at a time (:meth:`StatsCollector.layer_stats`).

How a layer's statistics are kept is decided before anything is allocated
(:meth:`StatsCollector.choose`), from its row length ``K``, the rank being fitted and the budget:

* **exact** (three float64 ``K x K`` Grams, :class:`~ttcompress.calibration.stats.StatsAccumulator`)
  when ``K <= 4 l`` (:data:`EXACT_SKETCH_RATIO`) -- there the Grams cost no more time than the
  sketch -- and they fit the budget;
* **sketched** (:class:`~ttcompress.calibration.stats.SketchAccumulator`, ``O(l K)``) otherwise,
  with ``l`` = :func:`sketch_rows_for` the rank, lowered to fit the budget down to
  :data:`SKETCH_MIN_ROWS`;
* **none** when even that does not fit: the layer is fitted data-free, and the reason is noted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ttcompress.modtree import eval_mode
from ttcompress.calibration.budget import check_calib_memory, exact_bytes, format_bytes, sketch_bytes
from ttcompress.calibration.data import HandedOverBatches, calib_batches
from ttcompress.calibration.progress import report_batch
from ttcompress.errors import InputError
from ttcompress.inputs import batch_size_of, call_model, input_mask, main_tensor, move_inputs
from ttcompress.calibration.stats import (
    MAX_POSITIONS,
    InputStats,
    LayerStats,
    SketchAccumulator,
    StatsAccumulator,
    _features,
)

__all__ = [
    "EXACT_SKETCH_RATIO",
    "INPUT_ROWS_PER_SKETCH_ROW",
    "SKETCH_MAX_ROWS",
    "SKETCH_MIN_ROWS",
    "SKETCH_ROWS",
    "StatsChoice",
    "StatsCollector",
    "rank_hint",
    "sketch_rows_for",
]

#: Sketch rows ``l`` when no rank is known, and the least ``l`` for any rank.
SKETCH_ROWS = 256
#: The fewest sketch rows a budget may force; below, the layer is fitted data-free.
SKETCH_MIN_ROWS = 64
#: The most sketch rows (cost per calibration row is ``O(l K)``).
SKETCH_MAX_ROWS = 1024
#: Exact Grams (when they fit the budget) for ``K <= EXACT_SKETCH_RATIO * l``: there a sketch's
#: cost per row, ``4 l`` products of length ``2K`` plus a ``2l x 2l`` eigendecomposition every ``l``
#: rows, is no less than the Grams' ``3K`` (``K`` while both models' inputs are the same), and the
#: exact statistics are exact.
EXACT_SKETCH_RATIO = 4
#: The allocator's pass (:meth:`StatsCollector.input_stats`) feeds each sketch at most this many
#: times its rows (more are mixed, see :class:`~ttcompress.calibration.stats.SketchAccumulator`):
#: rank allocation only compares spectra between layers, and every row costs ``O(l K)``.
INPUT_ROWS_PER_SKETCH_ROW = 8

#: ``progress(done, total, label)``.
ProgressFn = Callable[[int, int, str], None]


def sketch_rows_for(rank: int | None, *, out_features: int | None = None, features: int | None = None) -> int:
    """Sketch rows ``l`` for fitting at ``rank``: ``clamp(2 r, SKETCH_ROWS, SKETCH_MAX_ROWS)`` with
    ``r = min(rank, out_features, features)`` (the matrix rank the fit can use).

    Frequent Directions bounds the Gram's error by ``||A - A_r||_F^2 / (l - r)``: with ``l = 2r``
    the spectrum beyond the fitted rank is resolved to ``1 / r`` of its tail. (``4 r`` was tried
    first; ``2 r`` keeps the fits within 2 % of the exact ones in the tests and halves the
    sketch's cost, ``O(l K)`` per row.)
    """
    r = rank if rank is not None else 0
    for cap in (out_features, features):
        if cap is not None:
            r = min(r, cap)
    return int(min(SKETCH_MAX_ROWS, max(SKETCH_ROWS, 2 * r)))


def rank_hint(options: Mapping[str, Any]) -> int | None:
    """The largest rank named in a decision's options (``rank``, ``ranks``, ``in_rank``/``out_rank``), or None."""
    found: list[int] = []
    for key in ("rank", "ranks", "max_rank", "in_rank", "out_rank"):
        value = options.get(key)
        values = value if isinstance(value, (list, tuple)) else (value,)
        found += [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(found) if found else None


@dataclass(frozen=True)
class StatsChoice:
    """How one layer's statistics are kept.

    Attributes
    ----------
    kind : {"exact", "sketch", "none"}
        Exact Gram matrices, a sketch of ``rows`` rows, or none (fitted data-free).
    rows : int or None
        Sketch rows ``l`` (``kind == "sketch"``).
    bytes : int
        Bytes the statistics (and the fit's work arrays on them) take.
    note : str or None
        What the per-layer report says (sketched, or why the layer is fitted data-free).
    """

    kind: Literal["exact", "sketch", "none"]
    rows: int | None
    bytes: int
    note: str | None = None


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")




class StatsCollector:
    """The calibration inputs, normalised once, and the statistics every calibration step asks for.

    Parameters
    ----------
    calib_data : any
        Input batches in any form :func:`~ttcompress.calibration.data.calib_batches` accepts
        (a list of tensors is taken as is).
    max_samples : int, optional
        Use at most this many samples.
    memory : int or str, optional
        Budget in bytes (or a size such as ``"4G"``) for one layer's statistics (for the
        allocator's pass: all layers' together); default a quarter of the memory available on
        ``device``, at most 2 GiB (:func:`~ttcompress.calibration.budget.check_calib_memory`).
    device : torch.device or str, optional
        Where the batches and the statistics live (default: where each layer's inputs are).
    max_positions : int, default MAX_POSITIONS
        Conv layers: spatial positions kept per sample.
    progress : callable, optional
        ``progress(done, total, label)`` after each batch of a statistics pass.

    Raises
    ------
    ValueError
        ``memory`` is not a size or is below the minimum; the calibration data hold no samples.
    """

    def __init__(self, calib_data: Any, *, max_samples: int | None = None, memory: int | str | None = None,
                 device: torch.device | str | None = None, max_positions: int = MAX_POSITIONS,
                 progress: ProgressFn | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.memory = check_calib_memory(memory, self.device)
        if isinstance(calib_data, list) and calib_data and all(isinstance(x, torch.Tensor) for x in calib_data) \
                and max_samples is None:
            batches = calib_data
        else:
            batches = list(calib_batches(calib_data, max_samples=max_samples))
        if not batches:
            raise InputError("calib_data", "holds no samples")
        self.batches = [move_inputs(x, self.device) for x in batches] if self.device is not None else batches
        self.max_positions = max_positions
        self.progress = progress
        #: True once :meth:`release` dropped the batches.
        self.released = False
        #: Samples in all batches (the first dimension of each).
        self.samples = sum(batch_size_of(x) if main_tensor(x).dim() > 1 else 1 for x in self.batches)

    # ------------------------------------------------------------------------------------------
    def choose(self, module: nn.Module, *, rank: int | None = None, paired: bool = True,
               memory: int | None = None) -> StatsChoice:
        """How ``module``'s statistics will be kept under ``memory`` (default the collector's budget)."""
        groups, k = _features(module)
        budget = self.memory if memory is None else memory
        out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        ell = sketch_rows_for(rank, out_features=out, features=k)
        exact = exact_bytes(k, groups) if paired else (groups + 4) * k * k * 8
        if k <= EXACT_SKETCH_RATIO * ell and exact <= budget:
            return StatsChoice("exact", None, exact)
        while ell > SKETCH_MIN_ROWS and sketch_bytes(k, ell, groups, paired=paired) > budget:
            ell = max(SKETCH_MIN_ROWS, ell // 2)
        need = sketch_bytes(k, ell, groups, paired=paired)
        if need > budget:
            note = (f"statistics {format_bytes(min(exact, need))} > budget {format_bytes(budget)}: "
                    "fitted data-free")
            return StatsChoice("none", None, min(exact, need), note)
        return StatsChoice("sketch", ell, need, f"statistics sketched, s={ell}")

    def _accumulator(self, module: nn.Module, choice: StatsChoice, *, paired: bool, max_rows: int | None = None
                     ) -> StatsAccumulator | SketchAccumulator:
        if choice.kind == "exact":
            return StatsAccumulator(module, max_positions=self.max_positions, paired=paired, memory=self.memory)
        return SketchAccumulator(module, rows=int(choice.rows or 0), paired=paired, max_positions=self.max_positions,
                                 device=self.device, memory=self.memory, max_rows=max_rows,
                                 samples=self.samples if max_rows is not None else None)

    def release(self) -> None:
        """No more statistics will be asked for: batches handed over
        (:class:`~ttcompress.calibration.data.HandedOverBatches`) are dropped, that list emptied, so
        that the data are freed before the last layer is fitted. Other batches are left alone."""
        if isinstance(self.batches, HandedOverBatches):
            self.batches.clear()
            self.released = True

    def _check_held(self) -> None:
        if self.released:
            raise RuntimeError("the calibration batches were released: no more statistics can be taken")

    def _step(self, done: int, total: int, label: str) -> None:
        if self.progress is not None:
            self.progress(done, total, label)
        report_batch(label, done, total)  # the command line's progress bars (calibration.progress)

    # ------------------------------------------------------------------------------------------
    def input_stats(self, model: nn.Module, names: Sequence[str]) -> tuple[dict[str, InputStats], dict[str, str]]:
        """Statistics of the inputs of each layer ``names`` in ``model`` (one pass over the batches).

        All layers are collected at once, so they share the budget: each in turn gets what is
        left. Returns ``(stats by name, note by name)``; a layer without statistics (the budget
        was spent, or the batches never reach it) is left out of the first and, when it was for
        the budget, noted in the second.
        """
        self._check_held()
        accs: dict[str, StatsAccumulator | SketchAccumulator] = {}
        notes: dict[str, str] = {}
        left = self.memory
        for name in names:
            module = model.get_submodule(name)
            choice = self.choose(module, paired=False, memory=left)
            if choice.kind == "none":
                notes[name] = choice.note or "no statistics"
                continue
            left -= choice.bytes
            rows = None if choice.rows is None else INPUT_ROWS_PER_SKETCH_ROW * choice.rows
            accs[name] = self._accumulator(module, choice, paired=False, max_rows=rows)
        if not accs:  # no layer to collect (none given, or none within the budget): no forward pass
            return {}, notes

        calls: list[str] = []
        last: list[str | None] = [None]  # once batch 0 showed every layer called once: the last one

        mask: list[torch.Tensor | None] = [None]  # the batch's padding mask: padded rows stay out

        def hook(name: str) -> Callable[..., None]:
            def run(module: nn.Module, args: tuple[Any, ...]) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    x = args[0].detach()
                    accs[name].update(x, x, mask=mask[0])
                calls.append(name)
                if name == last[0]:
                    raise _StopForward  # nothing after this layer is needed
            return run

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in accs]
        try:
            with eval_mode(model), torch.no_grad():
                for i, x in enumerate(self.batches):
                    calls.clear()
                    mask[0] = input_mask(x)
                    _forward(model, x)
                    if i == 0 and len(calls) == len(accs) and set(calls) == set(accs):
                        last[0] = calls[-1]
                    self._step(i + 1, len(self.batches), "statistics")
        finally:
            for h in handles:
                h.remove()
        return {n: a.finalize_inputs() for n, a in accs.items() if a.count}, notes

    def layer_stats(self, dense_model: nn.Module, model: nn.Module, name: str, *, rank: int | None = None,
                    once: bool = False) -> tuple[LayerStats | None, StatsChoice]:
        """Paired statistics of layer ``name``: every batch through ``dense_model`` and ``model``.

        Each forward pass stops at the layer (its input captured, the rest not run) when the layer is
        known to be called once per forward: ``once`` says so, or the first batch shows it.

        Returns ``(stats, choice)``; ``stats`` is None when the budget has no room for any
        statistics of this layer (``choice.note`` says so) or no batch reached it
        (``choice.kind`` is then not ``"none"``).

        Raises
        ------
        ValueError
            The layer is called a different number of times by the two models on one batch.
        """
        self._check_held()
        dense_layer, layer = dense_model.get_submodule(name), model.get_submodule(name)
        choice = self.choose(dense_layer, rank=rank)
        if choice.kind == "none":
            return None, choice
        acc = self._accumulator(dense_layer, choice, paired=True)
        for i, x in enumerate(self.batches):
            seen_dense: list[torch.Tensor] = []
            seen: list[torch.Tensor] = []
            handles = [dense_layer.register_forward_pre_hook(_input_hook(seen_dense, stop=once)),
                       layer.register_forward_pre_hook(_input_hook(seen, stop=once))]
            try:
                with eval_mode(dense_model, model), torch.no_grad():
                    _forward(dense_model, x)
                    _forward(model, x)
            finally:
                for h in handles:
                    h.remove()
            once = once or (len(seen_dense) == len(seen) == 1)
            if len(seen_dense) != len(seen):
                raise ValueError(f"layer {name!r} was called {len(seen_dense)} times by the dense model "
                                 f"but {len(seen)} times by the compressed one on the same batch")
            for xd, xc in zip(seen_dense, seen):
                acc.update(xd, xc, mask=input_mask(x))
            self._step(i + 1, len(self.batches), f"statistics {name}")
        if acc.count == 0:
            return None, choice
        return acc.finalize(), choice


class _StopForward(BaseException):
    """Raised by an input hook once the inputs it waits for are captured (the rest of the forward
    pass is not needed). A BaseException, so that a model's own ``except Exception`` lets it pass."""


def _forward(model: nn.Module, x: Any) -> None:
    try:
        call_model(model, x)  # one tensor, or named tensors by keyword (ttcompress.inputs)
    except _StopForward:
        pass


def _input_hook(store: list[torch.Tensor], *, stop: bool = False) -> Callable[..., None]:
    """A forward pre-hook appending the layer's input to ``store``; with ``stop``, the forward pass
    ends there (for a layer known to be called once per forward)."""
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            store.append(args[0].detach())
        if stop:
            raise _StopForward
    return hook
