"""Measure models side by side: the accuracy/compression trade-off as data.

A :class:`Report` is plain data (frozen dataclasses with :meth:`Report.to_dict`); turning it into a
table, Markdown, CSV, JSON or a plot is :mod:`ttcompress.report.render`'s job.

Every number here is measured on the models given:

* ``params``: all parameters of the model (``sum(p.numel())``; buffers such as BatchNorm running
  statistics are not parameters);
* ``compression``: baseline params / model params;
* ``params_by_kind`` / ``compression_conv``, ``compression_linear``, ``compression_embedding``,
  ``compression_attention``: the same per layer kind (:mod:`ttcompress.report.measure`; ``None`` when
  the baseline has no layer of that kind), as papers report conv-only and FC-only ratios;
* ``size_bytes``: size of the weights alone (a safetensors file of the state dict, no metadata);
  ``file_bytes``: size of the model file on disk (``None`` for an in-memory model);
* ``flops``: FLOPs of one forward pass on one sample, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs), and
  ``flops_by_kind``;
* ``latency_ms``: median wall time of one forward pass on a batch of ``batch_size``, measured with
  :class:`torch.utils.benchmark.Timer` over interleaved rounds, every model once per round
  (:func:`ttcompress.report.measure.measure_latencies`; ``latency_iqr_ms`` is the interquartile range,
  ``latency_noisy`` marks a spread over 10 % of the median);
  ``latency_per_sample_ms`` = ``latency_ms / batch_size``; ``throughput`` = samples per second;
* ``peak_memory_bytes``: peak tensor memory of inference on one batch (weights and buffers plus
  the activations alive at once, :func:`ttcompress.report.measure.peak_memory`);
* ``accuracy`` / ``top5``: fractions of the test split classified correctly (``eval_samples``
  samples; with ``eval_subset``, a seeded class-balanced subset of it);
* ``accuracy_delta``: ``accuracy - baseline accuracy`` (a fraction; negative means a loss).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.modtree import eval_mode
from ttcompress.errors import InputError, UserInputError
from ttcompress.checkpoint.usercode import import_callable
from ttcompress.formats import format_of, layer_classes
from ttcompress.fsutil import strip_model_suffix
from ttcompress.layer_report import DENSE_FORMAT, KEPT_DENSE_INFO, LayerReport, count_params
from ttcompress.checkpoint.meta import read_meta
from ttcompress.data.bundle import sample_parts
from ttcompress.report.measure import (
    KINDS, NOISY_SPREAD, count_flops, example_batch, flops_by_kind, measure_latencies, measure_latency, params_by_kind,
    peak_memory, weights_bytes,
)
from ttcompress.inputs import call_model, move_inputs
from ttcompress.outputs import primary_output

__all__ = [
    "BUILTIN_METRICS",
    "ModelEntry",
    "ModelRow",
    "Report",
    "build_report",
    "count_flops",
    "count_params",
    "layer_rows",
    "lower_is_better",
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
    params_by_kind: Mapping[str, int] = field(default_factory=dict)
    compression_by_kind: Mapping[str, float | None] = field(default_factory=dict)
    flops_by_kind: Mapping[str, int] = field(default_factory=dict)
    batch_size: int | None = None
    peak_memory_bytes: int | None = None
    file_bytes: int | None = None
    metric: float | None = None  # the user's metric (``Report.metric_name``) on the test split
    #: The model's outputs hold NaN or Inf (on two test samples, or an example input without data):
    #: its accuracy and metric mean nothing.
    non_finite: bool = False

    @property
    def latency_per_sample_ms(self) -> float | None:
        return None if self.latency_ms is None or not self.batch_size else self.latency_ms / self.batch_size

    @property
    def latency_noisy(self) -> bool:
        """The latency's IQR is over :data:`ttcompress.report.measure.NOISY_SPREAD` of its median (a busy machine)."""
        if self.latency_ms is None or self.latency_iqr_ms is None or self.latency_ms <= 0:
            return False
        return self.latency_iqr_ms / self.latency_ms > NOISY_SPREAD

    @property
    def throughput(self) -> float | None:
        """Samples per second of inference at ``batch_size``."""
        per = self.latency_per_sample_ms
        return None if not per else 1e3 / per

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["params_by_kind"] = dict(self.params_by_kind)
        data["flops_by_kind"] = dict(self.flops_by_kind)
        data.pop("compression_by_kind")
        for kind in KINDS:  # compression_conv, compression_linear, ...: null when the model has none
            data[f"compression_{kind}"] = self.compression_by_kind.get(kind)
        data["latency_per_sample_ms"] = self.latency_per_sample_ms
        data["throughput"] = self.throughput
        data["latency_noisy"] = self.latency_noisy
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
    metric_name: str | None = None
    data_split: str | None = None
    targets: str | None = None

    @property
    def baseline(self) -> ModelRow:
        return self.rows[0]

    def meta(self) -> dict[str, Any]:
        """What the numbers were measured on: data, samples, device, batch size, versions."""
        from ttcompress._version import __version__

        return {
            "dataset": self.dataset,
            "eval_samples": self.eval_samples,
            "eval_subset": self.eval_subset,
            "data_split": self.data_split,
            "targets": self.targets,
            "metric": self.metric_name,
            "device": self.device,
            "batch_size": self.batch_size,
            "torch_version": self.torch_version,
            "ttcompress_version": __version__,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta(), "rows": [row.to_dict() for row in self.rows]}


