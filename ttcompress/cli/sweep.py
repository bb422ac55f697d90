"""``ttcompress sweep``: decompose → evaluate → fine-tune → evaluate for each rank setting.

A thin shell over :func:`ttcompress.sweep.sweep_report`; the report is rendered like
``ttcompress report``'s, with accuracy before and after fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, check_outputs, cli_errors, err
from ttcompress.cli.options import (
    ArchKwargsOpt, ArchOpt, OverwriteOpt, PlanOpt, PlotOpt, PlotTitleOpt, PlotXOpt, TrustCodeOpt, TrustPickleOpt,
    parse_arch_kwargs,
)
from ttcompress.cli.report import FormatOpt, check_render_options, emit, resolve_format
from ttcompress.errors import UserInputError
from ttcompress.cli.train import (
    BatchSizeOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    EpochsOpt,
    LrOpt,
    MaxBatchesOpt,
    MomentumOpt,
    OptimizerOpt,
    ScheduleOpt,
    SeedOpt,
    ValFractionOpt,
    WeightDecayOpt,
    make_config,
)
from ttcompress.training.config import FinetuneConfig

app = command_app()


def parse_list(text: Optional[str], *, option: str, kind: type, allow_none: bool = False) -> list:
    """``"2,4,8"`` → ``[2, 4, 8]`` (``kind`` int or float); ``None`` → ``[]``.

    With ``allow_none``, the item ``none`` becomes ``None`` (that layer type stays dense).
    """
    if text is None:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserInputError(f"{option} needs a comma-separated list, e.g. {option} 2,4,8")
    try:
        return [None if (allow_none and t.lower() == "none") else kind(t) for t in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserInputError(f"{option} must be comma-separated {what}, got {text!r}") from None


@app.command("sweep")
@cli_errors
def sweep_command(
    baseline: Annotated[Path, typer.Argument(help="The dense baseline model file.", metavar="BASELINE")],
    tt_ranks: Annotated[Optional[str], typer.Option(
        "--tt-ranks", help="TT max ranks for the Linear layers, comma-separated (e.g. 2,4,8); "
        "'none' keeps them dense in those settings (e.g. none,8).",
        show_default=False, metavar="LIST")] = None,
    tt_eps: Annotated[Optional[str], typer.Option(
        "--tt-eps", help="TT relative errors for the Linear layers, comma-separated (e.g. 0.3,0.1).",
        show_default=False, metavar="LIST")] = None,
    cp_ranks: Annotated[Optional[str], typer.Option(
        "--cp-ranks", help="CP ranks for the Conv2d layers, comma-separated (e.g. 3,6,9); "
        "'none' keeps them dense in those settings.",
        show_default=False, metavar="LIST")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        "-o", "--output-dir", help="Directory of per-setting models and the cache "
        "(default: BASELINE's name + .sweep). Re-running with the same arguments resumes.",
        show_default=False, metavar="DIR")] = None,
    data: DataOpt = "mnist-5k",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    epochs: EpochsOpt = FinetuneConfig.epochs,
    batch_size: BatchSizeOpt = FinetuneConfig.batch_size,
    optimizer: OptimizerOpt = FinetuneConfig.optimizer,
    lr: LrOpt = FinetuneConfig.lr,
    momentum: MomentumOpt = FinetuneConfig.momentum,
    weight_decay: WeightDecayOpt = FinetuneConfig.weight_decay,
    schedule: ScheduleOpt = FinetuneConfig.schedule,
    seed: SeedOpt = FinetuneConfig.seed,
    max_batches: MaxBatchesOpt = None,
    val_fraction: ValFractionOpt = FinetuneConfig.val_fraction,
    device: DeviceOpt = FinetuneConfig.device,
    plan: PlanOpt = None,
    distill: Annotated[bool, typer.Option(
        "--distill", help="Distil from the baseline while fine-tuning.")] = False,
    fmt: FormatOpt = None,
    report_file: Annotated[Optional[Path], typer.Option(
        "--report", help="Also write the report to this file; its extension gives the format (.md, .csv, .json, .txt).",
        show_default=False, metavar="PATH")] = None,
    plot: PlotOpt = None,
    overwrite: OverwriteOpt = False,
    plot_x: PlotXOpt = "params",
    plot_title: PlotTitleOpt = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the latency measurement.")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
) -> None:
    """For each setting (TT axis × CP axis): decompose, evaluate, fine-tune, evaluate; then report.

    A layer type whose axis is not given stays dense. Example:
    ttcompress sweep baseline.pt --cp-ranks 3,6,9 --tt-ranks 4 --epochs 2 --plot tradeoff.png
    """
    from ttcompress.cli.flags import flags_in_errors
    from ttcompress.cli.progress import RichProgress
    from ttcompress.sweep import sweep_report, sweep_settings

    fmt = fmt or "table"
    check_render_options(fmt=fmt, plot=plot, plot_x=plot_x)
    file_fmt = resolve_format(None, report_file) if report_file is not None else None
    check_inputs(baseline, plan)
    check_outputs([report_file, plot], overwrite=overwrite, inputs=[baseline])
    with flags_in_errors():
        settings = sweep_settings(
            tt_ranks=parse_list(tt_ranks, option="--tt-ranks", kind=int, allow_none=True),
            tt_eps=parse_list(tt_eps, option="--tt-eps", kind=float),
            cp_ranks=parse_list(cp_ranks, option="--cp-ranks", kind=int, allow_none=True),
        )
    config = make_config(
        FinetuneConfig, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, seed=seed, device=device, max_batches=max_batches,
        val_fraction=val_fraction,
    )  # fmt: skip
    progress = RichProgress(err)
    try:
        report = sweep_report(
            baseline,
            settings=settings,
            output_dir=output_dir,
            data=data,
            data_root=data_root,
            download=download,
            config=config,
            plan_file=plan,
            distill=distill,
            measure_speed=not no_latency,
            arch=arch,
            arch_kwargs=parse_arch_kwargs(arch_kwargs),
            trust_pickle=trust_pickle, trust_code=trust_code,
            console=err,
            progress=progress,
        )
    finally:
        progress.close()
    emit(report, fmt=fmt, output=None, plot=plot, plot_x=plot_x, plot_title=plot_title)
    if report_file is not None:
        emit(report, fmt=file_fmt, output=report_file, plot=None)  # type: ignore[arg-type]
