"""``ttcompress sweep``: decompose → evaluate → fine-tune → evaluate for each setting of the plan axes.

A thin shell over :func:`ttcompress.sweep.sweep_report`; the report is rendered like
``ttcompress report``'s, with accuracy before and after fine-tuning. The per-format options take
lists (each value one point of its axis); every other option of ``decompose`` and ``finetune``
means here what it means there, for every setting. :data:`ABSENT` lists the options of those
commands that ``sweep`` deliberately lacks, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, check_outputs, cli_errors, data_inputs, err
from ttcompress.fsutil import check_not_inputs
from ttcompress.cli.flags import SET_PARAM, format_flags, parse_set, with_format_flags
from ttcompress.errors import InputError
from ttcompress.cli.options import (
    ArchKwargsOpt, ArchOpt, CalibMemoryOpt, CalibSamplesOpt, ExcludeOpt, FormatsOpt, LayersOpt, MaxErrorOpt, MinSavingOpt,
    NoCalibOpt, OverwriteOpt, PlanOpt, PlotOpt, PlotTitleOpt, PlotXOpt, TrustCodeOpt, TrustPickleOpt,
    parse_arch_kwargs, parse_list,
)
from ttcompress.cli.report import check_render_options, emit, resolve_format
from ttcompress.cli.config_options import config_options
from ttcompress.cli.train import (
    DataOpt, DataRootOpt, DownloadOpt, ImageSizeOpt, SeqLenOpt, TeacherOpt, TokenizerOpt, check_text_options,
)
from ttcompress.calibration.data import DEFAULT_CALIB_SAMPLES
from ttcompress.training.config import FinetuneConfig

__all__ = ["ABSENT", "sweep_command"]

app = command_app()

#: Options of ``decompose`` / ``finetune`` that ``sweep`` does not take, and why.
ABSENT: dict[str, str] = {
    "--output": "sweep writes one model per setting: -o/--output-dir names their directory",
    "--json": "the report's format is --report-format json (or --report FILE.json)",
    "--resume": "a sweep always resumes: re-running with the same arguments continues where it stopped",
    "--dry-run": "preview one setting with `decompose --dry-run` and its flags",
    "--teacher-arch": "a --teacher that is a bare state dict gets the baseline's architecture (--arch)",
    "--teacher-arch-kwargs": "a --teacher that is a bare state dict gets the baseline's architecture (--arch)",
}

_AXES = "Sweep axes (comma-separated lists; each value is one setting)"
TargetRatiosList = Annotated[Optional[str], typer.Option(
    "--target-ratios", "--target-ratio", help="Whole-model parameter compressions to reach, e.g. 2,4,8,16 "
    "(ranks chosen per layer, as decompose --target-ratio; 'none': no target in that setting).",
    show_default=False, metavar="LIST", rich_help_panel=_AXES)]
ReportFormatOpt = Annotated[Optional[str], typer.Option(
    "--report-format", "-f", help="Format of the report on stdout: table (default), md, csv or json.",
    show_default=False, metavar="FORMAT")]


@app.command("sweep")
@cli_errors
@config_options(FinetuneConfig, command="sweep")
@with_format_flags(lists=True)
def sweep_command(
    *,
    baseline: Annotated[Path, typer.Argument(help="The dense baseline model file.", metavar="BASELINE")],
    format_flags: Optional[dict[str, Any]] = None,
    target_ratios: TargetRatiosList = None,
    formats: FormatsOpt = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    min_saving: MinSavingOpt = None,
    max_error: MaxErrorOpt = None,
    plan: PlanOpt = None,
    calib_samples: CalibSamplesOpt = DEFAULT_CALIB_SAMPLES,
    calib_memory: CalibMemoryOpt = None,
    no_calib: NoCalibOpt = False,
    output_dir: Annotated[Optional[Path], typer.Option(
        "-o", "--output-dir", help="Directory of per-setting models and the cache "
        "(default: BASELINE's name + .sweep). Re-running with the same arguments resumes.",
        show_default=False, metavar="DIR")] = None,
    data: DataOpt = "mnist-5k",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    image_size: ImageSizeOpt = None,
    seq_len: SeqLenOpt = None,
    tokenizer: TokenizerOpt = None,
    config: FinetuneConfig,
    distill: Annotated[bool, typer.Option(
        "--distill/--no-distill", help="Distil from the baseline while fine-tuning, as finetune does from the model "
        "decompose recorded (default); --teacher FILE distils from that model instead.",
        rich_help_panel="Distillation")] = True,
    teacher: TeacherOpt = None,
    fmt: ReportFormatOpt = None,
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
    """For each setting (cross product of the plan axes): decompose, evaluate, fine-tune, evaluate; then report.

    The flags mean what they mean in decompose and finetune; the per-format ones take lists. Once any per-format option is given, a layer type whose options are not given stays dense. Each decomposition is calibrated on --calib-samples samples of --data's training split (drawn with --seed), as decompose --data does; --no-calib decomposes data-free. Example:
    ttcompress sweep baseline.pt --cp-ranks 3,6,9 --tt-ranks none,4 --epochs 2 --plot tradeoff.png
    """
    o = dict(locals())  # the parsed options, handed to the steps below
    from ttcompress.sweep import default_output_dir
    o["fmt"] = fmt or "table"
    check_render_options(fmt=o["fmt"], plot=plot, plot_x=plot_x)
    check_inputs(baseline, plan, teacher)
    check_text_options(data, seq_len=seq_len, tokenizer=tokenizer)
    inputs = [baseline, plan, teacher, *data_inputs(data)]
    check_outputs([report_file, plot], overwrite=overwrite, inputs=inputs)
    check_not_inputs([output_dir if output_dir is not None else default_output_dir(baseline)], inputs)
    report = _run(o, _settings(o), config)
    emit(report, fmt=o["fmt"], output=None, plot=plot, plot_x=plot_x, plot_title=plot_title)
    if report_file is not None:
        emit(report, fmt=resolve_format(None, report_file), output=report_file, plot=None)
    err.print("models written:")
    for row in report.rows[1:]:
        err.print(f"  {row.model}: {row.path}")


def _settings(o: dict[str, Any]) -> Any:
    """The sweep's settings: the cross product of the list axes (each generated per-format flag and
    each ``--set FORMAT.FIELD=V1,V2`` is one axis)."""
    from ttcompress.sweep import sweep_settings

    flags = o["format_flags"] or {}
    values: dict[str, list[Any]] = {}
    for f in format_flags():
        items = parse_list(flags.get(f.dest), option=f.flag, kind=f.kind)
        if items:
            values[f.param] = items
    for param, items in parse_set(flags.get(SET_PARAM), lists=True).items():
        if param in values:
            raise InputError(SET_PARAM, f": {param} is given by its own flag too; give it once")
        values[param] = items
    return sweep_settings(values=values,
                          target_ratios=parse_list(o["target_ratios"], option="--target-ratios", kind=float))


def _run(o: dict[str, Any], settings: Any, config: FinetuneConfig) -> Any:
    """Decompose, evaluate and fine-tune every setting, with progress bars on stderr; the report."""
    from ttcompress.cli.progress import RichProgress
    from ttcompress.sweep import sweep_report

    progress = RichProgress(err)
    try:
        return sweep_report(
            o["baseline"], settings=settings, output_dir=o["output_dir"], data=o["data"],
            data_root=o["data_root"], download=o["download"], image_size=o["image_size"], config=config,
            tokenizer=o["tokenizer"], seq_len=o["seq_len"],
            plan_file=o["plan"], plan_options={"formats": o["formats"] or (), "layers": o["layers"] or (),
                                               "exclude": o["exclude"] or (), "min_saving": o["min_saving"],
                                               "max_error": o["max_error"]},
            calib_samples=None if o["no_calib"] else o["calib_samples"], calib_memory=o["calib_memory"],
            distill=o["distill"], teacher=o["teacher"], measure_speed=not o["no_latency"], arch=o["arch"],
            arch_kwargs=parse_arch_kwargs(o["arch_kwargs"]), trust_pickle=o["trust_pickle"],
            trust_code=o["trust_code"], console=err, progress=progress,
        )  # fmt: skip
    finally:
        progress.close()
