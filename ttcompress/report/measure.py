"""What a report measures on one model: parameters and FLOPs by layer kind, latency, throughput,
peak memory and the size of the weights.

Layer kinds
-----------
Every parameter belongs to the outermost module that has a *kind*: ``conv`` (``nn.Conv1d/2d/3d``
and every factorized layer whose format compresses convolutions), ``linear`` (``nn.Linear``, GPT-2's
``Conv1D``, and the factorized layers of formats that compress Linear layers), ``embedding``
(``nn.Embedding``/``EmbeddingBag`` and their factorized forms) and ``attention``
(``nn.MultiheadAttention`` and its factorized replacement, projections included); everything else
(normalization, biases of other modules, ...) is ``other``. Factorized layers are matched through
the format registry, so a new format is counted under the kind of the dense layer it replaces.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttcompress.modtree import eval_mode
from ttcompress.formats import format_of
from ttcompress.inputs import MASK_KEY, call_model
from ttcompress.layer_report import count_params
from ttcompress.memory import check_allocation

__all__ = [
    "KINDS",
    "NOISY_SPREAD",
    "count_flops",
    "count_params",
    "example_batch",
    "example_input",
    "flops_by_kind",
    "layer_kind",
    "LatencyStats",
    "measure_latencies",
    "measure_latency",
    "params_by_kind",
    "time_interleaved",
    "peak_memory",
    "weights_bytes",
]

#: The layer kinds a report breaks parameters and FLOPs down by (plus ``other``).
KINDS: tuple[str, ...] = ("conv", "linear", "embedding", "attention")

_DENSE_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.Linear,), "linear"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding"),
    ((nn.MultiheadAttention,), "attention"),
)
# Factorized layers that replace a whole parent module expose its inverse under one of these names.
_INVERSE_KINDS = (("to_mha", "attention"), ("to_embedding", "embedding"), ("to_conv", "conv"), ("to_linear", "linear"))


def _dense_kind(cls: type) -> str | None:
    for types, kind in _DENSE_KINDS:
        if issubclass(cls, types):
            return kind
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):  # GPT-2's transposed Linear
        return "linear"
    return None


def layer_kind(module: nn.Module) -> str | None:
    """``conv``, ``linear``, ``embedding``, ``attention`` or None (see the module docstring)."""
    kind = _dense_kind(type(module))
    if kind is not None:
        return kind
    fmt = format_of(module)
    if fmt is not None:
        for target in fmt.targets:
            kind = _dense_kind(target)
            if kind is not None:
                return kind
    for method, kind in _INVERSE_KINDS:
        if callable(getattr(module, method, None)):
            return kind
    return None


def _outermost(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module with a kind whose ancestors have none."""
    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
        kind = layer_kind(module)
        if kind is not None:
            yield prefix, module, kind
            return
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def params_by_kind(model: nn.Module) -> dict[str, int]:
    """Parameters per layer kind and ``other``; shared parameters counted once, under their first kind."""
    seen: set[int] = set()
    counts = dict.fromkeys((*KINDS, "other"), 0)
    for _name, module, kind in _outermost(model):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counts[kind] += p.numel()
    counts["other"] = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    return counts


def example_input(model: nn.Module, input_shape: Sequence[int], batch: int) -> torch.Tensor:
    """A seeded batch for ``model``: token ids below the vocabulary size for a model that takes
    ``input_ids`` (a transformers language model, duck-typed), else standard normal floats; a batch
    larger than the memory available is a ``MemoryError`` before anything is allocated."""
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    check_allocation(batch * math.prod(input_shape) * 8, f"an input batch of {batch} x {list(input_shape)}")
    if getattr(model, "main_input_name", None) == "input_ids" and isinstance(vocab, int) and vocab > 0:
        x = torch.randint(0, vocab, (batch, *input_shape), generator=generator)
    else:
        x = torch.randn(batch, *input_shape, generator=generator)
    return x.to(_model_device(model))


