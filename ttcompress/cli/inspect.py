"""``ttcompress inspect``: what is in a model file, and what could be compressed.

A thin shell over :func:`ttcompress.compression.summary.inspect_file`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, cli_errors, err, out
from ttcompress.cli.flags import with_format_flags
from ttcompress.cli.tables import print_table, summary_table
from ttcompress.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    JsonOpt,
    ModelArg,
    ExcludeOpt,
    FormatsOpt,
    LayersOpt,
    PlanOpt,
    TargetRatioOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    parse_arch_kwargs,
    plan_from_flags,
)
from ttcompress.compression.blockwise import is_blockwise_dir
from ttcompress.compression.blockwise_preview import inspect_sharded
from ttcompress.compression.summary import inspect_file

app = command_app()

#: Said under the table of a ttcompress checkpoint (users try ``torch.load`` on a ``.tt.pt`` first).
HOW_TO_LOAD = ("a ttcompress checkpoint is a safetensors file with a JSON header, not a pickle: torch.load cannot "
               "read it. Load it with ttcompress.load(path), or convert it with ttcompress export "
               "(--format onnx, torchscript or dense).")


@app.command("inspect")
@cli_errors
@with_format_flags()
def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    plan: PlanOpt = None,
    format_flags: Optional[dict[str, Any]] = None,
    target_ratio: TargetRatioOpt = None,
    formats: FormatsOpt = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show MODEL's layers: shapes, parameter share, what is compressible and what the plan would build.

    For a compressed ttcompress checkpoint, show its plan: format, modes and ranks of each layer. A sharded
    Llama-style directory is read one transformer block at a time.
    """
    check_inputs(model, plan)
    the_plan = plan_from_flags(
        plan=plan, **(format_flags or {}),
        layers=layers, exclude=exclude, target_ratio=target_ratio, formats=formats,
    )
    if is_blockwise_dir(model) and arch is None:  # one transformer block in memory at a time
        summary = inspect_sharded(model, the_plan)
    else:
        summary = inspect_file(
            model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle,
            trust_code=trust_code, plan=the_plan,
        )
    if json_:
        out.print_json(json.dumps(summary.to_dict()))
        return
    print_table(summary_table(summary, title=str(model)))
    if summary.kind == "ttcompress":
        err.print(HOW_TO_LOAD, highlight=False, soft_wrap=True)
