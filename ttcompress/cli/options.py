"""Shared command-line options (``Annotated`` aliases), reused by every command.

Use them as parameter annotations::

    @app.command()
    @cli_errors
    def mycommand(model: ModelArg, arch: ArchOpt = None, output: OutputOpt = None, json_: JsonOpt = False):
        ...

:func:`parse_arch_kwargs` turns the ``--arch-kwargs`` JSON string into a dict (``ValueError``
otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ttcompress.cli.flags import SET_PARAM, format_flags, parse_set
from ttcompress.errors import InputError, UserInputError
from ttcompress.formats import format_names, get_format
from ttcompress.compression.plan import Plan
from ttcompress.compression.planfile import NONE, plan_from_options, plan_kwargs

__all__ = [
    "ArchKwargsOpt",
    "ArchOpt",
    "CalibMemoryOpt",
    "CalibSamplesOpt",
    "MaxErrorOpt",
    "MinSavingOpt",
    "NoCalibOpt",
    "ExcludeOpt",
    "FormatsOpt",
    "LayersOpt",
    "TargetRatioOpt",
    "parse_list",
    "parse_one",
    "plan_from_flags",
    "JsonOpt",
    "ModelArg",
    "OutputOpt",
    "OverwriteOpt",
    "PlanOpt",
    "TrustCodeOpt",
    "TrustPickleOpt",
    "parse_arch_kwargs",
]

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file: a ttcompress checkpoint, a state dict (.pt/.pth/.safetensors, needs --arch), "
        "a Hugging Face directory (config.json + model.safetensors), or a whole pickled nn.Module (needs "
        "--trust-pickle).",
        show_default=False,
        metavar="MODEL",
    ),
]

ArchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="Architecture of a bare state dict, or of a checkpoint that records none: a built-in name "
        "(seed-cnn, seed-fc3, seed-tt2, lenet5), torchvision:NAME (e.g. torchvision:resnet18), hf:CLASS "
        "(--arch-kwargs '{\"config\": {...}}'), package.module:callable, or the dense model's own file.",
        show_default=False,
        metavar="NAME",
    ),
]

ArchKwargsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch-kwargs",
        help='Constructor arguments for --arch, as a JSON object, e.g. \'{"num_classes": 10}\'.',
        show_default=False,
        metavar="JSON",
    ),
]

TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow loading a whole pickled nn.Module (torch.save(model)). Unpickling can run "
        "arbitrary code: use only for files from a source you trust.",
    ),
]

TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow a checkpoint to name its architecture as package.module:callable, which is then "
        "imported and called. Without it, only built-in names, torchvision:NAME and the --arch you give "
        "are accepted from a file. Use only for files from a source you trust.",
    ),
]

OutputOpt = Annotated[
    Optional[Path],
    typer.Option("-o", "--output", help="Output file (written atomically).", show_default=False, metavar="PATH"),
]

OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace output files that already exist (without it, an existing output is an error).",
    ),
]

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print a machine-readable JSON summary on stdout instead of the table."),
]

PlanOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--plan",
        help="Plan file (YAML or JSON): defaults, --layers/--exclude patterns and per-layer rules "
        "(name pattern -> a format name or dense, and its ranks/eps/d/ratio). Command-line options override it.",
        show_default=False,
        metavar="FILE",
    ),
]


InputShapeOpt = Annotated[Optional[str], typer.Option(
    "--input-shape", help="One sample's shape, e.g. 1,28,28 or 12 (token ids) (default: the shape the model "
    "records, or the data's).", show_default=False, metavar="C,H,W")]


def parse_input_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--input-shape`` (``1,28,28`` or ``1x28x28``) as a tuple, None when not given."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UserInputError(f"--input-shape must be comma-separated sizes such as 1,28,28; got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserInputError(f"--input-shape must be positive sizes, got {text!r}")
    return shape


def parse_arch_kwargs(text: str | None, *, option: str = "--arch-kwargs") -> dict[str, Any] | None:
    """Parse a JSON object given on the command line; ``None`` stays ``None``.

    Raises
    ------
    UserInputError
        Not valid JSON, or not a JSON object (a ``ValueError``).
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{option} must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{option} must be a JSON object, got {type(value).__name__}")
    return value


PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", help="Also draw accuracy vs compression (log x, Pareto front marked) to this file; "
    "the extension picks the format: .png (150 dpi), .pdf or .svg.", show_default=False, metavar="FILE")]
PlotXOpt = Annotated[str, typer.Option(
    "--x", help="Horizontal axis of --plot, as baseline / model: params (compression), flops, size (file "
    "size) or latency (speed-up).", metavar="AXIS")]
PlotTitleOpt = Annotated[Optional[str], typer.Option(
    "--title", help="Title of --plot (default: Accuracy vs compression — DATASET).", show_default=False,
    metavar="TEXT")]


# ---- plan options: shared by decompose, inspect and (as lists) sweep -------------------------------
# The per-format flags (--tt-ranks, --cp-ratio, --svd-rank, ..., --set) are generated from the formats'
# settings: ttcompress.cli.flags.with_format_flags.
_RANKS = "Ranks (pick at most one way per format)"
_SELECT = "Layer selection"
_FORMAT_HELP = "; ".join(f"{n} ({get_format(n).summary})" for n in format_names())


TargetRatioOpt = Annotated[Optional[float], typer.Option(
    "--target-ratio", help="Whole-model parameter compression to reach (> 1): per-layer ranks are chosen "
    "greedily where they lower the estimated reconstruction error most; with no --format, each layer "
    "then gets the format with the lowest error at its budget (auto).",
    show_default=False, metavar="FLOAT", rich_help_panel=_RANKS)]
