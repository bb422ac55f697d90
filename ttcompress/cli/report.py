"""``ttcompress report``: the accuracy/compression trade-off of models side by side.

A thin shell over :func:`ttcompress.report.compare.report_files` and :mod:`ttcompress.report.render`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ttcompress.cli.recorded import check_default_data
from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, check_outputs, cli_errors, data_inputs, err, out
from ttcompress.cli.options import (
    ArchKwargsOpt, ArchOpt, InputShapeOpt, OverwriteOpt, PlotOpt, PlotTitleOpt, PlotXOpt, TrustCodeOpt, TrustPickleOpt,
    parse_arch_kwargs, parse_input_shape,
)
from ttcompress.errors import UserInputError
from ttcompress.cli.train import DataRootOpt, DeviceOpt, DownloadOpt, SeqLenOpt, TokenizerOpt, check_text_options
from ttcompress.report.compare import Report

app = command_app()

FormatOpt = Annotated[Optional[str], typer.Option(
    "--format", "-f", help="table (rich, terminal; the default on stdout), md, csv or json. With -o the "
    "file's extension decides (.md, .csv, .json, .txt = table), and a --format that contradicts it is an error.",
    show_default=False, metavar="FORMAT")]
ReportOutputOpt = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Write the report to this file (atomically) instead of stdout; its extension "
    "(.md, .csv, .json, .txt) gives the format.", show_default=False, metavar="PATH")]
LabelsOpt = Annotated[Optional[str], typer.Option(
    "--labels", help="Comma-separated names of the rows, baseline first (default: the file names).",
    show_default=False, metavar="A,B,...")]
#: The format each report file extension means.
OUTPUT_SUFFIXES: dict[str, str] = {".md": "md", ".csv": "csv", ".json": "json", ".txt": "table"}


def resolve_format(fmt: Optional[str], output: Optional[Path]) -> str:
    """The report format: from ``-o``'s extension when writing a file, else ``--format`` (default table)."""
    if output is None:
        return fmt or "table"
    by_suffix = OUTPUT_SUFFIXES.get(output.suffix.lower())
    if by_suffix is None:
        raise UserInputError(f"-o must end in one of {', '.join(OUTPUT_SUFFIXES)} (it gives the format); got {output.name!r}")
    if fmt is not None and fmt != by_suffix:
        raise UserInputError(f"--format {fmt} contradicts -o {output.name} (a {by_suffix} file); drop one of them")
    return by_suffix
LatencyBatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Batch size of the latency measurement.", metavar="INT")]
EvalLimitOpt = Annotated[Optional[int], typer.Option(
    "--eval-limit", help="Evaluate on a seeded, class-balanced subset of N test samples.", show_default=False, metavar="N")]
MinRunTimeOpt = Annotated[float, typer.Option(
    "--min-run-time", help="Seconds of timing per model (torch.utils.benchmark blocked_autorange).",
    metavar="SECONDS")]
NoLatencyOpt = Annotated[bool, typer.Option("--no-latency", help="Skip the latency measurement.")]


def check_render_options(*, fmt: str, plot: Optional[Path], plot_x: str = "params") -> None:
    """Validate --format/--plot/--x before any measurement starts (shared with sweep)."""
    from ttcompress.report.plot import AXES, PLOT_SUFFIXES
    from ttcompress.report.render import FORMATS

    if fmt not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UserInputError(f"--plot must name a {', '.join(PLOT_SUFFIXES)} file, got {plot}")
    if plot_x not in AXES:
        raise UserInputError(f"--x must be one of {', '.join(AXES)}; got {plot_x!r}")


def emit(
    report: Report, *, fmt: str, output: Optional[Path], plot: Optional[Path], plot_x: str = "params",
    plot_title: Optional[str] = None,
) -> None:
    """Render ``report`` to stdout or ``output`` and draw ``plot`` (options already checked)."""
    from ttcompress.fsutil import atomic_write
    from ttcompress.report.plot import plot_tradeoff
    from ttcompress.report.render import render, to_rich_tables

    if plot is not None:
        plot_tradeoff(report, plot, x=plot_x, title=plot_title)  # type: ignore[arg-type]
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
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Dataset whose test split measures accuracy: mnist-5k (embedded), mnist, "
        "fashion-mnist, cifar10, imagefolder:PATH, tensors:FILE, text:FILE_OR_DIR, package.module:callable, or none to skip "
        "accuracy. Default: the built-in dataset BASELINE records, else mnist-5k.", show_default=False,
        metavar="NAME")] = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    seq_len: SeqLenOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    batch_size: LatencyBatchOpt = 64,
    eval_limit: EvalLimitOpt = None,
    min_run_time: MinRunTimeOpt = 0.5,
    no_latency: NoLatencyOpt = False,
    input_shape: InputShapeOpt = None,
    fmt: FormatOpt = None,
    output: ReportOutputOpt = None,
    labels: LabelsOpt = None,
    plot: PlotOpt = None,
    overwrite: OverwriteOpt = False,
    plot_x: PlotXOpt = "params",
    plot_title: PlotTitleOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help="perplexity (a causal language model's token-level perplexity on the validation split, "
        "padding left out; lower is better, and the --plot y axis), or your metric, package.module:callable: "
        "metric(outputs, targets) -> float, called on each model's outputs over the test split (concatenated) and "
        "the targets (None when the data has none). Reported beside top-1, or instead of it when the data has no "
        "class labels.", show_default=False, metavar="perplexity|MODULE:CALLABLE")] = None,
) -> None:
    """Measure params, compression, file size, FLOPs, latency and accuracy of each MODEL vs BASELINE.

    Example: ttcompress report model.pt model.ft.pt --data fashion-mnist --format md --plot tradeoff.png
    """
    from ttcompress.report.compare import report_files

    fmt = resolve_format(fmt, output)
    check_render_options(fmt=fmt, plot=plot, plot_x=plot_x)
    check_inputs(baseline, *models)
    check_outputs([output, plot], overwrite=overwrite, inputs=[baseline, *models, *data_inputs(data)])
    data = check_default_data(baseline, data)  # before any work: a default dataset the baseline cannot take
    check_text_options(data, seq_len=seq_len, tokenizer=tokenizer)
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
        input_shape=parse_input_shape(input_shape),
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle, trust_code=trust_code,
        labels=[part for part in labels.split(",")] if labels is not None else None,
        metric=metric,
        tokenizer=tokenizer,
        seq_len=seq_len,
    )
    emit(result, fmt=fmt, output=output, plot=plot, plot_x=plot_x, plot_title=plot_title)
