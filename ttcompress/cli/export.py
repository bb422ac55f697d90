"""``ttcompress export``: a model for deployment (ONNX, TorchScript, merged back to dense, or a Hugging Face directory).

A thin shell over :func:`ttcompress.export.export_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_dir_output, check_inputs, check_outputs, cli_errors, err, out
from ttcompress.cli.options import (
    ArchKwargsOpt, ArchOpt, InputShapeOpt, JsonOpt, ModelArg, OverwriteOpt, TrustPickleOpt, parse_arch_kwargs,
    parse_input_shape,
)
from ttcompress.errors import UserInputError

if TYPE_CHECKING:
    from ttcompress.export import ExportResult

app = command_app()


def _checked(result: ExportResult) -> str:
    if result.max_error is None:
        return "not checked"
    if result.format == "hf":
        return "checked: loads back with identical layers and tensors"
    return (f"checked at batch sizes {', '.join(map(str, result.checked_batches))}: "
            f"max relative error {result.max_error:.1e}")


@app.command("export")
@cli_errors
def export(
    model: ModelArg,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="onnx, torchscript, dense (every factorized layer merged back), or hf (a Hugging "
        "Face directory: config.json + model.safetensors, plan recorded; transformers models only).",
        metavar="FORMAT")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Output file, or directory for --format hf (written atomically, after the check "
        "passed).", metavar="PATH")],
    input_shape: InputShapeOpt = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Batch size of the example input (the export keeps the batch dimension dynamic).",
        metavar="INT")] = 1,
    merge: Annotated[str, typer.Option(
        "--merge", help="For --format dense: all (a plain model of the original architecture), or slower "
        "(merge only the layers measured slower than their merged form).", metavar="all|slower")] = "all",
    fold: Annotated[bool, typer.Option(
        "--fold", help="Merge every factorized layer back to dense first (onnx, torchscript, hf): the graph or "
        "directory of the original architecture. By default the factors are kept.")] = False,
    no_check: Annotated[bool, typer.Option(
        "--no-check", help="Skip running the export against the model before writing it.")] = False,
    latency: Annotated[bool, typer.Option(
        "--latency", help="onnx: time the exported graph in onnxruntime (CPU) at batch sizes 1 and 64 beside the "
        "dense-merged graph of the same model, interleaved (also in --json).")] = False,
    overwrite: OverwriteOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Export MODEL for deployment, checked against the model at two batch sizes before it is written.

    Example: ttcompress export model.tt.pt --format onnx -o model.onnx
    """
    from ttcompress.export import EXPORT_FORMATS, export_model, require_onnx
    from ttcompress.checkpoint.hf import recorded_hf_arch
    from ttcompress.checkpoint.hf_files import is_hf_dir
    from ttcompress.checkpoint.io import load

    if fmt not in EXPORT_FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    if merge not in ("all", "slower"):
        raise UserInputError(f"--merge must be all or slower; got {merge!r}")
    if merge != "all" and fmt != "dense":
        raise UserInputError("--merge applies to --format dense only")
    if fold and fmt == "dense":
        raise UserInputError("--fold applies to --format onnx, torchscript and hf (dense always merges)")
    if latency and fmt != "onnx":
        raise UserInputError("--latency applies to --format onnx only")
    shape = parse_input_shape(input_shape)
    if fmt == "hf" and not fold and (shape is not None or batch_size != 1):
        raise UserInputError("--input-shape and --batch-size do not apply to --format hf")
    check_inputs(model)
    if fmt == "hf":
        check_dir_output(output, overwrite=overwrite, inputs=[model])
    elif fmt != "dense":
        check_outputs([output], overwrite=overwrite, inputs=[model])
    if fmt == "onnx":
        require_onnx(check=not no_check)  # a missing [export] extra: one line before the model is loaded
    loaded = load(model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle)
    if fmt == "dense":  # a transformers model merged back is a directory, any other a checkpoint file
        if recorded_hf_arch(loaded) is not None:
            check_dir_output(output, overwrite=overwrite, inputs=[model])
        else:
            check_outputs([output], overwrite=overwrite, inputs=[model])
    result = export_model(loaded, output, format=fmt, input_shape=shape, batch_size=batch_size,  # type: ignore[arg-type]
                          merge=merge, check=not no_check, overwrite=overwrite,  # type: ignore[arg-type]
                          fold=fold, source_dir=model if is_hf_dir(model) else None,
                          latency_batches=(1, 64) if latency else ())
    if json_:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(f"{result.format}: {result.path} ({result.size_bytes:,} bytes; {_checked(result)})")
    for t in result.latency:
        out.print(f"  onnxruntime, batch {t.batch_size}: {t.ms:.3f} ± {t.iqr_ms / 2:.3f} ms; dense graph "
                  f"({t.dense_size_bytes:,} bytes) {t.dense_ms:.3f} ± {t.dense_iqr_ms / 2:.3f} ms: {t.speedup:.2f}x")
    for layer in result.layers:
        timing = (f" (factorized {layer.factorized_ms:.3f} ms vs dense {layer.dense_ms:.3f} ms)"
                  if layer.factorized_ms is not None else "")
        err.print(f"  {layer.name}: {'merged' if layer.merged else 'kept factorized'}{timing}")
