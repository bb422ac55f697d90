"""The ``ttcompress`` command line: a Typer app whose commands are thin wrappers over the library.

Each command lives in its own module and registers itself on :data:`app`.
"""

from __future__ import annotations

import typer

from ttcompress._version import __version__
from ttcompress.cli._common import set_debug

app = typer.Typer(
    name="ttcompress",
    help="Compress trained PyTorch models with tensor decompositions "
    "(TT-matrix Linear layers, CP Conv2d layers), fine-tune them, and report the trade-off.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ttcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    set_debug(debug)


def main() -> None:
    """Console-script entry point."""
    app()


# Importing a command module registers its command(s) on ``app``.
from ttcompress.cli import (  # noqa: E402,F401  (registration side effect)
    decompose,
    demo,
    export,
    finetune,
    inspect,
    report,
    sweep,
    train,
)
