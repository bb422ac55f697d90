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

from ttcompress.errors import UserInputError

__all__ = [
    "ArchKwargsOpt",
    "ArchOpt",
    "JsonOpt",
    "ModelArg",
    "OutputOpt",
    "OverwriteOpt",
    "PlanOpt",
    "TrustPickleOpt",
    "parse_arch_kwargs",
]

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file: a ttcompress checkpoint, a state dict (.pt/.pth/.safetensors, needs --arch), "
        "or a whole pickled nn.Module (needs --trust-pickle).",
        show_default=False,
        metavar="MODEL",
    ),
]

ArchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="Architecture of a bare state dict: a built-in name (seed-cnn, seed-fc3, seed-tt2, lenet5), "
        "torchvision:NAME (e.g. torchvision:resnet18) or package.module:callable.",
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
        "(name pattern -> format tt|cp|dense and ranks/eps/d/ratio). Command-line options override it.",
        show_default=False,
        metavar="FILE",
    ),
]


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
