"""Measure models side by side: the accuracy/compression trade-off as data.

A :class:`Report` is plain data (frozen dataclasses with :meth:`Report.to_dict`); turning it into a
table, Markdown, CSV, JSON or a plot is :mod:`ttcompress.render`'s job.

Every number here is measured on the models given:

* ``params``: all parameters of the model (``sum(p.numel())``; buffers such as BatchNorm running
  statistics are not parameters);
* ``compression``: baseline params / model params;
* ``size_bytes``: size of the model file on disk (``None`` for an in-memory model);
* ``flops``: FLOPs of one forward pass on one sample, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs);
* ``latency_ms``: median wall time of one forward pass on a batch, measured with
  :class:`torch.utils.benchmark.Timer` (``latency_iqr_ms`` is the interquartile range);
* ``accuracy`` / ``top5``: fractions of the test split classified correctly (``eval_samples``
  samples; with ``eval_subset``, a seeded class-balanced subset of it);
* ``accuracy_delta``: ``accuracy - baseline accuracy`` (a fraction; negative means a loss).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.errors import UserInputError, refused_input
from ttcompress.formats import format_of
from ttcompress.fsutil import strip_model_suffix
from ttcompress.layer_report import LayerReport, count_params
from ttcompress.meta import read_meta

__all__ = [
    "ModelEntry",
    "ModelRow",
    "Report",
    "build_report",
    "count_flops",
    "count_params",
    "layer_rows",
    "measure_latency",
    "pareto_front",
]


@dataclass(frozen=True)
class ModelRow:
    """The measured figures of one model (see the module docstring for definitions)."""

    model: str
    params: int
    compression: float
    size_bytes: int | None
    flops: int
    latency_ms: float | None
    latency_iqr_ms: float | None
    accuracy: float | None
    top5: float | None
    accuracy_delta: float | None
    is_baseline: bool = False
    path: str | None = None
    setting: str | None = None
    accuracy_before_finetune: float | None = None
    layers: tuple[LayerReport, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        data["layers"] = [layer.to_dict() for layer in self.layers]
        return data


@dataclass(frozen=True)
class Report:
    """A side-by-side comparison: the baseline first, then each model."""

    rows: tuple[ModelRow, ...]
    dataset: str | None
    device: str
    batch_size: int
    eval_samples: int | None
    eval_subset: bool = False
    torch_version: str = torch.__version__

    @property
    def baseline(self) -> ModelRow:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "device": self.device,
            "batch_size": self.batch_size,
            "eval_samples": self.eval_samples,
            "eval_subset": self.eval_subset,
            "torch_version": self.torch_version,
            "rows": [row.to_dict() for row in self.rows],
        }


@dataclass(frozen=True)
class ModelEntry:
    """A model to report on: a label, the module, and where it came from (for its file size)."""

    label: str
    model: nn.Module
    path: Path | None = None
    setting: str | None = None
    accuracy_before_finetune: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def _example_input(input_shape: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_shape, generator=generator).to(device)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one sample of shape ``input_shape`` (eval mode).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: matmuls and convolutions, with a
    multiply-add as 2 FLOPs; elementwise ops are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        x = _example_input(input_shape, 1, _model_device(model))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def _import_benchmark() -> Any:
    """``torch.utils.benchmark``, without the CUDA_HOME warning its import logs on CPU-only hosts."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int,
    min_run_time: float = 0.5,
    num_threads: int | None = None,
) -> tuple[float, float]:
    """Median and interquartile range, in milliseconds, of one forward pass on a batch.

    Uses :class:`torch.utils.benchmark.Timer` (which synchronizes CUDA) in eval mode under
    ``no_grad``, after a warm-up call.
    """
    benchmark = _import_benchmark()
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        x = _example_input(input_shape, batch_size, _model_device(model))
        with torch.no_grad():
            model(x)  # warm-up (lazy init, caches, cuDNN autotuning)
            timer = benchmark.Timer(
                stmt="model(x)",
                globals={"model": model, "x": x},
                num_threads=num_threads or torch.get_num_threads(),
            )
            measurement = timer.blocked_autorange(min_run_time=min_run_time)
        return measurement.median * 1e3, measurement.iqr * 1e3
    finally:
        model.train(was_training)