def example_batch(model: nn.Module, input_shape: Sequence[int], batch: int) -> Any:
    """:func:`example_input`, as the keyword inputs ``{"input_ids", "attention_mask"}`` (every
    position kept) for a model that takes ``input_ids``: how the model runs on text data."""
    x = example_input(model, input_shape, batch)
    if getattr(model, "main_input_name", None) == "input_ids" and not x.is_floating_point():
        return {"input_ids": x, MASK_KEY: torch.ones_like(x)}
    return x


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class _factorized:  # noqa: N801 - used like a function
    """Layers that may evaluate through a merged dense kernel when that measures faster (their
    ``evaluation`` attribute) evaluate factorized for the ``with`` block, so FLOPs describe the
    compressed structure rather than a timing-dependent choice."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(m, m.evaluation) for m in model.modules() if isinstance(getattr(m, "evaluation", None), str)]

    def __enter__(self) -> None:
        for module, _ in self.saved:
            module.evaluation = "factorized"

    def __exit__(self, *exc: Any) -> None:
        for module, value in self.saved:
            module.evaluation = value


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                *_args: Any, **_kwargs: Any) -> int:
    """``softmax(q k^T) v``: two batched matmuls, ``2 * 2 * B * H * L * S * E`` (as torch counts the
    CUDA kernels; torch 2.14 counts nothing for the CPU one)."""
    *batch, length, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * length * s * (e + ev)


_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def flops_by_kind(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs of one forward pass on one sample, per layer kind, plus ``other`` and ``total``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, a
    multiply-add as 2 FLOPs, elementwise ops not counted), attributed to the outermost module of a
    kind that ran them. Layers that can also run through a merged dense kernel are counted in their
    factorized evaluation.
    """
    from torch.utils.flop_counter import FlopCounterMode

    owners = {name: kind for name, _m, kind in _outermost(model)}
    # nn.MultiheadAttention's (and TransformerEncoderLayer's) fused inference kernel is invisible to
    # FlopCounterMode (it counted 0): count the same attention through its plain ops instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with (eval_mode(model), _factorized(model), torch.no_grad(),
              FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter):
            call_model(model, example_batch(model, input_shape, 1))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    total = int(counter.get_total_flops())
    counts = dict.fromkeys((*KINDS, "other"), 0)
    root = type(model).__name__
    for path, ops in counter.get_flop_counts().items():
        # FlopCounterMode names modules "RootClass.qualified.name"; "Global" is the total.
        if not path.startswith(root + "."):
            continue
        name = path[len(root) + 1:]
        if name in owners:
            counts[owners[name]] += int(sum(ops.values()))
    counts["other"] = total - sum(counts[k] for k in KINDS)
    counts["total"] = total
    return counts


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one sample of shape ``input_shape`` (see :func:`flops_by_kind`)."""
    return flops_by_kind(model, input_shape)["total"]


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

    One model's :func:`measure_latencies`: eval mode, ``no_grad``, warm-up, then at least
    :data:`MIN_ROUNDS` timed blocks and ``min_run_time`` seconds.
    """
    stats = measure_latencies([model], input_shape, batch_size=batch_size, min_run_time=min_run_time,
                              num_threads=num_threads)[0]
    return stats.median_ms, stats.iqr_ms


#: Relative spread (IQR / median) above which a latency is flagged as unsteady.
NOISY_SPREAD = 0.10
#: Timing rounds at least: each model is timed once per round, the models in turn.
MIN_ROUNDS = 7


