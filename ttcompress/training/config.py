"""Options of the training loop: :class:`TrainConfig`, :class:`FinetuneConfig` and their checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ttcompress.errors import UserInputError

__all__ = ["AMP_MODES", "OPTIMIZERS", "SCHEDULES", "STEP_SCHEDULES", "TRAIN_ONLY", "CliOption", "FinetuneConfig", "TrainConfig",
           "cli_options"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "adadelta")
SCHEDULES: tuple[str, ...] = ("none", "cosine", "step", "warmup-cosine")
#: Schedules stepped after every optimizer step (the others once per epoch).
STEP_SCHEDULES: tuple[str, ...] = ("warmup-cosine",)
AMP_MODES: tuple[str, ...] = ("bf16", "fp16")
TRAIN_ONLY: tuple[str, ...] = ("all", "decomposed")


#: Help panels of the command-line options generated from the fields (``ttcompress.cli.config_options``).
OPTIM_PANEL = "Optimization"
RUN_PANEL = "Device and run"
DISTILL_PANEL = "Distillation"


@dataclass(frozen=True)
class CliOption:
    """How a config field appears on the command line: its flag, help text, value name, help panel and
    the commands that take it (``train``, ``finetune``, ``sweep``)."""

    flag: str
    help: str
    metavar: str | None = None
    panel: str = OPTIM_PANEL
    commands: tuple[str, ...] = ("train", "finetune", "sweep")


def option(default: Any, flag: str, help: str, metavar: str | None = None, *, panel: str = OPTIM_PANEL,
           commands: tuple[str, ...] = ("train", "finetune", "sweep")) -> Any:
    """A config field with ``default`` that the command line sets with ``flag`` (its :class:`CliOption` is
    the field's ``metadata["cli"]``): the one definition of every training option of ``train``,
    ``finetune`` and ``sweep``."""
    return dataclasses.field(default=default, metadata={"cli": CliOption(flag, help, metavar, panel, commands)})


def cli_options(cls: type[TrainConfig]) -> dict[str, CliOption]:
    """Field name -> :class:`CliOption` of every field of ``cls`` the command line sets, in field order
    (a subclass that only changes a default keeps the base class's option)."""
    found: dict[str, CliOption] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            found.update({f.name: f.metadata["cli"] for f in dataclasses.fields(klass) if "cli" in f.metadata})
    return {f.name: found[f.name] for f in dataclasses.fields(cls) if f.name in found}


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
    schedule : {"none", "cosine", "step", "warmup-cosine"}, default "none"
        ``cosine`` and ``step`` are stepped once per epoch: cosine annealing to 0 over
        ``epochs``, or ×``gamma`` every ``step_size`` epochs. ``warmup-cosine`` is stepped after
        every batch: linear warm-up from 0 over the first ``warmup`` fraction of all steps, then
        cosine annealing to 0 (Loshchilov & Hutter 2017; Goyal et al. 2017).
    warmup : float, default 0.1
        Fraction of the run's steps spent warming up under ``warmup-cosine``.
    step_size : int, default 1
    gamma : float, default 0.1
    seed : int, default 0
    device : str, default "auto"
        ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    amp : {"bf16", "fp16"} or None, default None
        Mixed precision, CUDA only; fp16 uses a gradient scaler.
    compile : bool, default False
        Run the model through ``torch.compile``.
    decomposed_lr_scale : float, default 1.0
        The parameters of the decomposed layers (those listed in ``model.ttcompress_meta["layers"]``)
        train at ``lr × decomposed_lr_scale``, the rest at ``lr``.
    train_only : {"all", "decomposed"}, default "all"
        ``decomposed`` freezes every parameter outside the layers listed in
        ``model.ttcompress_meta["layers"]`` (BatchNorm running statistics still update).
    distill_alpha : float, default 0.5
        Weight of the distillation term when a teacher is given: ``alpha·T²·KL + (1-alpha)·CE``.
    distill_temperature : float, default 4.0
    distill_loss : {"auto", "kl", "mse"}, default "auto"
        The distillation term: ``kl`` (temperature-scaled KL between softmaxes over the last
        dimension, for class logits, per token for a language model's ``(batch, positions,
        vocab)`` logits) or ``mse`` (mean squared error between the outputs, for any output). ``auto``
        picks ``kl`` when the outputs are class logits (see
        :func:`~ttcompress.training.loop.distill_kind`), ``mse`` otherwise. Without targets in
        the data the distillation term is the whole loss.
    eval_batch_size : int, default 256
    num_workers : int or None, default None
        Loader workers (None: 0 for in-memory data, else ``min(8, cpus)``).
    max_batches : int or None, default None
        Stop each epoch after this many batches (smoke tests, quick sweeps).
    log_every : int, default 10
        Progress updates (and, on GPU or under DDP, NaN checks) every this many steps.
    val_fraction : float, default 0.1
        Fraction of the training split held out (the same samples in every run, see
        :func:`~ttcompress.training.loop.holdout_split`) to validate each epoch and select the
        best checkpoint, so the test split never takes part in training or model selection.
        ``0`` validates on the test split instead (the old, optimistic behaviour).
    """

    epochs: int = option(5, "--epochs", "Number of epochs.", "INT")
    batch_size: int = option(64, "--batch-size", "Batch size per process.", "INT")
    optimizer: str = option("adam", "--optimizer", "sgd (with --momentum), adam, adamw or adadelta.", "NAME")
    lr: float = option(1e-3, "--lr", "Learning rate.", "FLOAT")
    momentum: float = option(0.9, "--momentum", "SGD momentum.", "FLOAT")
    weight_decay: float = option(0.0, "--weight-decay", "Weight decay.", "FLOAT")
    schedule: str = option(
        "none", "--schedule", "Learning-rate schedule: none, cosine (per epoch, to 0 over --epochs), step (x --gamma "
        "every --step-size epochs), warmup-cosine (per batch: linear warm-up over the first 10% of the steps, then "
        "cosine to 0).", "NAME")
    step_size: int = option(1, "--step-size", "Epochs between decays of --schedule step.", "INT")
    gamma: float = option(0.1, "--gamma", "Decay factor of --schedule step.", "FLOAT")
    warmup: float = 0.1
    decomposed_lr_scale: float = 1.0
    seed: int = option(0, "--seed", "Seed for initialization, data order and dropout (same seed on CPU = same weights).",
                       "INT")
    device: str = option("auto", "--device", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps. Under "
                         "torchrun, auto/cuda use cuda:LOCAL_RANK.", "DEVICE", panel=RUN_PANEL)
    amp: str | None = option(None, "--amp", "Mixed precision on CUDA: bf16, or fp16 (with gradient scaling).",
                             "bf16|fp16", panel=RUN_PANEL)
    compile: bool = option(False, "--compile", "Run the model through torch.compile.", panel=RUN_PANEL)
    train_only: str = option("all", "--train-only", "all, or decomposed: freeze every parameter outside the TT/CP "
                             "layers.", "all|decomposed", commands=("finetune", "sweep"))
    distill_alpha: float = option(
        0.5, "--alpha", "Weight of the distillation loss: alpha*T^2*KL + (1-alpha)*CE. Data without targets trains on "
        "the distillation loss alone.", "FLOAT", panel=DISTILL_PANEL)
    distill_temperature: float = option(4.0, "--temperature", "Distillation temperature T.", "FLOAT",
                                        panel=DISTILL_PANEL)
    distill_loss: str = option(
        "auto", "--distill-loss", "Distillation loss: kl (class logits, with --temperature), mse (any output), or auto "
        "(kl for class logits, mse otherwise).", "auto|kl|mse", panel=DISTILL_PANEL)
    eval_batch_size: int = option(256, "--eval-batch-size", "Batch size for validation.", "INT", panel=RUN_PANEL)
    num_workers: int | None = option(None, "--workers", "Data loader workers (default: 0 for in-memory datasets, else "
                                     "min(8, CPUs)).", "INT", panel=RUN_PANEL)
    max_batches: int | None = option(None, "--max-batches", "Stop each epoch after this many batches (smoke tests).",
                                     "INT")
    log_every: int = 10
    val_fraction: float = option(
        0.1, "--val-fraction", "Fraction of the training split held out (the same samples in every run) to select the "
        "best epoch; 0 selects on the test split instead.", "FLOAT")

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_numbers()
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("train_only", self.train_only, TRAIN_ONLY)
        choice("distill_loss", self.distill_loss, DISTILL_LOSSES)
        if self.amp is not None:
            choice("amp", self.amp, AMP_MODES)
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a str, got {type(self.device).__name__}")

    def _check_counts(self) -> None:
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

    def _check_numbers(self) -> None:
        for name in ("lr", "momentum", "weight_decay", "gamma", "distill_alpha", "distill_temperature", "decomposed_lr_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise UserInputError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not (
            0 <= self.val_fraction < 1
        ):
            raise UserInputError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.lr <= 0:
            raise UserInputError(f"lr must be > 0, got {self.lr!r}")
        if self.decomposed_lr_scale <= 0:
            raise UserInputError(f"decomposed_lr_scale must be > 0, got {self.decomposed_lr_scale!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or not (0 <= self.warmup < 1):
            raise UserInputError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.distill_alpha > 1:
            raise UserInputError(f"distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if self.distill_temperature <= 0:
            raise UserInputError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """:class:`TrainConfig` with fine-tuning defaults: 3 epochs of Adam at lr 3e-3, warm-up + cosine per step.

    The learning rate rises linearly over the first 10 % of the steps and then anneals to 0 by
    the last one (``schedule="warmup-cosine"``, ``warmup=0.1``). Chosen by a measured grid
    (``benchmarks/finetune_recipe.py``; docs/results.md, "How the fine-tuning default was
    chosen"): on the README flow (seed-cnn at 46×, calibrated, distilled from the dense model) the
    mean drop from three dense models is 2.2 pp, against 3.0 pp for the previous default (Adam
    1e-3, constant); at ``target_ratio=10`` it gains 0.9 pp over that one.
    """

    epochs: int = 3
    lr: float = 3e-3
    schedule: str = "warmup-cosine"


#: Values of :attr:`TrainConfig.distill_loss`.
DISTILL_LOSSES: tuple[str, ...] = ("auto", "kl", "mse")


def choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``UserInputError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserInputError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
