"""``ttcompress decompose``: compress a model file's Linear (TT) and Conv2d (CP) layers.

A thin shell over :func:`ttcompress.planfile.plan_from_options` (parse the options into a plan) and
:func:`ttcompress.surgery.decompose_file` (load → compress → save atomically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, check_outputs, cli_errors, err, out
from ttcompress.cli.tables import layer_table, preview_table, print_table
from ttcompress.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    CPRanksOpt,
    CPRatioOpt,
    ExcludeOpt,
    FormatsOpt,
    LayersOpt,
    TargetRatioOpt,
    TTDOpt,
    TTEpsOpt,
    TTRanksOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    OverwriteOpt,
    PlanOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    parse_arch_kwargs,
    plan_from_flags,
)
from ttcompress.dryrun import PlanPreview, preview_plan
from ttcompress.plan import Plan
from ttcompress.errors import refused_input
from ttcompress.io import load_checkpoint
from ttcompress.surgery import CompressionResult, DecomposeResult, decompose_file, default_output_path

app = command_app()


def preview_file(model: Path, *, plan: Plan, **load_options: Any) -> PlanPreview:
    """Load ``model`` and preview ``plan`` on it (nothing is decomposed or written)."""
    return preview_plan(load_checkpoint(model, **load_options).model, plan)


@app.command("decompose")
@cli_errors
def decompose(
    model: ModelArg,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    tt_ranks: TTRanksOpt = None,
    tt_eps: TTEpsOpt = None,
    tt_d: TTDOpt = None,
    cp_ranks: CPRanksOpt = None,
    cp_ratio: CPRatioOpt = None,
    target_ratio: TargetRatioOpt = None,
    formats: FormatsOpt = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    plan: PlanOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the per-layer plan, projected parameters and compression (errors are cheap "
        "estimates from singular values, marked ~), and write nothing.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Compress MODEL (default: nn.Linear -> TT-matrix, nn.Conv2d -> CP; see --format); write a ttcompress checkpoint.

    The output (default: MODEL's name with .tt.pt, next to it) is written atomically: on any error nothing is written. An existing output is replaced only with --overwrite. The per-layer table goes to stdout, progress to stderr.
    """
    check_inputs(model, plan)
    the_plan = plan_from_flags(
        plan=plan, tt_ranks=tt_ranks, tt_eps=tt_eps, tt_d=tt_d, cp_ranks=cp_ranks, cp_ratio=cp_ratio,
        layers=layers, exclude=exclude, target_ratio=target_ratio, formats=formats,
    )
    kwargs = parse_arch_kwargs(arch_kwargs)
    if dry_run:
        with refused_input():
            preview = preview_file(model, plan=the_plan, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle,
                                   trust_code=trust_code)  # fmt: skip
        print_table(preview_table(preview, title=f"ttcompress decompose --dry-run {model.name}"))
        err.print("dry run: nothing written")
        return
    check_outputs([output if output is not None else default_output_path(model)], overwrite=overwrite, inputs=[model])
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("decomposing", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"decomposing {name}" if name else "saving")

        with refused_input():  # a named model that cannot be loaded, a plan that does not fit it
            result = decompose_file(
                model, output=output, plan=the_plan, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle,
                trust_code=trust_code, progress=progress,
            )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (and writes)
        return
    if json_:
        out.print_json(json.dumps(result.to_dict()))
        return
    print_table(layer_table(result.result))
    err.print(f"wrote {result.output}")


__all__ = ["DecomposeResult", "decompose"]
