"""The main job end to end on the embedded data: what ``ttcompress demo`` runs.

1. Train the ``seed-cnn`` baseline (the CP paper's MNIST net) on ``mnist-5k``.
2. Sweep CP ranks 3/6/9 on its two convolutions, once with the fully connected layers dense (the
   CP paper's experiment) and once with them in TT format at rank 8.
3. Fine-tune each compressed model.
4. Measure everything side by side and write ``report.md`` and ``tradeoff.png``.

Everything is offline and seeded. ``quick=True`` runs a reduced version (a few batches per epoch)
for the test suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttcompress.training.api import train_arch
from ttcompress.training.config import FinetuneConfig, TrainConfig
from ttcompress.training.records import TrainCallback

__all__ = ["DemoResult", "DemoSettings", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs (defaults: the full demo)."""

    train_epochs: int = 12
    finetune_epochs: int = 2
    max_batches: int | None = None
    cp_ranks: tuple[int, ...] = (3, 6, 9)
    tt_ranks: tuple[int | None, ...] = (None, 8)
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(train_epochs=1, finetune_epochs=1, max_batches=8, cp_ranks=(3,), tt_ranks=(None, 8))


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files, and the report it measured."""

    report: Any
    baseline: Path
    report_md: Path
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
    from ttcompress.fsutil import atomic_write
    from ttcompress.plot import plot_tradeoff
    from ttcompress.render import to_markdown
    from ttcompress.sweep import sweep_report, sweep_settings

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"demo output is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *_a, **_k: None)

    baseline = out / "baseline.pt"
    if baseline.is_file():
        say(f"[1/3] reusing the baseline {baseline}")
    else:
        say("[1/3] training the seed-cnn baseline on mnist-5k")
        train_config = TrainConfig(epochs=settings.train_epochs, lr=1e-3, seed=settings.seed, device="cpu",
                                   max_batches=settings.max_batches)  # fmt: skip
        train_arch("seed-cnn", output=baseline, data="mnist-5k", config=train_config, progress=progress)

    say("[2/3] sweeping CP ranks on the convolutions, FC layers dense or TT, fine-tuning each")
    finetune_config = FinetuneConfig(epochs=settings.finetune_epochs, lr=1e-3, seed=settings.seed, device="cpu",
                                     max_batches=settings.max_batches)  # fmt: skip
    report = sweep_report(
        baseline,
        settings=sweep_settings(tt_ranks=settings.tt_ranks, cp_ranks=settings.cp_ranks),
        output_dir=out / "sweep",
        data="mnist-5k",
        config=finetune_config,
        measure_speed=True,
        console=console,
        progress=progress,
    )

    say("[3/3] writing the report")
    report_md = out / "report.md"
    with atomic_write(report_md, "w", encoding="utf-8") as f:
        f.write("# ttcompress demo: seed-cnn on mnist-5k\n\n")
        f.write(to_markdown(report))
    plot = plot_tradeoff(report, out / "tradeoff.png", title="seed-cnn on mnist-5k: accuracy vs compression")
    return DemoResult(report=report, baseline=baseline, report_md=report_md, plot=plot, sweep_dir=out / "sweep")