@dataclass(frozen=True)
class LatencyStats:
    """One model's forward latency, in milliseconds per call (a batch), over interleaved rounds.

    Attributes
    ----------
    median_ms : float
        Median over the rounds of the mean time per call within a round.
    iqr_ms : float
        Interquartile range of those round times.
    rounds : int
        Rounds timed (each a block of ``calls_per_round`` calls).
    calls_per_round : int
    """

    median_ms: float
    iqr_ms: float
    rounds: int
    calls_per_round: int

    @property
    def spread(self) -> float:
        """``iqr / median``: above :data:`NOISY_SPREAD` the number is not steady."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.tensor(sorted(values), dtype=torch.float64).quantile(q))


def time_interleaved(
    calls: Sequence[Callable[[], Any]],
    *,
    min_run_time: float = 0.5,
    num_threads: int | None = None,
    min_rounds: int = MIN_ROUNDS,
) -> list[LatencyStats]:
    """Time several zero-argument calls like a benchmark: warmed up, then interleaved.

    Each call is warmed up (three calls: lazy init, path choices, allocator caches) and its calls
    per block are sized so a block takes about ``min_run_time / min_rounds`` seconds. Then the
    calls are timed in turn, one block each per round, for at least ``min_rounds`` rounds and
    until every one has had ``min_run_time`` seconds: a change of machine load during the
    measurement touches every one alike instead of whichever happened to run then, so two copies
    of one model agree. Blocks are timed with :class:`torch.utils.benchmark.Timer` (which
    synchronizes CUDA). The result is the median and IQR of the per-call times of the blocks.
    """
    benchmark = _import_benchmark()
    if not calls:
        return []
    threads = num_threads or torch.get_num_threads()
    block_s = max(min_run_time / max(min_rounds, 1), 1e-3)
    timers, counts = [], []
    for call in calls:
        timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
        once = timer.timeit(3).mean  # warm-up, and the time of one call
        timers.append(timer)
        counts.append(max(1, int(block_s / max(once, 1e-9))))
    times: list[list[float]] = [[] for _ in calls]
    spent = [0.0] * len(calls)
    rounds = 0
    while rounds < min_rounds or min(spent) < min_run_time:
        for i in range(len(calls)):
            j = (i + rounds) % len(calls)  # rotate who goes first
            per_call = timers[j].timeit(counts[j]).mean
            times[j].append(per_call)
            spent[j] += per_call * counts[j]
        rounds += 1
    return [
        LatencyStats(median_ms=_quantile(t, 0.5) * 1e3, iqr_ms=(_quantile(t, 0.75) - _quantile(t, 0.25)) * 1e3,
                     rounds=rounds, calls_per_round=c)
        for t, c in zip(times, counts)
    ]


def measure_latencies(
    models: Sequence[nn.Module],
    input_shape: Sequence[int],
    *,
    batch_size: int,
    min_run_time: float = 0.5,
    num_threads: int | None = None,
    min_rounds: int = MIN_ROUNDS,
) -> list[LatencyStats]:
    """Forward latency of several models on a batch, in eval mode under ``no_grad``, interleaved
    (:func:`time_interleaved`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    with contextlib.ExitStack() as stack, torch.no_grad():
        calls = []
        for model in models:
            stack.enter_context(eval_mode(model))
            x = example_batch(model, input_shape, batch_size)
            calls.append(functools.partial(call_model, model, x))
        return time_interleaved(calls, min_run_time=min_run_time, num_threads=num_threads, min_rounds=min_rounds)


class _LiveTensors:
    """Counts the bytes of tensor storages created by ops while active, and their peak."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size and key not in self.live:
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)


def peak_memory(model: nn.Module, input_shape: Sequence[int], *, batch_size: int) -> int:
    """Peak bytes of inference on one batch: parameters and buffers, plus the largest total of
    tensors alive at once during the forward pass (eval mode, no grad).

    On CUDA this is ``torch.cuda.max_memory_allocated`` during the pass; elsewhere every storage
    that an op creates is tracked (a :class:`~torch.utils._python_dispatch.TorchDispatchMode`)
    until it is freed, so the figure is the framework's tensor memory, not the process's RSS.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    device = _model_device(model)
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with eval_mode(model), torch.no_grad():
        x = example_batch(model, input_shape, batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            call_model(model, x)
            torch.cuda.synchronize(device)
            return resident + torch.cuda.max_memory_allocated(device) - base
        live = _LiveTensors()

        class _Track(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        live.add(t)
                return out

        for t in (x.values() if isinstance(x, dict) else (x,)):
            live.add(t)
        with _Track():
            call_model(model, x)
    return resident + live.peak


def weights_bytes(model: nn.Module) -> int:
    """Size of the model's weights alone, as a safetensors file of its state dict (each tensor
    shared under several names stored once), without any metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    return len(save(tensors))
