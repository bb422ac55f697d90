"""Training, fine-tuning and evaluation: one loop, CPU/GPU, single process or ``torchrun`` DDP.

:func:`train` fits a dense baseline from scratch, :func:`finetune` recovers the accuracy of a
compressed model; both run :func:`fit`. The loop supports SGD with momentum, Adam, AdamW and
Adadelta (the optimizers compared in the TT thesis [1]_), cosine or step learning-rate schedules,
mixed precision on CUDA (bf16, or fp16 with a ``GradScaler``), ``torch.compile``, knowledge
distillation from a teacher [2]_, and training only the decomposed layers.

Files written next to ``output`` (``OUT = dir/name.ext``), each atomically and on rank 0 only:

``OUT``
    The best checkpoint by validation top-1 accuracy (on a seeded 10 % of the training split held
    out, see ``TrainConfig.val_fraction``; the test split is not used), a ttcompress checkpoint
    written with :func:`ttcompress.io.save`.
``dir/name.last.ext``
    The checkpoint after the last finished epoch (or at the moment of a Ctrl-C).
``dir/name.resume.pt``
    Resume state after each finished epoch: model, optimizer, scheduler, grad scaler, RNG
    states, history; tensors and plain containers only (``torch.load(weights_only=True)``).
``dir/name.metrics.jsonl``
    One JSON object per finished epoch (see :class:`EpochRecord`).

Determinism: the data order depends only on ``(seed, epoch)`` and the global RNG is seeded
with ``seed`` (and restored on resume), so on CPU two runs with the same seed give identical
weights and a resumed run equals an uninterrupted one.

Distributed: when ``WORLD_SIZE > 1`` (set by ``torchrun``) the loop initializes the process
group (NCCL on CUDA, gloo on CPU) unless it already is, uses ``cuda:LOCAL_RANK``, wraps the model
in ``DistributedDataParallel``, shards train and test data, and destroys the group at the end
if it created it. ``batch_size`` is per process.

References
----------
.. [1] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks",
   NeurIPS 2015.
.. [2] G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
   arXiv:1503.02531, 2015.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ttcompress.data import DatasetBundle, check_model_fits, load_dataset, make_loader
from ttcompress.errors import CheckpointError, TrainingError, UserInputError, refused_input

__all__ = [
    "AMP_MODES",
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochRecord",
    "EvalResult",
    "FinetuneConfig",
    "RichProgress",
    "RunPaths",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "finetune",
    "finetune_file",
    "fit",
    "history_table",
    "holdout_split",
    "resolve_device",
    "run_paths",
    "train",
    "train_arch",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "adadelta")
SCHEDULES: tuple[str, ...] = ("none", "cosine", "step")
AMP_MODES: tuple[str, ...] = ("bf16", "fp16")
TRAIN_ONLY: tuple[str, ...] = ("all", "decomposed")
RESUME_FORMAT = "ttcompress-resume"
#: Options that do not change a run's result: they may differ between a run and its resumption.
RESUME_FREE_OPTIONS: frozenset[str] = frozenset({"device", "num_workers", "log_every", "eval_batch_size", "compile"})


# ------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class TrainConfig:
    """Options of the training loop (defaults for training a baseline from scratch).

    Attributes
    ----------
    epochs : int, default 5
    batch_size : int, default 64
        Per process.
    optimizer : {"sgd", "adam", "adamw", "adadelta"}, default "adam"
    lr : float, default 1e-3
    momentum : float, default 0.9
        For SGD.
    weight_decay : float, default 0.0
    schedule : {"none", "cosine", "step"}, default "none"
        Stepped once per epoch: cosine annealing to 0 over ``epochs``, or ×``gamma`` every
        ``step_size`` epochs.
    step_size : int, default 1
    gamma : float, default 0.1
    seed : int, default 0
    device : str, default "auto"
        ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    amp : {"bf16", "fp16"} or None, default None
        Mixed precision, CUDA only; fp16 uses a gradient scaler.
    compile : bool, default False
        Run the model through ``torch.compile``.
    train_only : {"all", "decomposed"}, default "all"
        ``decomposed`` freezes every parameter outside the layers listed in
        ``model.ttcompress_meta["layers"]`` (BatchNorm running statistics still update).
    distill_alpha : float, default 0.5
        Weight of the distillation term when a teacher is given: ``alpha·T²·KL + (1-alpha)·CE``.
    distill_temperature : float, default 4.0
    eval_batch_size : int, default 256
    num_workers : int or None, default None
        Loader workers (None: 0 for in-memory data, else ``min(8, cpus)``).
    max_batches : int or None, default None
        Stop each epoch after this many batches (smoke tests, quick sweeps).
    log_every : int, default 10
    val_fraction : float, default 0.1
        Fraction of the training split held out (the same samples in every run, see
        :func:`holdout_split`) to validate each epoch and select the best checkpoint, so the test split never takes part in training or model
        selection. ``0`` validates on the test split instead (the old, optimistic behaviour).
        Progress updates (and, on GPU or under DDP, NaN checks) every this many steps.
    """

    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "none"
    step_size: int = 1
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: str | None = None
    compile: bool = False
    train_only: str = "all"
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    eval_batch_size: int = 256
    num_workers: int | None = None
    max_batches: int | None = None
    log_every: int = 10
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size", "eval_batch_size", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserInputError(f"{name} must be a positive int, got {v!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise UserInputError(f"max_batches must be a positive int or None, got {self.max_batches!r}")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise UserInputError(f"num_workers must be a non-negative int or None, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserInputError(f"seed must be a non-negative int, got {self.seed!r}")
        for name in ("lr", "momentum", "weight_decay", "gamma", "distill_alpha", "distill_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise UserInputError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not (
            0 <= self.val_fraction < 1
        ):
            raise UserInputError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.lr <= 0:
            raise UserInputError(f"lr must be > 0, got {self.lr!r}")
        if self.distill_alpha > 1:
            raise UserInputError(f"distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if self.distill_temperature <= 0:
            raise UserInputError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("train_only", self.train_only, TRAIN_ONLY)
        if self.amp is not None:
            _choice("amp", self.amp, AMP_MODES)
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a str, got {type(self.device).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """:class:`TrainConfig` with fine-tuning defaults: Adam at lr 1e-4, 3 epochs."""

    epochs: int = 3
    lr: float = 1e-4


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserInputError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a model on a dataset.

    Attributes
    ----------
    accuracy : float
        Top-1, fraction 0..1.
    top5 : float or None
        Top-5 fraction when asked for and the model has more than 5 outputs.
    loss : float
        Mean cross-entropy.
    n : int
        Number of samples.
    """

    accuracy: float
    top5: float | None
    loss: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch; a line of the metrics log."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_top5: float | None
    lr: float
    seconds: float
    samples_per_s: float
    best: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes (see the module docstring)."""

    best: Path
    last: Path
    resume: Path
    metrics: Path


def run_paths(output: str | os.PathLike[str]) -> RunPaths:
    """File names of a run writing ``output``: best, ``.last``, ``.resume.pt``, ``.metrics.jsonl``."""
    out = Path(output)
    stem, suffix = out.stem, out.suffix
    return RunPaths(
        best=out,
        last=out.with_name(f"{stem}.last{suffix}"),
        resume=out.with_name(f"{stem}.resume.pt"),
        metrics=out.with_name(f"{stem}.metrics.jsonl"),
    )


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    paths : RunPaths
    history : tuple of EpochRecord
        All finished epochs, including those before a resume.
    best_epoch : int or None
        Epoch of the best checkpoint (None when no epoch finished).
    best_accuracy : float or None
    start_epoch : int
        Epochs already done when this call started (non-zero after ``resume``).
    interrupted : bool
        Stopped by Ctrl-C; ``paths.last`` holds the weights at that moment.
    world_size : int
    device : str
    rank : int
        This process's rank (0 without ``torchrun``); only rank 0 writes files.
    """

    paths: RunPaths
    history: tuple[EpochRecord, ...]
    best_epoch: int | None
    best_accuracy: float | None
    start_epoch: int
    interrupted: bool
    world_size: int
    device: str
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paths"] = {k: str(v) for k, v in dataclasses.asdict(self.paths).items()}
        return d