FormatsOpt = Annotated[Optional[list[str]], typer.Option(
    "--format", help=f"Format to use: {_FORMAT_HELP}. Each layer gets the first given format that compresses its type; a type none covers stays dense "
    "(unless its own options, such as --tt-ranks or --set, are given). Repeatable, or comma-separated. Once any "
    "per-format option is given, a layer type whose options are not given stays dense.",
    show_default=False, metavar="NAME", rich_help_panel=_RANKS)]
LayersOpt = Annotated[Optional[list[str]], typer.Option(
    "--layers", help="Compress only layers whose qualified name matches this glob (repeatable, or comma-separated).",
    show_default=False, metavar="GLOB", rich_help_panel=_SELECT)]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude", help="Keep layers matching this glob dense (repeatable, or comma-separated).",
    show_default=False, metavar="GLOB", rich_help_panel=_SELECT)]

MinSavingOpt = Annotated[Optional[float], typer.Option(
    "--min-saving", help="Keep a layer dense when compressing it saves less than this fraction of the model's "
    "params at an error above --max-error (default 0.01 with calibration data, 0 = off without).",
    show_default=False, metavar="FLOAT", rich_help_panel=_SELECT)]
MaxErrorOpt = Annotated[Optional[float], typer.Option(
    "--max-error", help="Error above which --min-saving applies (output error after calibration, else weight "
    "error; default 0.5).", show_default=False, metavar="FLOAT", rich_help_panel=_SELECT)]

# ---- calibration: shared by decompose and sweep ---------------------------------------------------
_CALIB = "Calibration (data-aware decomposition)"
CalibSamplesOpt = Annotated[int, typer.Option(
    "--calib-samples", help="Calibration samples (class-balanced, seeded) from the training split.",
    metavar="INT", rich_help_panel=_CALIB)]
CalibMemoryOpt = Annotated[Optional[str], typer.Option(
    "--calib-memory", help="Memory budget of one layer's calibration statistics, e.g. 4G or 512M (at least "
    "16M; default: a quarter of the available memory, at most 2G). Wider layers are sketched to fit, or fitted data-free "
    "when even the smallest sketch does not fit (the layer's note says which).", show_default=False,
    metavar="SIZE", rich_help_panel=_CALIB)]
NoCalibOpt = Annotated[bool, typer.Option(
    "--no-calib", help="Ignore --data for the decomposition: data-free.", rich_help_panel=_CALIB)]

def parse_one(text: str | None, *, option: str, kind: type) -> Any:
    """One value of a per-format option: ``None`` (not given), ``"none"`` (dense) or a ``kind``.

    Raises
    ------
    UserInputError
        A list (``3,6``: lists are what ``sweep`` takes) or a value that is not a ``kind``.
    """
    if text is None:
        return None
    text = text.strip()
    if text.lower() == NONE:
        return NONE
    if "," in text:
        raise UserInputError(f"{option} takes one value here, got {text!r}; lists of values are for "
                             f"`ttcompress sweep` (e.g. sweep {option} {text})")
    try:
        return kind(text)
    except ValueError:
        raise UserInputError(f"{option} must be {'an integer' if kind is int else 'a number'} or none, "
                             f"got {text!r}") from None


def parse_list(text: str | None, *, option: str, kind: type, allow_none: bool = True) -> list[Any]:
    """``"2,4,8"`` → ``[2, 4, 8]`` (``kind`` int, float or str); ``None`` → ``[]``.

    With ``allow_none``, the item ``none`` stays the string ``"none"`` (for a format's option: that
    layer type dense; for another option: not given, in that setting).
    """
    if text is None:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserInputError(f"{option} needs a comma-separated list, e.g. {option} 2,4,8")
    try:
        return [NONE if (allow_none and t.lower() == NONE) else kind(t) for t in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserInputError(f"{option} must be comma-separated {what}{' or none' if allow_none else ''}, "
                             f"got {text!r}") from None


def plan_from_flags(
    *,
    plan: Path | None,
    formats: list[str] | None,
    layers: list[str] | None,
    exclude: list[str] | None,
    target_ratio: float | None,
    min_saving: float | None = None,
    max_error: float | None = None,
    set: list[str] | None = None,
    **format_options: str | None,
) -> Plan:
    """The :class:`~ttcompress.compression.plan.Plan` of ``decompose``/``inspect``'s plan flags.

    ``format_options`` are the raw texts of the generated per-format flags by their Python name
    (``tt_ranks="6"``, ``svd_rank="none"``, ``None``: :func:`ttcompress.cli.flags.format_flags`);
    ``set`` the ``--set FORMAT.FIELD=VALUE`` items. Bad values raise
    :class:`~ttcompress.errors.InputError`, which the CLI answers with the parameter's flag.
    """
    by_dest = {f.dest: f for f in format_flags()}
    values: dict[str, Any] = {}
    for dest, text in format_options.items():
        if dest not in by_dest:
            raise TypeError(f"plan_from_flags() got an unexpected keyword argument {dest!r}")
        flag = by_dest[dest]
        value = parse_one(text, option=flag.flag, kind=flag.kind)
        if value is not None:
            values[flag.param] = value
    for param, value in parse_set(set).items():
        if param in values:
            raise InputError(SET_PARAM, f": {param} is given by its own flag too; give it once")
        values[param] = value
    return plan_from_options(
        plan_file=plan, layers=layers or (), exclude=exclude or (), target_ratio=target_ratio,
        formats=formats or (), min_saving=min_saving, max_error=max_error, **plan_kwargs(values),
    )
