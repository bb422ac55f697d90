"""``ttcompress finetune``: recover the accuracy of a (compressed) model by training it further.

A thin shell over :func:`ttcompress.training.api.finetune_file`; the training options are generated
from :class:`~ttcompress.training.config.FinetuneConfig`'s fields (:mod:`ttcompress.cli.config_options`),
the others are shared with ``ttcompress train`` (:mod:`ttcompress.cli.train`) and :mod:`ttcompress.cli.options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Annotated, Optional

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import cli_errors, data_inputs, err
from ttcompress.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    OverwriteOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    parse_arch_kwargs,
)
from ttcompress.cli.recorded import check_default_data
from ttcompress.cli.config_options import config_options
from ttcompress.cli.train import (
    DataRootOpt,
    DownloadOpt,
    ImageSizeOpt,
    ModelDataOpt,
    ResumeOpt,
    SeqLenOpt,
    TeacherOpt,
    TokenizerOpt,
    check_text_options,
    render_result,
    require_output,
)
from ttcompress.errors import UserInputError
from ttcompress.checkpoint.hf_files import read_record
from ttcompress.checkpoint.io import read_header
from ttcompress.checkpoint.teacher import TeacherChoice, default_teacher
from ttcompress.training.config import FinetuneConfig

app = command_app()


def _recorded_choice(model: Path) -> TeacherChoice:
    """What :func:`default_teacher` makes of the source model recorded by ``decompose`` in MODEL's
    header (or a Hugging Face directory's ``ttcompress.json``); nothing is printed."""
    header = read_header(model) if model.is_file() else read_record(model) if model.is_dir() else None
    return default_teacher((header or {}).get("info") or {})


def _say(choice: TeacherChoice) -> None:
    if choice.message is not None:
        err.print(choice.message, style="yellow" if choice.warning else None, highlight=False, soft_wrap=True)


def _recorded_teacher(model: Path) -> Path | None:
    """The source model recorded by ``decompose`` in MODEL's header (or a Hugging Face directory's
    ``ttcompress.json``), if unchanged (says so on stderr)."""
    choice = _recorded_choice(model)
    _say(choice)
    return choice.path


@app.command("finetune")
@cli_errors
@config_options(FinetuneConfig, command="finetune")
def finetune(
    *,
    model: ModelArg,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    data: ModelDataOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    image_size: ImageSizeOpt = None,
    seq_len: SeqLenOpt = None,
    tokenizer: TokenizerOpt = None,
    config: FinetuneConfig,
    resume: ResumeOpt = False,
    teacher: TeacherOpt = None,
    teacher_arch: Annotated[Optional[str], typer.Option(
        "--teacher-arch", help="Architecture of a --teacher that is a bare state dict (same forms as --arch; "
        "default: the student's recorded architecture).", show_default=False, metavar="NAME",
        rich_help_panel="Distillation")] = None,
    teacher_arch_kwargs: Annotated[Optional[str], typer.Option(
        "--teacher-arch-kwargs", help="Constructor arguments for --teacher-arch, as a JSON object.",
        show_default=False, metavar="JSON", rich_help_panel="Distillation")] = None,
    no_distill: Annotated[bool, typer.Option(
        "--no-distill", help="Do not distill from the source model that decompose recorded (the default teacher "
        "when that file is still there and unchanged).", rich_help_panel="Distillation")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Fine-tune MODEL on --data and write the best checkpoint to -o.

    Writes the best epoch (by validation accuracy) to OUT, and next to it NAME.last.EXT,
    NAME.resume.pt and NAME.metrics.jsonl; existing ones are replaced only with --overwrite (or
    continued with --resume). Runs data-parallel under torchrun.

    Example: ttcompress finetune model.tt.pt --data mnist-5k --epochs 3 -o model.ft.pt

    Distill from a state-dict baseline: --teacher base.pt (its architecture defaults to the student's;
    or --teacher-arch NAME --teacher-arch-kwargs JSON).
    """
    from ttcompress.cli.progress import RichProgress
    from ttcompress.training.api import finetune_file

    if teacher is None and (teacher_arch is not None or teacher_arch_kwargs is not None):
        raise UserInputError("--teacher-arch and --teacher-arch-kwargs need --teacher")
    if teacher_arch is None and teacher_arch_kwargs is not None:
        raise UserInputError("--teacher-arch-kwargs needs --teacher-arch")
    data = check_default_data(model, data)  # before any work or message: a default the model cannot take
    check_text_options(data, seq_len=seq_len, tokenizer=tokenizer)
    choice = _recorded_choice(model) if teacher is None and not no_distill else None
    if choice is not None:
        teacher = choice.path
    output = require_output(output, overwrite=overwrite, resume=resume, inputs=(model, teacher, *data_inputs(data)))

    class Progress(RichProgress):
        def on_train_start(self, **kwargs: Any) -> None:
            if choice is not None:  # only once the models loaded and fit the data: a refusal stays one line
                _say(choice)
            super().on_train_start(**kwargs)

    progress = Progress(err)
    try:
        result = finetune_file(
            model, output=output, data=data, data_root=data_root, download=download,
            image_size=image_size, config=config, teacher=teacher, arch=arch,
            arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle, trust_code=trust_code,
            progress=progress, resume=resume, teacher_arch=teacher_arch,
            teacher_arch_kwargs=parse_arch_kwargs(teacher_arch_kwargs, option="--teacher-arch-kwargs"),
            tokenizer=tokenizer, seq_len=seq_len,
        )  # fmt: skip
    finally:
        progress.close()
    render_result(result, json_=json_, title=f"finetune {model.name} on {data}")
