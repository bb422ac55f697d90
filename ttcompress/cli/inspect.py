"""``ttcompress inspect``: what is in a model file, and what could be compressed.

A thin shell over :func:`ttcompress.surgery.inspect_file`.
"""

from __future__ import annotations

import json

from rich.table import Table

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, cli_errors, out
from ttcompress.cli.decompose import print_table
from ttcompress.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    JsonOpt,
    ModelArg,
    PlanOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    parse_arch_kwargs,
)
from ttcompress.errors import refused_input
from ttcompress.planfile import load_plan
from ttcompress.layer_report import format_label
from ttcompress.surgery import ModelSummary, inspect_file

app = command_app()


@app.command("inspect")
@cli_errors
def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    plan: PlanOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show MODEL's layers: shapes, parameter share, what is compressible and what the plan would build.

    For a compressed ttcompress checkpoint, show its plan: format, modes and ranks of each layer.
    """
    check_inputs(model, plan)
    with refused_input():  # a named model or plan that cannot be read
        summary = inspect_file(
            model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle, trust_code=trust_code,
            plan=load_plan(plan) if plan is not None else None,
        )
    if json_:
        out.print_json(json.dumps(summary.to_dict()))
        return
    print_table(summary_table(summary, title=str(model)))


def summary_table(summary: ModelSummary, *, title: str) -> Table:
    """Render a :class:`ModelSummary` as a rich table."""
    arch = summary.arch["name"] + (
        f" {json.dumps(summary.arch['kwargs'])}" if summary.arch and summary.arch.get("kwargs") else ""
    ) if summary.arch else "not rebuildable (pickled module)"
    caption = f"{summary.kind} · arch {arch} · {summary.total_params:,} params"
    table = Table(title=title, caption=caption)
    cols = ["layer", "type", "shape", "params", "share", "format"]
    cols += ["modes / ranks", "before", "rel. error"] if summary.compressed else ["compressible", "suggestion"]
    for c in cols:
        table.add_column(c, justify="right" if c in ("params", "share", "before", "rel. error") else "left")
    for r in summary.layers:
        row = [r.name, r.type, "x".join(map(str, r.shape)), f"{r.params:,}", f"{100 * r.share:.1f}%",
               format_label(r.format)]
        if summary.compressed:
            row += [r.structure, f"{r.params_before:,}" if r.params_before else "–",
                    f"{r.rel_error:.4f}" if r.rel_error is not None else "–"]
        else:
            row += ["yes" if r.compressible else f"no: {r.skipped}", r.suggestion or "–"]
        table.add_row(*row)
    if summary.other_params:
        table.add_row("(other parameters)", "", "", f"{summary.other_params:,}",
                      f"{100 * summary.other_params / max(summary.total_params, 1):.1f}%", "", *[""] * (len(cols) - 6))
    return table