@dataclass(frozen=True)
class ModelEntry:
    """A model to report on: a label, the module, and where it came from (for its file size)."""

    label: str
    model: nn.Module
    path: Path | None = None
    setting: str | None = None
    accuracy_before_finetune: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


#: Dense layer types the report's per-layer section lists (beside every factorized layer).
LISTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention)

#: Reason shown for a dense layer of a compressed model whose checkpoint records none (made before
#: ttcompress recorded :data:`~ttcompress.layer_report.KEPT_DENSE_INFO`).
NO_REASON = "not compressed (no reason recorded)"


def layer_rows(model: nn.Module) -> tuple[LayerReport, ...]:
    """Every layer of a compressed model, in module order: each factorized layer recorded in
    ``model``'s metadata (with the structure its format describes) and each Linear / Conv2d /
    Embedding / MultiheadAttention left dense, with the reason its compression run recorded
    (:data:`~ttcompress.layer_report.KEPT_DENSE_INFO`). Empty for a model nothing was compressed in."""
    meta = read_meta(model)
    if not meta.layers:
        return ()
    reasons = meta.info.get(KEPT_DENSE_INFO) or {}
    rows: dict[str, LayerReport] = {}
    inside: tuple[str, ...] = ()  # factorized layers whose children are parts, not layers
    for name, module in model.named_modules():
        if inside and any(name.startswith(p + ".") for p in inside):
            continue
        if name in meta.layers:
            rows[name] = _compressed_layer_row(model, name, meta.layers[name])
        elif isinstance(module, LISTED_TYPES):
            n = count_params(module)
            shape = tuple(module.weight.shape) if isinstance(getattr(module, "weight", None), torch.Tensor) else ()
            rows[name] = LayerReport(name, DENSE_FORMAT, type=type(module).__name__, shape=shape, params_before=n,
                                     params_after=n, skipped=str(reasons.get(name, NO_REASON)))
        else:
            continue
        if isinstance(module, (*layer_classes(), nn.MultiheadAttention)):
            inside += (name,)
    for name, record in meta.layers.items():  # recorded under a name the model no longer has
        rows.setdefault(name, _compressed_layer_row(model, name, record))
    return tuple(rows.values())


def _compressed_layer_row(model: nn.Module, name: str, record: LayerReport) -> LayerReport:
    """A recorded layer with the structure (modes and ranks) its format describes."""
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
    return dataclasses.replace(record, params_before=record.params_before or 0, params_after=record.params_after or 0)


#: Metrics built in by name (``report --metric perplexity``), each lower-is-better.
BUILTIN_METRICS = ("perplexity",)


