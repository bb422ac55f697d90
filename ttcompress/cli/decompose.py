"""``ttcompress decompose``: compress a model file's Linear (TT) and Conv2d (CP) layers.

A thin shell over :func:`ttcompress.planfile.plan_from_options` (parse the options into a plan) and
:func:`ttcompress.surgery.decompose_file` (load → compress → save atomically).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, check_outputs, cli_errors, err, out
from ttcompress.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    OverwriteOpt,
    PlanOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    parse_arch_kwargs,
)
from ttcompress.errors import refused_input
from ttcompress.formats import format_names, get_format
from ttcompress.cli.flags import flags_in_errors
from ttcompress.planfile import plan_from_options
from ttcompress.layer_report import format_label
from ttcompress.surgery import CompressionResult, DecomposeResult, decompose_file, default_output_path

app = command_app()

_RANKS = "Ranks (pick at most one way per format)"
_FORMAT_HELP = "; ".join(f"{n} ({get_format(n).summary})" for n in format_names())
_SELECT = "Layer selection"


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
    tt_ranks: Annotated[Optional[int], typer.Option(
        "--tt-ranks", help="Max TT rank of Linear layers (default 8 when neither --tt-ranks nor --tt-eps is given).",
        show_default=False, metavar="INT", rich_help_panel=_RANKS)] = None,
    tt_eps: Annotated[Optional[float], typer.Option(
        "--tt-eps", help="Relative reconstruction error per Linear layer, in (0, 1) (TT-SVD truncation).",
        show_default=False, metavar="FLOAT", rich_help_panel=_RANKS)] = None,
    tt_d: Annotated[Optional[int], typer.Option(
        "--tt-d", help="Number of TT cores (>= 2; default: by layer size, 2-4).",
        show_default=False, metavar="INT", rich_help_panel=_RANKS)] = None,
    cp_ranks: Annotated[Optional[int], typer.Option(
        "--cp-ranks", help="CP rank of Conv2d layers.", show_default=False, metavar="INT", rich_help_panel=_RANKS)] = None,
    cp_ratio: Annotated[Optional[float], typer.Option(
        "--cp-ratio", help="Per conv, the rank that compresses it by this factor (> 1; default 4).",
        show_default=False, metavar="FLOAT", rich_help_panel=_RANKS)] = None,
    target_ratio: Annotated[Optional[float], typer.Option(
        "--target-ratio", help="Whole-model parameter compression to reach (> 1): per-layer ranks are chosen "
        "greedily where they lower the estimated reconstruction error most; with no --format, each layer "
        "then gets the format with the lowest error at its budget (auto).",
        show_default=False, metavar="FLOAT", rich_help_panel=_RANKS)] = None,
    formats: Annotated[Optional[list[str]], typer.Option(
        "--format", help=f"Format to use: {_FORMAT_HELP}. Each layer gets the first given format that "
        "compresses its type; other types keep their default (tt for Linear, cp for Conv2d). "
        "Repeatable, or comma-separated.",
        show_default=False, metavar="NAME", rich_help_panel=_RANKS)] = None,
    layers: Annotated[Optional[list[str]], typer.Option(
        "--layers", help="Compress only layers whose qualified name matches this glob (repeatable, or comma-separated).",
        show_default=False, metavar="GLOB", rich_help_panel=_SELECT)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", help="Keep layers matching this glob dense (repeatable, or comma-separated).",
        show_default=False, metavar="GLOB", rich_help_panel=_SELECT)] = None,
    plan: PlanOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Compress MODEL (default: nn.Linear -> TT-matrix, nn.Conv2d -> CP; see --format); write a ttcompress checkpoint.

    The output (default: MODEL's name with .tt.pt, next to it) is written atomically: on any error nothing is written. An existing output is replaced only with --overwrite. The per-layer table goes to stdout, progress to stderr.
    """
    check_inputs(model, plan)
    with refused_input(), flags_in_errors():
        the_plan = plan_from_options(
            plan_file=plan, tt_ranks=tt_ranks, tt_eps=tt_eps, tt_d=tt_d, cp_ranks=cp_ranks, cp_ratio=cp_ratio,
            layers=layers or (), exclude=exclude or (), target_ratio=target_ratio, formats=formats or (),
        )
    kwargs = parse_arch_kwargs(arch_kwargs)
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


def print_table(table: Table) -> None:
    """Print a table on stdout; when stdout is not a terminal, wide enough not to wrap cells."""
    if out.is_terminal:
        out.print(table)
    else:
        Console(width=max(out.width, 220), soft_wrap=True).print(table)


def layer_table(result: CompressionResult) -> Table:
    """The per-layer rich table of a compression run, with a total row."""
    table = Table(title="ttcompress decompose", show_footer=False)
    for col, just in (("layer", "left"), ("type", "left"), ("shape", "left"), ("format", "left"),
                      ("modes / ranks", "left"), ("params", "right"), ("ratio", "right"),
                      ("rel. error", "right"), ("time", "right"), ("note", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in result.records:
        params = f"{r.params_before:,}" if not r.compressed else f"{r.params_before:,} → {r.params_after:,}"
        table.add_row(
            r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else ""),
            r.type,
            "x".join(map(str, r.shape)),
            format_label(r.format),
            r.structure,
            params,
            f"{r.ratio:.2f}×" if r.compressed else "–",
            f"{r.rel_error:.4f}" if r.rel_error is not None and r.compressed else "–",
            f"{r.seconds:.2f}s" if r.seconds is not None and r.compressed else "–",
            r.skipped or r.note or "",
        )
    n = len(result.compressed)
    table.add_section()
    table.add_row(f"total ({n} of {len(result.records)} layers compressed)", "", "", "", "",
                  f"{result.params_before:,} → {result.params_after:,}", f"{result.ratio:.2f}×", "", "", "",
                  style="bold")
    return table


__all__ = ["DecomposeResult", "decompose", "layer_table", "print_table"]
