"""``ttcompress report``: the accuracy/compression trade-off of models side by side.

A thin shell over :func:`ttcompress.report.report_files` and :mod:`ttcompress.render`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import cli_errors, err, out
from ttcompress.cli.options import ArchKwargsOpt, ArchOpt, TrustPickleOpt, parse_arch_kwargs
from ttcompress.cli.train import DataRootOpt, DeviceOpt, DownloadOpt
from ttcompress.report import Report

app = command_app()

FormatOpt = Annotated[str, typer.Option(
    "--format", "-f", help="table (rich, terminal), md, csv or json.", metavar="FORMAT")]
ReportOutputOpt = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Write the report to this file (atomically) instead of stdout.",
    show_default=False, metavar="PATH")]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", help="Also draw accuracy vs compression ratio (log x, Pareto front marked) to this PNG.",
    show_default=False, metavar="FILE.png")]
LatencyBatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Batch size of the latency measurement.", metavar="INT")]
EvalLimitOpt = Annotated[Optional[int], typer.Option(
    "--eval-limit", help="Evaluate on the first N test samples only.", show_default=False, metavar="N")]
MinRunTimeOpt = Annotated[float, typer.Option(
    "--min-run-time", help="Seconds of timing per model (torch.utils.benchmark blocked_autorange).",
    metavar="SECONDS")]
NoLatencyOpt = Annotated[bool, typer.Option("--no-latency", help="Skip the latency measurement.")]


def check_render_options(*, fmt: str, plot: Optional[Path]) -> None:
    """Validate --format/--plot before any measurement starts (shared with sweep)."""
    from ttcompress.render import FORMATS

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ValueError(f"--plot must name a .png file, got {plot}")


def emit(report: Report, *, fmt: str, output: Optional[Path], plot: Optional[Path]) -> None:
    """Render ``report`` to stdout or ``output`` and draw ``plot`` (options already checked)."""
    from ttcompress.io import atomic_write
    from ttcompress.render import plot_tradeoff, render, to_rich_tables

    if plot is not None:
        plot_tradeoff(report, plot)
        err.print(f"plot: {plot}")
    if output is not None:
        with atomic_write(output, "w", encoding="utf-8") as f:
            f.write(render(report, fmt))  # type: ignore[arg-type]
        err.print(f"report: {output}")
    elif fmt == "table":
        for table in to_rich_tables(report):
            out.print(table)
    else:
        out.file.write(render(report, fmt))  # type: ignore[arg-type]
        out.file.flush()


@app.command("report")
@cli_errors
def report_command(
    baseline: Annotated[Path, typer.Argument(help="The dense baseline model file.", metavar="BASELINE")],
    models: Annotated[list[Path], typer.Argument(help="Model files to compare with the baseline.", metavar="MODEL...")],
    data: Annotated[str, typer.Option(
        "--data", help="Dataset whose test split measures accuracy: mnist-5k (embedded), mnist, "
        "fashion-mnist, cifar10, imagefolder:PATH, or none to skip accuracy.", metavar="NAME")] = "mnist-5k",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    device: DeviceOpt = "auto",
    batch_size: LatencyBatchOpt = 64,
    eval_limit: EvalLimitOpt = None,
    min_run_time: MinRunTimeOpt = 0.5,
    no_latency: NoLatencyOpt = False,
    fmt: FormatOpt = "table",
    output: ReportOutputOpt = None,
    plot: PlotOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """Measure params, compression, file size, FLOPs, latency and accuracy of each MODEL vs BASELINE.

    Example: ttcompress report model.pt model.ft.pt --data fashion-mnist --format md --plot tradeoff.png
    """
    from ttcompress.report import report_files

    check_render_options(fmt=fmt, plot=plot)
    result = report_files(
        baseline,
        models,
        data=None if data == "none" else data,
        data_root=data_root,
        download=download,
        device=device,
        batch_size=batch_size,
        eval_limit=eval_limit,
        min_run_time=min_run_time,
        measure_speed=not no_latency,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle,
    )
    emit(result, fmt=fmt, output=output, plot=plot)
