"""``ttcompress decompose``: compress a model file's Linear (TT) and Conv2d (CP) layers.

A thin shell over :func:`ttcompress.compression.planfile.plan_from_options` (parse the options into a plan) and
:func:`ttcompress.compression.pipeline.decompose_file` (load → compress → save atomically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_dir_output, check_inputs, check_outputs, cli_errors, data_inputs, err, out
from ttcompress.cli.progress import DecomposeProgress
from ttcompress.cli.flags import with_format_flags
from ttcompress.cli.tables import layer_table, preview_table, print_table
from ttcompress.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    CalibMemoryOpt,
    CalibSamplesOpt,
    MaxErrorOpt,
    MinSavingOpt,
    NoCalibOpt,
    ExcludeOpt,
    FormatsOpt,
    LayersOpt,
    TargetRatioOpt,
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
from ttcompress.calibration.budget import check_calib_memory
from ttcompress.calibration.data import (DEFAULT_BATCH_SIZE, DEFAULT_CALIB_SAMPLES, HandedOverBatches, gather_in_place,
                                         named_calibration)
from ttcompress.calibration.progress import calib_progress
from ttcompress.cli.train import DataRootOpt, SeqLenOpt, TokenizerOpt, check_text_options
from ttcompress.data import balanced_subset, load_dataset, text_tokenizer
from ttcompress.decompose.cp import cp_progress
from ttcompress.report.evaluation import resolve_device
from ttcompress.errors import DataError, UserInputError
from ttcompress.compression.dryrun import PlanPreview, preview_plan
from ttcompress.compression.plan import Plan
from ttcompress.checkpoint.io import load_checkpoint
from ttcompress.cli.recorded import recorded_dataset
from ttcompress.compression.pipeline import DecomposeResult, decompose_file, default_output_path
from ttcompress.compression.blockwise import (
    PER_BLOCK_RATIO,
    decompose_sharded,
    default_sharded_output,
    is_blockwise_dir,
)
from ttcompress.compression.blockwise_preview import preview_sharded

app = command_app()

_CALIB = "Calibration (data-aware decomposition)"

DecomposeDeviceOpt = Annotated[str, typer.Option(
    "--device", help="Where the decompositions (CP-ALS, Tucker-2, TT-SVD, SVD) run, one layer at a time: "
    "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps. Only the layer in flight is copied there; the model stays where it is loaded (CPU).",
    metavar="DEVICE")]


def calibration_set(data: str, *, root: Any,  samples: int, seed: int, tokenizer: Any = None,
                    seq_len: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``samples`` class-balanced, seeded inputs of ``data``'s training split, and their description
    (``text:`` data tokenized with ``tokenizer`` into sequences of ``seq_len`` tokens)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserInputError(f"--calib-samples must be a positive integer, got {samples}")
    bundle = load_dataset(data, root=root, tokenizer=tokenizer, seq_len=seq_len)
    if len(bundle.train) == 0:
        raise DataError(f"dataset {data!r} has an empty training split; nothing to calibrate on")
    subset = balanced_subset(bundle.train, min(samples, len(bundle.train)), seed=seed)
    info = {"dataset": bundle.name, "samples": len(subset), "seed": seed, "split": "train",
            "balanced": bundle.has_labels}
    with named_calibration(info):  # the data are ours: gathered where they lie, not copied into batches
        rows = gather_in_place(subset)
    if rows is None:
        return subset, info
    # handed over: the batches (views of the loaded file, the only references to it once this returns)
    # are dropped after the last layer's statistics, before it is fitted
    return HandedOverBatches(rows.split(DEFAULT_BATCH_SIZE)), info

def default_calibration(model: Path, *, root: Any, samples: int, seed: int
                        ) -> tuple[Any, dict[str, Any] | None, str | None]:
    """Calibration on the dataset the checkpoint records (see :func:`recorded_dataset`), if it loads.

    Returns ``(calib, info, note)``. A recorded dataset that needs files the user has not pointed
    to (``--data-root``) leaves the decomposition data-free, with a ``note`` saying how to
    calibrate: the caller shows it once the decomposition succeeded, so that a refused request
    stays one line (the last line, :func:`calibration_line`, says which data were used).
    """
    name = recorded_dataset(model)
    if name is None:
        return None, None, None
    try:
        calib, info = calibration_set(name, root=root, samples=samples, seed=seed)
    except DataError as exc:
        return None, None, (f"note: {model.name} was trained on {name!r}, which did not load ({exc}); decomposed "
                            f"data-free (pass --data {name} --data-root DIR to calibrate)")
    return calib, {**info, "source": "recorded in the checkpoint"}, None


def calibration_line(calibration: Any) -> str:
    """``calibrated on 512 samples of 'mnist-5k'`` (with ``(SOURCE)`` when the info names where the data
    came from, e.g. ``recorded in the checkpoint``) or ``data-free (no calibration data)``."""
    if not calibration.get("used"):
        return "data-free (no calibration data)"
    name, n = calibration.get("dataset"), calibration.get("samples")
    what = f"{n} samples of {name!r}" if name is not None and n is not None else "the given data"
    source = calibration.get("source")
    return f"calibrated on {what}" + (f" ({source})" if source else "")


def _decompose_with_progress(model: Path, *, output: Optional[Path], plan: Plan, load: dict[str, Any],
                             calib: Any, calib_info: Any, console: Any = None, device: str = "auto",
                             calib_memory: Any = None, overwrite: bool = False) -> Any:
    """:func:`ttcompress.compression.pipeline.decompose_file` with progress bars on ``console`` (default: stderr).

    A sharded Llama-style directory is compressed one transformer block at a time
    (:func:`ttcompress.compression.blockwise.decompose_sharded`; the bar counts blocks) into a
    sharded directory. Bars (layers done, the current layer's CP-ALS sweeps with error and time left, and the calibration
    statistics pass in progress) are drawn
    only when the console is a terminal, also with ``--json`` (which concerns stdout only).
    """
    with DecomposeProgress(err if console is None else console) as bars:
        with cp_progress(bars.cp if bars.enabled else None), calib_progress(bars.stats if bars.enabled else None):
            if is_blockwise_dir(model) and load.get("arch") is None:  # one transformer block at a time
                return decompose_sharded(model, output=output, plan=plan, progress=bars.layer, calib_data=calib,
                                         calib_info=calib_info, device=device, calib_memory=calib_memory,
                                         overwrite=overwrite)
            return decompose_file(model, output=output, plan=plan, progress=bars.layer, calib_data=calib,
                                  calib_info=calib_info, device=device, calib_memory=calib_memory, **load)


def preview_file(model: Path, *, plan: Plan, **load_options: Any) -> PlanPreview:
    """Load ``model`` and preview ``plan`` on it (nothing is decomposed or written); a sharded
    Llama-style directory one transformer block at a time (:func:`preview_sharded`)."""
    if is_blockwise_dir(model) and load_options.get("arch") is None:
        return preview_sharded(model, plan)
    return preview_plan(load_checkpoint(model, **load_options).model, plan)


@app.command("decompose")
@cli_errors
@with_format_flags()
def decompose(
    model: ModelArg,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    format_flags: Optional[dict[str, Any]] = None,
    target_ratio: TargetRatioOpt = None,
    formats: FormatsOpt = None,
    layers: LayersOpt = None,
    exclude: ExcludeOpt = None,
    min_saving: MinSavingOpt = None,
    max_error: MaxErrorOpt = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Calibrate on this dataset's training split (any dataset train accepts): each layer is "
        "fitted to the dense layer's outputs, and --target-ratio ranks follow the measured output error. "
        "Default: the built-in dataset a ttcompress checkpoint records (every model train writes); --no-calib "
        "for none.",
        show_default=False, metavar="NAME", rich_help_panel=_CALIB)] = None,
    data_root: DataRootOpt = None,
    seq_len: SeqLenOpt = None,
    tokenizer: TokenizerOpt = None,
    calib_samples: CalibSamplesOpt = DEFAULT_CALIB_SAMPLES,
    calib_memory: CalibMemoryOpt = None,
    no_calib: NoCalibOpt = False,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the calibration sample.", metavar="INT", rich_help_panel=_CALIB)] = 0,
    plan: PlanOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the per-layer plan, projected parameters and compression, the format auto would "
        "pick, and each layer's data-free weight error: exact where the layer is cheap to decompose (it is "
        "decomposed and measured), else an upper bound (≤) or an estimate (~); write nothing. With --json: as JSON.")] = False,
    json_: JsonOpt = False,
    device: DecomposeDeviceOpt = "auto",
) -> None:
    """Compress MODEL (default: nn.Linear -> TT-matrix, nn.Conv2d -> CP; see --format); write a ttcompress checkpoint.

    The output (default: MODEL's name with .tt.pt, next to it) is written atomically: on any error nothing is written. An existing output is replaced only with --overwrite. The per-layer table goes to stdout, progress to stderr.
    """
    check_inputs(model, plan)
    check_text_options(data, seq_len=seq_len, tokenizer=tokenizer)
    the_plan = plan_from_flags(
        plan=plan, **(format_flags or {}),
        layers=layers, exclude=exclude, target_ratio=target_ratio, formats=formats,
        min_saving=min_saving, max_error=max_error,
    )
    kwargs = parse_arch_kwargs(arch_kwargs)
    memory = None if calib_memory is None else check_calib_memory(calib_memory)
    if dry_run:
        preview = preview_file(model, plan=the_plan, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle,
                               trust_code=trust_code)  # fmt: skip
        if json_:
            out.print_json(json.dumps(preview.to_dict()))
        else:
            print_table(preview_table(preview, title=f"ttcompress decompose --dry-run {model.name}"))
        err.print("dry run: nothing written; weight errors are data-free (no calibration)")
        return
    if is_blockwise_dir(model):  # written as a directory
        check_dir_output(Path(output if output is not None else default_sharded_output(model)), overwrite=overwrite,
                         inputs=[model, plan, *data_inputs(data)])
    else:
        check_outputs([output if output is not None else default_output_path(model)], overwrite=overwrite,
                      inputs=[model, plan, *data_inputs(data)])
    resolve_device(device)  # --device cuda without CUDA: one line, before anything is loaded
    note = None
    if no_calib:
        calib, calib_info = None, None
    elif data is not None:
        calib, calib_info = calibration_set(data, root=data_root, samples=calib_samples, seed=seed,
                                            tokenizer=text_tokenizer(data, tokenizer, model), seq_len=seq_len)
    else:
        calib, calib_info, note = default_calibration(model, root=data_root, samples=calib_samples, seed=seed)
    load = {"arch": arch, "arch_kwargs": kwargs, "trust_pickle": trust_pickle, "trust_code": trust_code}
    result = _decompose_with_progress(model, output=output, plan=the_plan, load=load, calib=calib,
                                      calib_info=calib_info, device=device, calib_memory=memory, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (and writes)
        return
    if note is not None:
        err.print(note)
    if calib is not None and the_plan.target_ratio is not None and is_blockwise_dir(model) and arch is None:
        err.print(f"note: {PER_BLOCK_RATIO}")
    if json_:
        out.print_json(json.dumps(result.to_dict()))
        return
    print_table(layer_table(result.result))
    err.print(f"{calibration_line(result.calibration)}; wrote {result.output}")


__all__ = ["DecomposeResult", "decompose"]
