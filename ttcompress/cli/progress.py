"""Rich progress bars on the command line: training (:class:`RichProgress`, the history table) and
decomposition (:class:`DecomposeProgress`).

The library reports progress through :class:`ttcompress.training.records.TrainCallback`, the
``progress(done, total, name)`` callback of :func:`ttcompress.compression.pipeline.decompose_file` and
:class:`ttcompress.decompose.cp.CPProgress`; these are the command line's renderings of them. Bars
are drawn only when the console is a terminal: piped or redirected stderr stays clean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ttcompress.training.records import EpochRecord, TrainCallback, TrainResult

if TYPE_CHECKING:
    from ttcompress.decompose.cp import CPProgress

__all__ = ["DecomposeProgress", "RichProgress", "history_table"]


class DecomposeProgress:
    """Bars for ``decompose``: layers done of all, the CP-ALS fit of the current layer, and the
    calibration statistics pass in progress (batches through the model).

    The second bar counts ALS sweeps against the run's maximum (``n_iter_max`` times the
    restarts) and shows the current relative error and the time left, estimated from the sweeps
    so far (an upper bound: a fit stops early once it stops improving). Use as a context manager;
    pass :meth:`layer` as ``decompose_file``'s ``progress``, :meth:`cp` to
    :func:`ttcompress.decompose.cp.cp_progress` and :meth:`stats` to
    :func:`ttcompress.calibration.progress.calib_progress`.

    Parameters
    ----------
    console : rich.console.Console
        Where to draw (the CLI passes its stderr console); nothing is drawn unless it is a terminal.
    """

    def __init__(self, console: Any) -> None:
        self.enabled = bool(console.is_terminal)
        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=True, disable=not self.enabled,
        )
        self._layers = self._bar.add_task("decomposing", total=None, info="")
        self._fit = self._bar.add_task("  CP-ALS", total=None, info="", visible=False)
        self._stats = self._bar.add_task("  statistics", total=None, info="", visible=False)
        self._name = ""

    def __enter__(self) -> DecomposeProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def layer(self, done: int, total: int, name: str) -> None:
        """``decompose_file``'s callback: ``done`` of ``total`` layers built, ``name`` next."""
        self._name = name
        self._bar.update(self._layers, completed=done, total=total,
                         description=f"decomposing {name}" if name else "saving")
        self._bar.reset(self._fit, total=None, visible=False, info="")
        self._bar.reset(self._stats, total=None, visible=False, info="")

    def stats(self, stage: str, done: int, total: int) -> None:
        """:func:`~ttcompress.calibration.progress.calib_progress`'s callback: a calibration batch is through."""
        self._bar.update(self._stats, completed=done, total=total, visible=done < total,
                         description=f"  {stage}", info="batches")

    def cp(self, state: CPProgress) -> None:
        """:func:`~ttcompress.decompose.cp.cp_progress`'s callback: one CP-ALS sweep done."""
        if state.iteration == 0 and state.restart == 0:
            self._bar.reset(self._fit, total=state.n_iter_max * state.n_restarts, visible=True, info="")
        restart = f" run {state.restart + 1}/{state.n_restarts}" if state.n_restarts > 1 else ""
        self._bar.update(self._fit, completed=state.restart * state.n_iter_max + state.iteration,
                         description=f"  CP-ALS{restart}", info=f"err {state.rel_error:.4f}")


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

    def on_step(self, *, epoch: int, step: int, loss: float, accuracy: float | None, samples_per_s: float) -> None:
        self._progress.update(
            self._task, completed=step, loss=f"{loss:.4f}", acc=_pct(accuracy), speed=f"{samples_per_s:,.0f}"
        )

    def on_epoch_end(self, record: EpochRecord) -> None:
        self._progress.console.print(
            f"epoch {record.epoch}/{self._epochs}: loss {record.train_loss:.4f}, "
            + (f"train acc {_pct(record.train_accuracy)}, val acc {_pct(record.val_accuracy)}"
               if record.val_accuracy is not None else f"val loss {record.val_loss:.4f} (no accuracy: no class labels)")
            + f"{' (best)' if record.best else ''}, {record.seconds:.1f}s, {record.samples_per_s:,.0f} samples/s"
        )

    def on_train_end(self, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (idempotent); the next run starts new bars."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None


def _pct(value: float | None) -> str:
    """A fraction as a percentage; ``-`` where accuracy is not defined (no class labels)."""
    return "-" if value is None else f"{100 * value:.2f}%"


def history_table(history: Sequence[EpochRecord], *, title: str | None = None) -> Table:
    """A rich ``Table`` with one row per epoch (rendering only; the data is ``history``)."""
    table = Table(title=title, box=None, caption="* = best (saved)", padding=(0, 1), header_style="bold underline")
    for col in ("epoch", "loss", "acc", "val loss", "val acc", "top-5", "lr", "time", "samples/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in history:
        start = r.epoch == 0  # fine-tuning's starting model: validated, not trained
        table.add_row(
            f"{'start' if start else r.epoch}{' *' if r.best else ''}",
            "-" if start else f"{r.train_loss:.4f}",
            _pct(r.train_accuracy),
            f"{r.val_loss:.4f}",
            _pct(r.val_accuracy),
            "-" if r.val_top5 is None else f"{100 * r.val_top5:.2f}%",
            "-" if start else f"{r.lr:.3g}",
            f"{r.seconds:.1f}s",
            "-" if start else f"{r.samples_per_s:,.0f}",
        )
    return table
