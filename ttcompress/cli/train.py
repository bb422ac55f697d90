"""``ttcompress train``: train a built-in (or any) architecture from scratch on a dataset.

A thin shell over :func:`ttcompress.training.api.train_arch`. The training options (``--epochs``,
``--lr``, ...) are generated from :class:`~ttcompress.training.config.TrainConfig`'s fields
(:func:`ttcompress.cli.config_options.config_options`), the same for ``finetune`` and ``sweep``; the
data options shared with them are defined here (``Annotated`` aliases); the model path,
``--arch-kwargs``, ``--trust-pickle``, ``-o`` and ``--json`` come from :mod:`ttcompress.cli.options`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import check_inputs, check_outputs, cli_errors, data_inputs, err, out
from ttcompress.errors import UserInputError
from ttcompress.cli.options import ArchKwargsOpt, JsonOpt, OutputOpt, OverwriteOpt, TrustCodeOpt, TrustPickleOpt, parse_arch_kwargs
from ttcompress.cli.config_options import config_options, field_option
from ttcompress.training.config import DISTILL_PANEL, RUN_PANEL, TrainConfig
from ttcompress.training.records import TrainResult

app = command_app()

_DATA = "Data"
_RUN = RUN_PANEL
_KD = DISTILL_PANEL

# ----------------------------------------------------------------------------- shared options
_DATA_HELP = ("Dataset: mnist-5k (embedded, offline), mnist, fashion-mnist, cifar10, imagefolder:PATH, "
              "tensors:FILE (.pt/.npz/.safetensors with 'inputs' and optional 'targets' and 'attention_mask'), "
              "text:FILE_OR_DIR (text or JSON lines, tokenized with the model's tokenizer.json), or "
              "package.module:callable (your code, returning a Dataset, a (train, test) pair or DataLoaders).")
DataOpt = Annotated[str, typer.Option("--data", help=_DATA_HELP, metavar="NAME", rich_help_panel=_DATA)]
#: ``--data`` of commands that take a model file: default, the built-in dataset the file records.
ModelDataOpt = Annotated[Optional[str], typer.Option(
    "--data", help=_DATA_HELP + " Default: the built-in dataset the model file records, else mnist-5k.",
    show_default=False, metavar="NAME", rich_help_panel=_DATA)]
DataRootOpt = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Directory of mnist/fashion-mnist/cifar10 files (torchvision layout, or the IDX files "
    "directly; fashion-mnist defaults to /usr/share/datasets/fashion-mnist when present).",
    show_default=False, metavar="DIR", rich_help_panel=_DATA)]
DownloadOpt = Annotated[bool, typer.Option(
    "--download", help="Download the dataset into --data-root when it is missing.", rich_help_panel=_DATA)]
ImageSizeOpt = Annotated[Optional[int], typer.Option(
    "--image-size", help="Image side for imagefolder:PATH (default 224).", show_default=False, metavar="INT",
    rich_help_panel=_DATA)]
SeqLenOpt = Annotated[Optional[int], typer.Option(
    "--seq-len", help="Tokens per sequence of text:FILE_OR_DIR data (default: the model's context length from its "
    "config.json, at most 512).", show_default=False, metavar="INT", rich_help_panel=_DATA)]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="Directory holding the tokenizer.json that tokenizes text:FILE_OR_DIR data (or that file). "
    "Default: the model's directory, or the directory a compressed checkpoint was made from.",
    show_default=False, metavar="DIR", rich_help_panel=_DATA)]


def check_text_options(data: str | None, *, seq_len: int | None, tokenizer: Path | None) -> None:
    """One line (exit 2) for ``--seq-len``/``--tokenizer`` that cannot apply, before any work."""
    if seq_len is not None and seq_len < 1:
        raise UserInputError(f"--seq-len must be a positive integer, got {seq_len}")
    is_text = data is not None and data.strip().lower().startswith("text:")
    for flag, value in (("--seq-len", seq_len), ("--tokenizer", tokenizer)):
        if value is not None and not is_text:
            raise UserInputError(f"{flag} applies to text:FILE_OR_DIR data only (--data {data or 'not given'})")


DeviceOpt = field_option(TrainConfig, "device")
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue from OUT's resume state (NAME.resume.pt next to -o) after an interruption; "
    "use the same options.", rich_help_panel=_RUN)]
TeacherOpt = Annotated[Optional[Path], typer.Option(
    "--teacher", help="Distill from this model file (e.g. the dense baseline).", show_default=False,
    metavar="MODEL", rich_help_panel=_KD)]


def require_output(
    output: Optional[Path], *, overwrite: bool, resume: bool, inputs: tuple[Optional[Path], ...] = ()
) -> Path:
    """``-o``, checked by the overwrite rule over every file of the run (see :func:`run_paths`).

    With ``resume`` the run's files are its own and are continued; otherwise an existing one
    needs ``overwrite``. ``-o`` (or a file of the run) equal to an input is always refused.
    """
    from ttcompress.training.records import run_paths

    if output is None:
        raise UserInputError("missing -o/--output: where to write the trained model")
    check_inputs(*inputs)
    paths = run_paths(output)
    check_outputs([paths.best, paths.last, paths.resume, paths.metrics], overwrite=overwrite or resume, inputs=inputs)
    return output


def render_result(result: TrainResult, *, json_: bool, title: str) -> None:
    """Per-epoch table (or JSON) on stdout, file names and interruption notice on stderr (rank 0)."""
    from ttcompress.cli.progress import history_table

    if result.rank != 0:
        return
    paths = result.paths
    if json_:
        out.print_json(json.dumps(result.to_dict()))
    elif result.history:
        rows = result.history if result.start is None else (result.start, *result.history)
        out.print(history_table(rows, title=title))
    if result.interrupted:
        if result.history and paths.resume.is_file():
            err.print(
                f"interrupted: saved the current weights to {paths.last}; continue with the same command plus "
                "--resume"
            )
        else:
            err.print("interrupted before the first epoch ended: nothing was saved")
        raise typer.Exit(code=130)
    if result.kept_start and result.history:
        err.print(
            f"no epoch beat the starting model on the validation split ({_best_score(result)}): "
            f"kept it as the best checkpoint {paths.best}"
        )
    elif result.best_epoch is not None:
        err.print(
            f"best: epoch {result.best_epoch}, {_best_score(result)} -> {paths.best} "
            f"(last: {paths.last.name}, metrics: {paths.metrics.name}, resume state: {paths.resume.name})"
        )


def _best_score(result: TrainResult) -> str:
    if result.best_accuracy is not None:
        return f"val acc {100 * result.best_accuracy:.2f}%"
    start = () if result.start is None else (result.start,)
    best = next((r for r in (*start, *result.history) if r.epoch == result.best_epoch), None)
    return f"val loss {best.val_loss:.4g} (no class labels: no accuracy)" if best else "no accuracy"


@app.command("train")
@cli_errors
@config_options(TrainConfig, command="train")
def train(
    *,
    arch: Annotated[str, typer.Option(
        "--arch", help="Architecture: seed-cnn, seed-fc3, seed-tt2, lenet5, torchvision:NAME or "
        "package.module:callable. Built-ins adapt classes/channels/size to --data.", metavar="NAME")],
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    arch_kwargs: ArchKwargsOpt = None,
    data: DataOpt = "mnist-5k",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    image_size: ImageSizeOpt = None,
    config: TrainConfig,
    resume: ResumeOpt = False,
    teacher: TeacherOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Train ARCH from scratch on --data and write a ttcompress checkpoint to -o.

    Writes the best epoch (by validation accuracy) to OUT, and next to it NAME.last.EXT,
    NAME.resume.pt and NAME.metrics.jsonl; existing ones are replaced only with --overwrite (or
    continued with --resume). Runs data-parallel under torchrun.

    Example: ttcompress train --arch seed-cnn --data mnist-5k --epochs 5 -o baseline.pt
    """
    from ttcompress.cli.progress import RichProgress
    from ttcompress.training.api import train_arch

    progress = RichProgress(err)
    try:
        result = train_arch(
            arch, output=require_output(output, overwrite=overwrite, resume=resume, inputs=(teacher, *data_inputs(data))), arch_kwargs=parse_arch_kwargs(arch_kwargs), data=data,
            data_root=data_root, download=download, image_size=image_size, config=config, teacher=teacher,
            trust_pickle=trust_pickle, trust_code=trust_code, progress=progress, resume=resume,
        )  # fmt: skip
    finally:
        progress.close()
    render_result(result, json_=json_, title=f"train {arch} on {data}")