def lower_is_better(metric_name: str | None) -> bool:
    """Whether the named metric improves downwards (a built-in one: perplexity)."""
    return metric_name in BUILTIN_METRICS


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
    raise InputError("input_shape", "is unknown: the baseline does not record one; pass data or the input shape")


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
    metric: Callable[[torch.Tensor, torch.Tensor | None], float] | str | None = None,
    metric_name: str | None = None,
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
    metric, metric_name:
        A user metric ``metric(outputs, targets) -> float``, called once per model on its outputs
        over the (possibly limited) test split, concatenated, and the targets concatenated (None
        when the data has none); its value is ``ModelRow.metric``, its name ``Report.metric_name``
        (default: the callable's ``__name__``). Needs ``data``. Accuracy is measured only when
        the data has class labels. ``metric="perplexity"`` is built in: the token-level
        perplexity of a causal language model on the test (validation) split, padding and the
        first position left out (:func:`ttcompress.report.evaluation.perplexity`); lower is better.
    """
    if isinstance(metric, str):
        if metric not in BUILTIN_METRICS:
            raise UserInputError(f"metric must be a callable or one of {', '.join(BUILTIN_METRICS)}; got {metric!r}")
        metric_name = metric
    if eval_limit is not None and eval_limit <= 0:
        raise UserInputError(f"eval_limit must be positive, got {eval_limit}")
    if metric is not None and data is None:
        raise UserInputError("metric needs data to evaluate on")
    if metric is not None and metric_name is None:
        metric_name = getattr(metric, "__name__", "metric")
    device = torch.device(device)
    shape = _input_shape(baseline.model, data, input_shape)
    test_set, subset = _test_split(data, (baseline, *models), device=device, eval_limit=eval_limit, eval_seed=eval_seed)
    options = dict(device=device, shape=shape, batch_size=batch_size, eval_batch_size=eval_batch_size,
                   measure_speed=measure_speed, metric=metric, metric_name=metric_name)
    base = dict(base_params=count_params(baseline.model), base_kinds=params_by_kind(baseline.model))
    entries = (baseline, *models)
    measured = [_measure_entry(entry, data, test_set, **base, **options) for entry in entries]
    if measure_speed:
        timed = measure_latencies([e.model for e in entries], shape, batch_size=batch_size, min_run_time=min_run_time)
        for m, t in zip(measured, timed):
            m["latency_ms"], m["latency_iqr_ms"] = t.median_ms, t.iqr_ms
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
        metric_name=metric_name,
        data_split=getattr(data, "split", None),
        targets=getattr(data, "targets", None),
    )


def _test_split(
    data: Any | None,
    entries: Sequence[ModelEntry],
    *,
    device: torch.device,
    eval_limit: int | None,
    eval_seed: int,
) -> tuple[Any | None, bool]:
    """The (possibly class-balanced, limited) test split and whether it is a subset.

    Also checks that every model runs on ``data`` (:func:`ttcompress.data.check_model_fits`).
    """
    from ttcompress.data import balanced_subset, check_model_fits

    if data is None:
        return None, False
    test_set = data.test
    subset = False
    if eval_limit is not None and eval_limit < len(test_set):
        test_set = balanced_subset(test_set, eval_limit, seed=eval_seed)
        subset = True
    for entry in entries:
        check_model_fits(entry.model.to(device), data, device=device, what=f"model {entry.label!r}")
    return test_set, subset


def _path_bytes(path: Path) -> int:
    """Size of a model file, or of a model directory's files (a Hugging Face directory)."""
    p = Path(path)
    return sum(q.stat().st_size for q in p.iterdir() if q.is_file()) if p.is_dir() else p.stat().st_size


def _outputs_non_finite(model: nn.Module, test_set: Any | None, shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether ``model`` gives NaN or Inf on two test samples (an example input of ``shape`` without data)."""
    from torch.utils.data import default_collate

    try:
        if test_set is not None and len(test_set):  # a tensor, or named tensors (input_ids, attention_mask)
            x = default_collate([sample_parts(test_set[i])[0] for i in range(min(2, len(test_set)))])
        else:
            x = example_batch(model, shape, 2)
        with eval_mode(model), torch.no_grad():
            out = primary_output(call_model(model, move_inputs(x, device)))
    except Exception:  # noqa: BLE001 - a model that cannot run is reported by the measurements themselves
        return False
    return out.is_floating_point() and not bool(torch.isfinite(out).all())


def _measure_entry(
    entry: ModelEntry,
    data: Any | None,
    test_set: Any | None,
    *,
    device: torch.device,
    shape: tuple[int, ...],
    base_params: int,
    base_kinds: dict[str, int],
    batch_size: int,
    eval_batch_size: int,
    measure_speed: bool,
    metric: Callable[[torch.Tensor, torch.Tensor | None], float] | str | None,
    metric_name: str | None,
) -> dict[str, Any]:
    """One model's :class:`ModelRow` fields except ``accuracy_delta`` and ``is_baseline``."""
    from ttcompress.report.evaluation import evaluate, perplexity

    model = entry.model.to(device)
    non_finite = _outputs_non_finite(model, test_set, shape, device)
    params = count_params(model)
    kinds = params_by_kind(model)
    accuracy = top5 = value = None
    if test_set is not None and data.has_labels:
        result = evaluate(model, test_set, device=device, batch_size=eval_batch_size)
        accuracy, top5 = result.accuracy, result.top5
    if metric == "perplexity" and test_set is not None:
        value = perplexity(model, test_set, device=device, batch_size=eval_batch_size)
    elif metric is not None and test_set is not None:
        value = _user_metric(metric, metric_name or "metric", model, test_set, device, eval_batch_size)
    return dict(
        non_finite=non_finite,
        model=entry.label,
        params=params,
        compression=base_params / params if params else float("inf"),
        size_bytes=weights_bytes(model),
        file_bytes=_path_bytes(entry.path) if entry.path is not None else None,
        flops=(flops := flops_by_kind(model, shape))["total"],
        flops_by_kind={k: v for k, v in flops.items() if k != "total"},
        params_by_kind=kinds,
        compression_by_kind={
            k: (base_kinds[k] / kinds[k] if kinds[k] else float("inf")) if base_kinds[k] else None
            for k in KINDS
        },
        batch_size=batch_size,
        peak_memory_bytes=peak_memory(model, shape, batch_size=batch_size) if measure_speed else None,
        latency_ms=None,  # measured for all models at once, interleaved (build_report)
        latency_iqr_ms=None,
        accuracy=accuracy,
        top5=top5,
        path=str(entry.path) if entry.path is not None else None,
        setting=entry.setting,
        accuracy_before_finetune=entry.accuracy_before_finetune,
        layers=layer_rows(model),
        metric=value,
    )


def _user_metric(
    metric: Callable[[torch.Tensor, torch.Tensor | None], float],
    name: str,
    model: nn.Module,
    test_set: Any,
    device: torch.device,
    batch_size: int,
) -> float:
    """``metric(outputs, targets)`` on the whole test split, checked to be a real number."""
    from ttcompress.data import make_loader
    from ttcompress.report.evaluation import model_outputs

    outputs, targets = model_outputs(model, make_loader(test_set, batch_size=batch_size, shuffle=False), device)
    try:
        value = metric(outputs, targets)
    except Exception as exc:  # the user's code may raise anything
        raise UserInputError(f"metric {name!r} raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserInputError(f"metric {name!r} must return a number, got {type(value).__name__}")
    return float(value)


def _same_file(arch: str, p: Path) -> bool:
    """True if the ``--arch`` value names the file ``p`` itself (the dense model given as its own arch)."""
    try:
        return Path(arch).resolve() == p.resolve()
    except (OSError, ValueError):
        return False


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
    input_shape: Sequence[int] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    labels: Sequence[str] | None = None,
    metric: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
) -> Report:
    """Load the model files and measure them against ``baseline`` (what ``ttcompress report`` runs).

    ``labels`` names the rows (baseline first, one per file, unique); by default a row is named
    after its file.

    ``arch``/``arch_kwargs`` name the architecture of bare state dicts (ttcompress checkpoints
    describe themselves; one that records the same ``arch`` import path is then trusted, as with
``trust_code``). ``data=None`` skips the accuracy columns. ``metric`` is the import path
    (``package.module:callable``) of a user metric, imported because the caller named it, or
    ``"perplexity"`` (see :func:`build_report`). ``text:`` data is tokenized with ``tokenizer``
    (default: the baseline's, :func:`ttcompress.data.text_tokenizer`) into sequences of
    ``seq_len`` tokens. See :func:`build_report`.
    """
    builtin = metric is not None and metric.strip() in BUILTIN_METRICS
    metric_fn: Any = metric.strip() if builtin else import_callable(metric, what="metric") if metric is not None else None
    from ttcompress.data import load_dataset, text_tokenizer
    from ttcompress.checkpoint.io import load
    from ttcompress.report.evaluation import resolve_device

    paths = [baseline, *models]
    if labels is not None:
        labels = [str(label).strip() for label in labels]
        if len(labels) != len(paths):
            raise UserInputError(f"labels must name each of the {len(paths)} models (baseline first), got {len(labels)}")
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise UserInputError(f"labels must be unique and non-empty, got {labels}")

    def entry(path: str | os.PathLike[str], taken: set[str]) -> ModelEntry:
        p = Path(path)
        kwargs: dict[str, Any] = {"trust_pickle": trust_pickle, "trust_code": trust_code}
        if arch is not None and not _same_file(arch, p):  # --arch the baseline's own file: loads as is
            from ttcompress.checkpoint.io import read_header

            header = read_header(p)
            if header is None:  # only bare state dicts need (and accept) arch kwargs
                kwargs.update(arch=arch, arch_kwargs=dict(arch_kwargs) if arch_kwargs else None)
            elif header.get("arch") is None or (header.get("arch") or {}).get("name") == arch:
                kwargs.update(arch=arch)  # a file that records no arch, or the user named this one
        label = labels[len(taken)] if labels is not None else _label(p, taken)
        taken.add(label)
        return ModelEntry(label=label, model=load(p, **kwargs), path=p)

    taken: set[str] = set()
    base = entry(baseline, taken)
    others = [entry(m, taken) for m in models]
    bundle = load_dataset(data, root=data_root, download=download, tokenizer=text_tokenizer(data, tokenizer, baseline),
                          seq_len=seq_len) if data is not None else None  # fmt: skip
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
        input_shape=input_shape,
        metric=metric_fn,
        metric_name=metric.strip() if metric is not None else None,
    )