# ----------------------------------------------------------------------------------- progress


class TrainCallback:
    """Progress hooks of :func:`fit` (called on rank 0 only). Subclass and override any."""

    def on_train_start(self, *, epochs: int, start_epoch: int, steps_per_epoch: int, device: str, world_size: int) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, *, epoch: int, steps: int) -> None:
        """Before each epoch (1-based)."""

    def on_step(self, *, epoch: int, step: int, loss: float, accuracy: float, samples_per_s: float) -> None:
        """Every ``log_every`` steps and at the end of the epoch."""

    def on_epoch_end(self, record: EpochRecord) -> None:
        """After validation and saving."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the last epoch, or after an interruption."""


class RichProgress(TrainCallback):
    """Rich progress bars with live loss, accuracy and samples/s, one line per finished epoch.

    Parameters
    ----------
    console : rich.console.Console
        Where to draw (the CLI passes its stderr console).
    """

    def __init__(self, console: Any) -> None:
        self.console = console
        self._progress: Any = None
        self._task: Any = None
        self._epochs = 0

    def on_train_start(self, *, epochs: int, start_epoch: int, steps_per_epoch: int, device: str, world_size: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._epochs = epochs
        where = device + (f" × {world_size} processes" if world_size > 1 else "")
        if start_epoch:
            self.console.print(f"resuming after epoch {start_epoch}/{epochs} on {where}")
        else:
            self.console.print(f"training {epochs} epoch(s) on {where}")
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self._progress.start()

    def on_epoch_start(self, *, epoch: int, steps: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"epoch {epoch}/{self._epochs}", total=steps, loss="-", acc="-", speed="-")

    def on_step(self, *, epoch: int, step: int, loss: float, accuracy: float, samples_per_s: float) -> None:
        self._progress.update(
            self._task, completed=step, loss=f"{loss:.4f}", acc=f"{100 * accuracy:.2f}%", speed=f"{samples_per_s:,.0f}"
        )

    def on_epoch_end(self, record: EpochRecord) -> None:
        self._progress.console.print(
            f"epoch {record.epoch}/{self._epochs}: loss {record.train_loss:.4f}, train acc "
            f"{100 * record.train_accuracy:.2f}%, val acc {100 * record.val_accuracy:.2f}%"
            f"{' (best)' if record.best else ''}, {record.seconds:.1f}s, {record.samples_per_s:,.0f} samples/s"
        )

    def on_train_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None


def history_table(history: Sequence[EpochRecord], *, title: str | None = None) -> Any:
    """A rich ``Table`` with one row per epoch (rendering only; the data is ``history``)."""
    from rich.table import Table

    table = Table(title=title, box=None, caption="* = best (saved)", padding=(0, 1), header_style="bold underline")
    for col in ("epoch", "loss", "acc", "val loss", "val acc", "top-5", "lr", "time", "samples/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in history:
        table.add_row(
            f"{r.epoch}{' *' if r.best else ''}",
            f"{r.train_loss:.4f}",
            f"{100 * r.train_accuracy:.2f}%",
            f"{r.val_loss:.4f}",
            f"{100 * r.val_accuracy:.2f}%",
            "-" if r.val_top5 is None else f"{100 * r.val_top5:.2f}%",
            f"{r.lr:.3g}",
            f"{r.seconds:.1f}s",
            f"{r.samples_per_s:,.0f}",
        )
    return table


# ------------------------------------------------------------------------------------- device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``.

    ``auto`` picks CUDA when available, otherwise the CPU.

    Raises
    ------
    ValueError
        Unknown spelling, or a device that is not available here.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, got {type(device).__name__}")
    spec = device.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserInputError("device 'mps' requested but MPS is not available")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise UserInputError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
        if not torch.cuda.is_available():
            raise UserInputError(f"device {device!r} requested but CUDA is not available (use --device auto or cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise UserInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(spec)
    raise UserInputError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")


# ------------------------------------------------------------------------------------ evaluate


def _unwrap_loader_data(data: Any) -> Dataset | DataLoader:
    if isinstance(data, DatasetBundle):
        return data.test
    if isinstance(data, (Dataset, DataLoader)):
        return data
    raise TypeError(f"data must be a DatasetBundle, Dataset or DataLoader, got {type(data).__name__}")


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[Any]:
    if amp is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _eval_sums(
    model: nn.Module, loader: Any, device: torch.device, topk: Sequence[int], amp: str | None
) -> torch.Tensor:
    """(loss sum, n, number of outputs, correct@k for each k) as a float64 tensor on ``device``."""
    sums = torch.zeros(3 + len(topk), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    logits = model(x)
                logits = logits.float()
                sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
                sums[1] += y.numel()
                sums[2] = logits.shape[1]
                kmax = min(max(topk), logits.shape[1])
                pred = logits.topk(kmax, dim=1).indices
                hit = pred.eq(y.unsqueeze(1))
                for i, k in enumerate(topk):
                    sums[3 + i] += hit[:, : min(k, kmax)].any(dim=1).sum().double()
    finally:
        model.train(was_training)
    return sums


def _sums_to_result(sums: torch.Tensor, topk: Sequence[int]) -> EvalResult:
    values = sums.tolist()
    n = int(values[1])
    if n == 0:
        return EvalResult(accuracy=float("nan"), top5=None, loss=float("nan"), n=0)
    n_outputs = int(values[2])
    acc = {k: values[3 + i] / n for i, k in enumerate(topk)}
    top1 = acc.get(1, values[3] / n)
    top5 = acc[5] if 5 in acc and n_outputs > 5 else None
    return EvalResult(accuracy=top1, top5=top5, loss=values[0] / n, n=n)


def evaluate(
    model: nn.Module,
    data: DatasetBundle | Dataset | DataLoader,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    topk: Sequence[int] = (1, 5),
    amp: str | None = None,
) -> EvalResult:
    """Top-1 (and top-5) accuracy and mean cross-entropy, in eval mode under ``no_grad``.

    Parameters
    ----------
    model : nn.Module
        Moved to ``device``; its train/eval mode is restored afterwards.
    data : DatasetBundle, Dataset or DataLoader
        A bundle is evaluated on its test split.
    device : str or torch.device, default "cpu"
        As :func:`resolve_device`.
    batch_size : int, default 256
        Ignored when ``data`` is a DataLoader.
    topk : sequence of int, default (1, 5)
        ``top5`` is reported when 5 is in ``topk`` and the model has more than 5 outputs.
    amp : {"bf16", "fp16"} or None
        Autocast dtype (CUDA).
    """
    if not topk or any(not isinstance(k, int) or k < 1 for k in topk):
        raise UserInputError(f"topk must be positive ints, got {topk!r}")
    dev = resolve_device(device)
    src = _unwrap_loader_data(data)
    loader = src if isinstance(src, DataLoader) else make_loader(src, batch_size=batch_size, shuffle=False)
    model.to(dev)
    sums = _eval_sums(model, loader, dev, tuple(topk), amp)
    return _sums_to_result(sums, tuple(topk))


# -------------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device_spec: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_spec)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec = device_spec.strip().lower()
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = resolve_device(spec)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(world, dist.get_rank(), local_rank, owns), device


def _all_reduce(t: torch.Tensor, ctx: _Dist, op: str = "sum") -> torch.Tensor:
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def _barrier(ctx: _Dist) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------- fit


def train(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    output: str | os.PathLike[str],
    config: TrainConfig | None = None,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a (dense) model from its current weights, usually fresh from :func:`build_arch`.

    Same as :func:`fit` with :class:`TrainConfig` defaults.
    """
    return fit(model, bundle, output=output, config=config or TrainConfig(), teacher=teacher,
               progress=progress, resume=resume, mode="train")  # fmt: skip


def finetune(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    output: str | os.PathLike[str],
    config: FinetuneConfig | TrainConfig | None = None,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune a (compressed) model; same as :func:`fit` with :class:`FinetuneConfig` defaults."""
    return fit(model, bundle, output=output, config=config or FinetuneConfig(), teacher=teacher,
               progress=progress, resume=resume, mode="finetune")  # fmt: skip


def fit(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    output: str | os.PathLike[str],
    config: TrainConfig,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    resume: bool = False,
    mode: str = "finetune",
) -> TrainResult:
    """Train ``model`` in place on ``bundle.train``, validate after each epoch on a held-out part of it.

    Parameters
    ----------
    model : nn.Module
        Trained in place (its final weights are those of the last epoch; the best are in
        ``output``). Its ``ttcompress_meta`` is updated with the dataset info and the run.
    bundle : DatasetBundle
    output : path
        Best checkpoint; the other files go next to it (see the module docstring).
    config : TrainConfig
    teacher : nn.Module or None
        Knowledge distillation [2]_ from this model's logits (kept frozen in eval mode).
    progress : TrainCallback or None
        Progress hooks, e.g. :class:`RichProgress` (rank 0 only).
    resume : bool, default False
        Continue from the resume state next to ``output``. Options that change the result must be
        those of the interrupted run (all but ``RESUME_FREE_OPTIONS``; ``epochs`` may change
        unless the schedule is cosine, which is stretched over them), and so must the dataset.
    mode : str, default "finetune"
        Recorded in the checkpoint's history ("train" or "finetune").

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Bad options, a model whose outputs do not match ``bundle.num_classes`` or that cannot take
        its inputs, ``train_only="decomposed"`` on a model without decomposed layers.
    TrainingError
        The loss became NaN/inf (the checkpoints of the last finished epoch are kept).
    CheckpointError
        ``resume`` without a readable resume state.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(bundle, DatasetBundle):
        raise TypeError(f"bundle must be a DatasetBundle, got {type(bundle).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    _choice("mode", mode, ("train", "finetune"))
    paths = run_paths(output)
    if paths.best.exists() and paths.best.is_dir():
        raise IsADirectoryError(f"output is a directory: {paths.best}")

    # Cheap argument checks before touching the process group or the device.
    if config.amp is not None and resolve_device_type(config.device) != "cuda":
        raise UserInputError(f"amp={config.amp!r} needs a CUDA device (device={config.device!r} resolves elsewhere)")
    resume_state = _read_resume(paths.resume, config, bundle.name) if resume else None

    ctx, device = _dist_setup(config.device)
    try:
        return _fit(model, bundle, paths=paths, config=config, teacher=teacher, progress=progress,
                    resume_state=resume_state, mode=mode, ctx=ctx, device=device)  # fmt: skip
    finally:
        if ctx.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def resolve_device_type(device: str) -> str:
    """Device type (``"cpu"``, ``"cuda"``, ``"mps"``) that ``device`` resolves to here."""
    return resolve_device(device).type


def _decomposed_names(model: nn.Module) -> list[str]:
    meta = getattr(model, "ttcompress_meta", None)
    layers = (meta or {}).get("layers") or {}
    return list(layers)


def _set_trainable(model: nn.Module, train_only: str) -> list[nn.Parameter]:
    if train_only == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    names = _decomposed_names(model)
    if not names:
        raise UserInputError("train_only='decomposed' but the model has no decomposed layers (ttcompress_meta['layers'] is empty)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        try:
            sub = model.get_submodule(name)
        except AttributeError as exc:
            raise UserInputError(f"decomposed layer {name!r} listed in the metadata is not in the model") from exc
        for p in sub.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise UserInputError("the model has no trainable parameters")
    wd = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=wd)
    return torch.optim.Adadelta(params, lr=config.lr, weight_decay=wd)


def _make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> Any:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    return None


def _read_resume(path: Path, config: TrainConfig, data: str | None = None) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no resume state at {path} (run without --resume to start over)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read resume state {path}: {' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path} is not a ttcompress resume state")
    old = state.get("config") or {}
    now = config.to_dict()
    # More (or fewer) epochs only change the result when the schedule is stretched over them.
    free = RESUME_FREE_OPTIONS | ({"epochs"} if config.schedule != "cosine" else set())
    changed = [
        f"{key} {old[key]!r} -> {now[key]!r}" for key in now if key not in free and key in old and old[key] != now[key]
    ]
    if state.get("data") is not None and data is not None and state["data"] != data:
        changed.append(f"data {state['data']!r} -> {data!r}")
    if changed:
        raise UserInputError(
            f"cannot resume {path}: options that change the result differ from the interrupted run: "
            f"{', '.join(changed)} (use the same options, or start over without resume)"
        )
    return state


def holdout_split(bundle: DatasetBundle, *, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, validation)``: a random ``fraction`` of ``bundle.train`` held out.

    The split depends only on ``seed`` and the dataset size, not on the training seed, so it is
    the same in every process, run and resume, and a model fine-tuned from a baseline is
    validated on samples the baseline never trained on. With ``fraction == 0`` the validation
    set is ``bundle.test``.
    """
    if fraction == 0:
        return bundle.train, bundle.test
    n = len(bundle.train)  # type: ignore[arg-type]
    n_val = min(max(1, round(n * fraction)), n - 1)
    if n < 2:
        raise UserInputError(f"val_fraction={fraction} needs at least 2 training samples, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(bundle.train, sorted(order[n_val:])), Subset(bundle.train, sorted(order[:n_val]))


def _shard(dataset: Dataset, ctx: _Dist) -> Dataset:
    """Every ``world_size``-th sample for this rank, without padding (exact distributed eval)."""
    if not ctx.enabled:
        return dataset
    return Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))  # type: ignore[arg-type]


def _save_checkpoint(model: nn.Module, path: Path, info: Mapping[str, Any]) -> None:
    from ttcompress.io import save

    save(model, path, info=dict(info))


def _write_metrics(path: Path, history: Sequence[EpochRecord], mode: str) -> None:
    from ttcompress.io import atomic_write

    with atomic_write(path, mode="w") as f:
        for r in history:
            f.write(json.dumps({"mode": mode, **r.to_dict()}) + "\n")


def _write_resume(path: Path, state: dict[str, Any]) -> None:
    from ttcompress.io import atomic_write

    with atomic_write(path, mode="wb") as f:
        torch.save(state, f)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _fit(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    paths: RunPaths,
    config: TrainConfig,
    teacher: nn.Module | None,
    progress: TrainCallback | None,
    resume_state: dict[str, Any] | None,
    mode: str,
    ctx: _Dist,
    device: torch.device,
) -> TrainResult:
    cb = progress if (progress is not None and ctx.main) else TrainCallback()
    model.to(device)
    check_model_fits(model, bundle, device=device)
    if teacher is not None:
        teacher.to(device).eval()  # its forward runs under no_grad; parameters are left as they are
        check_model_fits(teacher, bundle, device=device, what="teacher", require_finite=True)

    torch.manual_seed(config.seed)
    params = _set_trainable(model, config.train_only)
    optimizer = _make_optimizer(params, config)
    scheduler = _make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda") if (config.amp == "fp16" and device.type == "cuda") else None

    history: list[EpochRecord] = []
    best_acc: float | None = None
    best_epoch: int | None = None
    start_epoch = 0
    base_meta = _meta_snapshot(model)
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            if scheduler is not None and resume_state.get("scheduler") is not None:
                scheduler.load_state_dict(resume_state["scheduler"])
            if scaler is not None and resume_state.get("scaler") is not None:
                scaler.load_state_dict(resume_state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"resume state {paths.resume} does not fit this model/run: {' '.join(str(exc).split())[:300]}") from exc
        model.to(device)
        start_epoch = int(resume_state["epoch"])
        history = [EpochRecord(**r) for r in resume_state.get("history", [])]
        best_acc = resume_state.get("best_accuracy")
        best_epoch = resume_state.get("best_epoch")
        if resume_state.get("base_meta_info") is not None:
            base_meta = json.loads(resume_state["base_meta_info"])
        _set_rng_state(resume_state.get("rng", {}))

    train_set, val_set = holdout_split(bundle, fraction=config.val_fraction)
    train_loader = make_loader(
        train_set, batch_size=config.batch_size, shuffle=True, seed=config.seed, num_workers=config.num_workers,
        distributed=ctx.enabled, pin_memory=device.type == "cuda",
    )  # fmt: skip
    test_loader = make_loader(
        _shard(val_set, ctx), batch_size=config.eval_batch_size, shuffle=False, num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    steps = len(train_loader) if config.max_batches is None else min(len(train_loader), config.max_batches)

    net: nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    eval_net: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]

    n_classes = bundle.num_classes
    topk = (1, 5) if n_classes > 5 else (1,)
    check_every = 1 if (device.type == "cpu" and not ctx.enabled) else config.log_every
    interrupted = False
    cb.on_train_start(epochs=config.epochs, start_epoch=start_epoch, steps_per_epoch=steps,
                      device=str(device), world_size=ctx.world_size)  # fmt: skip

    def run_info(epoch: int, accuracy: float | None) -> dict[str, Any]:
        entry = {
            "op": mode,
            "dataset": bundle.name,
            "epochs": epoch,
            "accuracy": accuracy,
            "best_epoch": best_epoch,
            "config": config.to_dict(),
            "world_size": ctx.world_size,
            "metrics": [r.to_dict() for r in history],
        }
        return {**bundle.info(), "history": [*base_meta.get("history", []), entry]}

    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            sampler = train_loader.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            cb.on_epoch_start(epoch=epoch, steps=steps)
            net.train()
            t0 = time.perf_counter()
            run_loss = torch.zeros((), dtype=torch.float64, device=device)
            run_correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            for step, (x, y) in enumerate(train_loader, start=1):
                if step > steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, config.amp):
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(x).float()
                        if step % check_every == 0 or step == steps:
                            _raise_if_teacher_nan(t_logits, ctx, epoch, step)
                        temp = config.distill_temperature
                        kd = F.kl_div(
                            F.log_softmax(logits.float() / temp, dim=1), F.log_softmax(t_logits / temp, dim=1),
                            reduction="batchmean", log_target=True,
                        ) * (temp * temp)  # fmt: skip
                        loss = config.distill_alpha * kd + (1.0 - config.distill_alpha) * loss
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                batch = y.numel()
                seen += batch
                run_loss += loss.detach().double() * batch
                run_correct += (logits.detach().argmax(dim=1) == y).sum().double()
                if step % check_every == 0 or step == steps:
                    _raise_if_nan(run_loss, ctx, epoch, step, paths, best_epoch)
                if ctx.main and (step % config.log_every == 0 or step == steps):
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    cb.on_step(epoch=epoch, step=step, loss=run_loss.item() / seen, accuracy=run_correct.item() / seen,
                               samples_per_s=seen * ctx.world_size / elapsed)  # fmt: skip
            train_seconds = time.perf_counter() - t0
            totals = _all_reduce(torch.stack([run_loss, run_correct, torch.tensor(float(seen), dtype=torch.float64, device=device)]), ctx)
            _raise_if_nan(totals[0], ctx, epoch, steps, paths, best_epoch, reduce=False)
            lr_now = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()

            sums = _all_reduce(_eval_sums(eval_net, test_loader, device, topk, config.amp), ctx)
            sums[2] = n_classes  # summed over ranks above
            val = _sums_to_result(sums, topk)
            if not math.isfinite(val.loss):  # NaN/inf outputs: never kept, never "best"
                _raise_if_nan(torch.tensor(val.loss), ctx, epoch, steps, paths, best_epoch, reduce=False,
                              what="validation loss")  # fmt: skip
            n_seen = max(float(totals[2]), 1.0)
            improved = best_acc is None or val.accuracy > best_acc
            if improved:
                best_acc, best_epoch = val.accuracy, epoch
            record = EpochRecord(
                epoch=epoch,
                train_loss=float(totals[0]) / n_seen,
                train_accuracy=float(totals[1]) / n_seen,
                val_loss=val.loss,
                val_accuracy=val.accuracy,
                val_top5=val.top5,
                lr=float(lr_now),
                seconds=train_seconds,
                samples_per_s=n_seen / max(train_seconds, 1e-9),
                best=improved,
            )
            history.append(record)
            if ctx.main:
                if improved:
                    _save_checkpoint(model, paths.best, run_info(epoch, val.accuracy))
                _save_checkpoint(model, paths.last, run_info(epoch, val.accuracy))
                _write_metrics(paths.metrics, history, mode)
                _write_resume(
                    paths.resume,
                    {
                        "format": RESUME_FORMAT,
                        "version": 1,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": _rng_state(),
                        "best_accuracy": best_acc,
                        "best_epoch": best_epoch,
                        "history": [r.to_dict() for r in history],
                        "config": config.to_dict(),
                        "data": bundle.name,
                        "base_meta_info": json.dumps(base_meta),
                    },
                )
            _barrier(ctx)
            cb.on_epoch_end(record)
    except KeyboardInterrupt:
        interrupted = True
        if ctx.main and history:  # before the first epoch ends there is no resume state: save nothing
            with contextlib.suppress(KeyboardInterrupt):
                _save_checkpoint(
                    model, paths.last, {**run_info(epoch, history[-1].val_accuracy), "interrupted_in_epoch": epoch}
                )
    except BaseException:
        cb.on_train_end(TrainResult(paths, tuple(history), best_epoch, best_acc, start_epoch, False, ctx.world_size, str(device), ctx.rank))
        raise

    # Leave the model's metadata describing the finished run (as saved in the last checkpoint).
    if history:
        _set_info(model, run_info(history[-1].epoch, history[-1].val_accuracy))
    result = TrainResult(
        paths=paths,
        history=tuple(history),
        best_epoch=best_epoch,
        best_accuracy=best_acc,
        start_epoch=start_epoch,
        interrupted=interrupted,
        world_size=ctx.world_size,
        device=str(device),
        rank=ctx.rank,
    )
    cb.on_train_end(result)
    return result


def _meta_snapshot(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, "ttcompress_meta", None)
    info = (meta or {}).get("info") or {}
    return json.loads(json.dumps(info, default=str))


def _set_info(model: nn.Module, info: Mapping[str, Any]) -> None:
    from ttcompress.io import update_meta

    update_meta(model, info=dict(info))


def _raise_if_nan(
    value: torch.Tensor,
    ctx: _Dist,
    epoch: int,
    step: int,
    paths: RunPaths,
    best_epoch: int | None,
    *,
    reduce: bool = True,
    what: str = "loss",
) -> None:
    bad = (~torch.isfinite(value)).to(torch.float32).reshape(1)
    if reduce:
        bad = _all_reduce(bad, ctx, op="max")
    if bool(bad.item()):
        kept = (
            f"kept the checkpoints of epoch {best_epoch} ({paths.best.name}) and of the last finished epoch "
            f"({paths.last.name})"
            if best_epoch is not None
            else "no checkpoint was written"
        )
        where = f"at step {step}" if what == "loss" else "after training"
        raise TrainingError(
            f"{what} became NaN/inf in epoch {epoch} {where}; stopped and {kept}. Try a lower learning rate"
        )


def _raise_if_teacher_nan(logits: torch.Tensor, ctx: _Dist, epoch: int, step: int) -> None:
    bad = (~torch.isfinite(logits).all()).to(torch.float32).reshape(1)
    if bool(_all_reduce(bad, ctx, op="max").item()):
        raise TrainingError(
            f"the teacher's outputs are NaN/inf in epoch {epoch} at step {step}: the teacher model is broken "
            "(this is not a learning-rate problem)"
        )


# -------------------------------------------------------------------------- high-level entries


def fit_arch_kwargs(name: str, kwargs: Mapping[str, Any] | None, bundle: DatasetBundle) -> dict[str, Any]:
    """Fill a built-in architecture's shape kwargs from the dataset (explicit kwargs win).

    ``seed-cnn``/``lenet5`` get ``num_classes``, ``in_channels`` and ``input_size``; ``seed-fc3``
    gets ``num_classes`` and ``in_features``; ``torchvision:NAME`` gets ``num_classes`` unless
    ``weights`` are requested. Other names are left alone.
    """
    kw = dict(kwargs or {})
    key = name.strip().lower()
    c, h, w = (tuple(bundle.input_shape) + (1, 1, 1))[:3]
    if key in ("seed-cnn", "lenet5"):
        kw.setdefault("num_classes", bundle.num_classes)
        kw.setdefault("in_channels", int(c))
        if h == w:
            kw.setdefault("input_size", int(h))
    elif key == "seed-fc3":
        kw.setdefault("num_classes", bundle.num_classes)
        kw.setdefault("in_features", int(math.prod(bundle.input_shape)))
    elif key.startswith("torchvision:") and "weights" not in kw:
        kw.setdefault("num_classes", bundle.num_classes)
    return kw


def train_arch(
    arch: str,
    *,
    output: str | os.PathLike[str],
    arch_kwargs: Mapping[str, Any] | None = None,
    data: str = "mnist-5k",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    config: TrainConfig | None = None,
    teacher: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Build ``arch`` (seeded with ``config.seed``), then :func:`train` it on dataset ``data``.

    What ``ttcompress train`` runs. Built-in shape kwargs are filled from the dataset
    (:func:`fit_arch_kwargs`), so ``seed-cnn`` works on CIFAR-10 as well.
    """
    from ttcompress.models import build_arch

    cfg = config or TrainConfig()
    bundle = load_dataset(data, root=data_root, download=download, image_size=image_size)
    torch.manual_seed(cfg.seed)
    with refused_input():
        model = build_arch(arch, kwargs=fit_arch_kwargs(arch, arch_kwargs, bundle))
    teacher_model = _load_model(teacher, trust_pickle=trust_pickle) if teacher is not None else None
    return fit(model, bundle, output=output, config=cfg, teacher=teacher_model, progress=progress,
               resume=resume, mode="train")  # fmt: skip


def finetune_file(
    model: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    data: str = "mnist-5k",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    config: TrainConfig | None = None,
    teacher: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Load a model file with :func:`ttcompress.io.load`, then :func:`finetune` it on ``data``.

    What ``ttcompress finetune`` runs. ``teacher`` is a model file for distillation (loaded the
    same way, with the same ``trust_pickle``).
    """
    cfg = config or FinetuneConfig()
    for other, name in ((model, "model"), (teacher, "teacher")):
        if other is not None and Path(other).exists() and Path(output).exists() and Path(output).resolve() == Path(other).resolve():
            raise UserInputError(f"output must differ from the {name} file: {output}")
    bundle = load_dataset(data, root=data_root, download=download, image_size=image_size)
    net = _load_model(model, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs)
    teacher_model = _load_model(teacher, trust_pickle=trust_pickle) if teacher is not None else None
    return fit(net, bundle, output=output, config=cfg, teacher=teacher_model, progress=progress,
               resume=resume, mode="finetune")  # fmt: skip


def _load_model(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    from ttcompress import io as tio

    kwargs: dict[str, Any] = {"trust_pickle": trust_pickle}
    if arch is not None:
        kwargs["arch"] = arch
        kwargs["arch_kwargs"] = dict(arch_kwargs or {})
    with refused_input():
        return tio.load(path, **kwargs)