def layer_rows(model: nn.Module) -> tuple[LayerReport, ...]:
    """The decomposed layers recorded in ``model``'s metadata (empty for a dense model), with the
    structure (modes and ranks) their format describes."""
    rows = []
    for name, record in read_meta(model).layers.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        fmt = format_of(layer) if layer is not None else None
        if fmt is not None:
            desc = fmt.describe(layer)
            record = dataclasses.replace(record, in_modes=desc.in_modes, out_modes=desc.out_modes, ranks=desc.ranks,
                                         detail=desc.text)
        else:  # the layer is gone (e.g. merged back to dense): the ranks its config recorded
            config = record.config or {}
            ranks = config.get("ranks", config.get("rank"))
            record = dataclasses.replace(record, ranks=(ranks,) if isinstance(ranks, int) else ranks)
        rows.append(dataclasses.replace(record, params_before=record.params_before or 0,
                                        params_after=record.params_after or 0))
    return tuple(rows)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (compression, accuracy), both to be maximized."""
    front = []
    for i, (ci, ai) in enumerate(points):
        dominated = any(
            (cj >= ci and aj >= ai) and (cj > ci or aj > ai) for j, (cj, aj) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _input_shape(model: nn.Module, data: Any | None, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if data is not None:
        return tuple(int(s) for s in data.input_shape)
    shape = read_meta(model).info.get("input_shape")
    if shape:
        return tuple(int(s) for s in shape)
    raise UserInputError(
        "the input shape is unknown: the baseline does not record one; pass data or input_shape"
    )


def build_report(
    *,
    baseline: ModelEntry,
    models: Sequence[ModelEntry],
    data: Any | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    eval_batch_size: int = 256,
    eval_limit: int | None = None,
    eval_seed: int = 0,
    min_run_time: float = 0.5,
    input_shape: Sequence[int] | None = None,
    measure_speed: bool = True,
) -> Report:
    """Measure the baseline and each model and return the report data.

    Parameters
    ----------
    baseline, models:
        What to compare; compression and accuracy change are relative to ``baseline``.
    data:
        A :class:`ttcompress.data.DatasetBundle`; accuracy is measured on its test split. ``None``
        skips accuracy (then ``input_shape`` or the models' metadata must give the input shape).
    device:
        Where latency and accuracy are measured.
    batch_size:
        Batch size of the latency measurement.
    eval_batch_size, eval_limit, eval_seed:
        Batch size of the accuracy pass, and an optional number of test samples: a class-balanced
        subset drawn with ``eval_seed`` (:func:`ttcompress.data.balanced_subset`); the report
        records it (``eval_subset``).
    min_run_time:
        Seconds spent per model in :meth:`torch.utils.benchmark.Timer.blocked_autorange`.
    measure_speed:
        ``False`` skips the latency measurement (``latency_ms`` is ``None``).
    """
    from ttcompress.data import balanced_subset, check_model_fits
    from ttcompress.evaluation import evaluate

    if eval_limit is not None and eval_limit <= 0:
        raise UserInputError(f"eval_limit must be positive, got {eval_limit}")
    device = torch.device(device)
    shape = _input_shape(baseline.model, data, input_shape)
    test_set = None
    subset = False
    if data is not None:
        test_set = data.test
        if eval_limit is not None and eval_limit < len(test_set):
            test_set = balanced_subset(test_set, eval_limit, seed=eval_seed)
            subset = True
        for entry in (baseline, *models):
            check_model_fits(entry.model.to(device), data, device=device, what=f"model {entry.label!r}")

    base_params = count_params(baseline.model)
    measured: list[dict[str, Any]] = []
    for entry in (baseline, *models):
        model = entry.model.to(device)
        params = count_params(model)
        accuracy = top5 = None
        if test_set is not None:
            result = evaluate(model, test_set, device=device, batch_size=eval_batch_size)
            accuracy, top5 = result.accuracy, result.top5
        latency = iqr = None
        if measure_speed:
            latency, iqr = measure_latency(model, shape, batch_size=batch_size, min_run_time=min_run_time)
        measured.append(
            dict(
                model=entry.label,
                params=params,
                compression=base_params / params if params else float("inf"),
                size_bytes=os.path.getsize(entry.path) if entry.path is not None else None,
                flops=count_flops(model, shape),
                latency_ms=latency,
                latency_iqr_ms=iqr,
                accuracy=accuracy,
                top5=top5,
                path=str(entry.path) if entry.path is not None else None,
                setting=entry.setting,
                accuracy_before_finetune=entry.accuracy_before_finetune,
                layers=layer_rows(model),
            )
        )
    base_acc = measured[0]["accuracy"]
    rows = tuple(
        ModelRow(
            **m,
            accuracy_delta=(m["accuracy"] - base_acc) if (m["accuracy"] is not None and base_acc is not None) else None,
            is_baseline=(i == 0),
        )
        for i, m in enumerate(measured)
    )
    return Report(
        rows=rows,
        dataset=getattr(data, "name", None),
        device=str(device),
        batch_size=batch_size,
        eval_samples=len(test_set) if test_set is not None else None,
        eval_subset=subset,
    )


def _label(path: Path, taken: set[str]) -> str:
    label = strip_model_suffix(path.name)
    if label in taken:  # same file name in two directories: add the parent to tell them apart
        label = f"{path.parent.name}/{label}"
    taken.add(label)
    return label


def report_files(
    baseline: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]],
    *,
    data: str | None = "mnist-5k",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    eval_batch_size: int = 256,
    eval_limit: int | None = None,
    min_run_time: float = 0.5,
    measure_speed: bool = True,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> Report:
    """Load the model files and measure them against ``baseline`` (what ``ttcompress report`` runs).

    ``arch``/``arch_kwargs`` name the architecture of bare state dicts (ttcompress checkpoints
    describe themselves; one that records the same ``arch`` import path is then trusted, as with
``trust_code``). ``data=None`` skips the accuracy columns. See :func:`build_report`.
    """
    from ttcompress.data import load_dataset
    from ttcompress.io import load
    from ttcompress.evaluation import resolve_device

    def entry(path: str | os.PathLike[str], taken: set[str]) -> ModelEntry:
        p = Path(path)
        kwargs: dict[str, Any] = {"trust_pickle": trust_pickle, "trust_code": trust_code}
        if arch is not None:
            from ttcompress.io import read_header

            header = read_header(p)
            if header is None:  # only bare state dicts need (and accept) arch kwargs
                kwargs.update(arch=arch, arch_kwargs=dict(arch_kwargs or {}))
            elif (header.get("arch") or {}).get("name") == arch:  # the user named this arch
                kwargs.update(arch=arch)
        label = _label(p, taken)
        with refused_input():
            return ModelEntry(label=label, model=load(p, **kwargs), path=p)

    taken: set[str] = set()
    base = entry(baseline, taken)
    others = [entry(m, taken) for m in models]
    bundle = load_dataset(data, root=data_root, download=download) if data is not None else None
    return build_report(
        baseline=base,
        models=others,
        data=bundle,
        device=resolve_device(device),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        eval_limit=eval_limit,
        min_run_time=min_run_time,
        measure_speed=measure_speed,
    )
