"""What a training run produces: per-epoch records, the result, its file names, and progress hooks.

:class:`TrainCallback` is the protocol through which the loop reports progress; the rich progress
bars that implement it for the command line live in :mod:`ttcompress.cli.progress`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EpochRecord", "RunPaths", "TrainCallback", "TrainResult", "run_paths"]


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch; a line of the metrics log."""

    epoch: int
    train_loss: float
    train_accuracy: float | None  # None without class labels (accuracy is not defined)
    val_loss: float
    val_accuracy: float | None
    val_top5: float | None
    lr: float
    seconds: float
    samples_per_s: float
    best: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes (see :mod:`ttcompress.training`)."""

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
    """Outcome of :func:`~ttcompress.training.loop.fit`.

    Attributes
    ----------
    paths : RunPaths
    history : tuple of EpochRecord
        All finished epochs, including those before a resume.
    best_epoch : int or None
        Epoch of the best checkpoint (None when no epoch finished); 0 when fine-tuning kept the
        starting model because no epoch beat it on the validation split.
    best_accuracy : float or None
    start_epoch : int
        Epochs already done when this call started (non-zero after ``resume``).
    interrupted : bool
        Stopped by Ctrl-C; ``paths.last`` holds the weights at that moment.
    world_size : int
    device : str
    rank : int
        This process's rank (0 without ``torchrun``); only rank 0 writes files.
    start : EpochRecord or None
        Fine-tuning: the starting model's validation scores (epoch 0); None for ``train``.
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
    start: EpochRecord | None = None

    @property
    def kept_start(self) -> bool:
        """Fine-tuning returned the model it started from (no epoch validated better)."""
        return self.start is not None and self.best_epoch == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kept_start"] = self.kept_start
        d["paths"] = {k: str(v) for k, v in dataclasses.asdict(self.paths).items()}
        return d


class TrainCallback:
    """Progress hooks of :func:`~ttcompress.training.loop.fit` (called on rank 0 only).

    Subclass and override any; :class:`ttcompress.cli.progress.RichProgress` draws progress bars.
    """

    def on_train_start(self, *, epochs: int, start_epoch: int, steps_per_epoch: int, device: str, world_size: int) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, *, epoch: int, steps: int) -> None:
        """Before each epoch (1-based)."""

    def on_step(self, *, epoch: int, step: int, loss: float, accuracy: float | None, samples_per_s: float) -> None:
        """Every ``log_every`` steps and at the end of the epoch (``accuracy`` None without class labels)."""

    def on_epoch_end(self, record: EpochRecord) -> None:
        """After validation and saving."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the last epoch, or after an interruption."""
