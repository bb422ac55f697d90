"""The main job end to end on the embedded data: what ``ttcompress demo`` runs.

1. Train the ``seed-cnn`` baseline (the CP paper's MNIST net) on ``mnist-5k``.
2. Sweep whole-model target ratios (:data:`DemoSettings.target_ratios`, 4× to 48×): per-layer
   ranks chosen by the allocator (:mod:`ttcompress.compression.allocate`), Linear layers in TT format and
   convolutions in CP format, each decomposition calibrated on the training split as
   ``decompose --data`` does (same sample count).
3. Fine-tune each compressed model with the library's fine-tuning defaults
   (:class:`~ttcompress.training.config.FinetuneConfig`), distilling from the baseline as
   ``finetune`` does by default.
4. Measure everything side by side and write ``report.md``, ``report.json`` and ``tradeoff.png``.

Everything is offline and seeded. ``quick=True`` runs the same curve (same settings) with a few
batches per epoch, data-free and without timing (:meth:`DemoSettings.quick`), for the test suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.data import DEFAULT_CALIB_SAMPLES
from ttcompress.formats import default_format
from ttcompress.training.api import train_arch
from ttcompress.training.config import FinetuneConfig, TrainConfig
from ttcompress.training.records import TrainCallback

__all__ = ["DemoResult", "DemoSettings", "run_demo"]


def _default_formats(*layers: nn.Module) -> tuple[str, ...]:
    """The default format of each layer type (TT for Linear, CP for Conv2d), from the registry."""
    return tuple(f.name for f in (default_format(layer) for layer in layers) if f is not None)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs (defaults: the full demo).

    ``finetune_epochs=None`` and every fine-tuning option not listed here follow
    :class:`~ttcompress.training.config.FinetuneConfig`'s defaults. ``formats`` (default: the
    registry's default format of Linear and of Conv2d layers, TT and CP, the formats of the papers
    the demo reproduces) replace ``auto``, which fits every format to every layer and is several
    times slower to decompose.

    ``threads`` is torch's intra-op thread count while the demo runs (restored after; ``None`` leaves
    it as it is). One thread is the default because this net's operations are too small to share: on
    our 2-core machine the demo ran in 55 s on one thread beside another busy process, while two
    threads there slowed some epochs 40-fold (0.6 s -> 24 s) waiting for each other (docs/cli.md).
    """

    train_epochs: int = 10
    finetune_epochs: int | None = None
    max_batches: int | None = None
    target_ratios: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0, 48.0)
    formats: tuple[str, ...] = field(default_factory=lambda: _default_formats(nn.Linear(2, 2), nn.Conv2d(1, 1, 1)))
    calib_samples: int | None = DEFAULT_CALIB_SAMPLES
    measure_speed: bool = True
    seed: int = 0
    threads: int | None = 1

    @classmethod
    def quick(cls) -> DemoSettings:
        """The same curve (same target ratios and formats) with 1 epoch of 4 batches per run, data-free
        decomposition and no latency measurement: the shape of the demo in seconds, for smoke tests."""
        return cls(train_epochs=1, finetune_epochs=1, max_batches=4, calib_samples=None, measure_speed=False)

    def finetune_config(self) -> FinetuneConfig:
        """:class:`FinetuneConfig` defaults, with this demo's seed, batch limit and (if set) epochs."""
        changes: dict[str, Any] = {"seed": self.seed, "max_batches": self.max_batches}
        if self.finetune_epochs is not None:
            changes["epochs"] = self.finetune_epochs
        return dataclasses.replace(FinetuneConfig(), **changes)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files, and the report it measured."""

    report: Any
    baseline: Path
    report_md: Path
    report_json: Path
    plot: Path
    sweep_dir: Path


def run_demo(
    output_dir: str | os.PathLike[str] = "demo-output",
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    console: Any = None,
    progress: TrainCallback | None = None,
) -> DemoResult:
    """Run the demo into ``output_dir`` (created if needed) and return what it measured.

    ``console`` (a rich console, e.g. stderr) receives one line per stage and ``progress`` the hooks
    of every training run (the CLI passes :class:`ttcompress.cli.progress.RichProgress`). Re-running reuses the cached
    sweep settings in ``output_dir/sweep``, but retrains the baseline if its file is missing.
    """
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    with _intra_op_threads(settings.threads):
        return _run(Path(output_dir), settings, console, progress)


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block (unchanged for ``None``)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(out: Path, settings: DemoSettings, console: Any, progress: TrainCallback | None) -> DemoResult:
    """:func:`run_demo`'s work, with its settings resolved."""
    from ttcompress.fsutil import atomic_write
    from ttcompress.report.plot import plot_tradeoff
    from ttcompress.report.render import to_json, to_markdown
    from ttcompress.sweep import sweep_report, sweep_settings

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"demo output is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *_a, **_k: None)

    baseline = out / "baseline.pt"
    if baseline.is_file():
        say(f"[1/3] reusing the baseline {baseline}")
    else:
        say("[1/3] training the seed-cnn baseline on mnist-5k")
        train_config = TrainConfig(epochs=settings.train_epochs, seed=settings.seed, max_batches=settings.max_batches)
        train_arch("seed-cnn", output=baseline, data="mnist-5k", config=train_config, progress=progress)

    ratios = ", ".join(f"{r:g}×" for r in settings.target_ratios)
    calibrated = f"calibrated on {settings.calib_samples} samples" if settings.calib_samples else "data-free"
    say(f"[2/3] sweeping whole-model target ratios {ratios} ({' + '.join(settings.formats)}), {calibrated}, "
        "fine-tuned with distillation from the baseline")
    report = sweep_report(
        baseline,
        settings=sweep_settings(target_ratios=settings.target_ratios),
        output_dir=out / "sweep",
        data="mnist-5k",
        config=settings.finetune_config(),
        plan_options={"formats": settings.formats},
        calib_samples=settings.calib_samples,
        distill=True,
        measure_speed=settings.measure_speed,
        console=console,
        progress=progress,
    )

    say("[3/3] writing the report")
    report_md, report_json = out / "report.md", out / "report.json"
    with atomic_write(report_md, "w", encoding="utf-8") as f:
        f.write("# ttcompress demo: seed-cnn on mnist-5k\n\n")
        f.write(to_markdown(report))
    with atomic_write(report_json, "w", encoding="utf-8") as f:
        f.write(to_json(report))
    plot = plot_tradeoff(report, out / "tradeoff.png", title="seed-cnn on mnist-5k: accuracy vs compression")
    return DemoResult(report=report, baseline=baseline, report_md=report_md, report_json=report_json, plot=plot,
                      sweep_dir=out / "sweep")
