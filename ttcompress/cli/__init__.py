"""The ``ttcompress`` command line: a Typer app whose commands are thin wrappers over the library.

Each command lives in its own module (listed in :data:`COMMANDS`) with its own single-command
Typer app. The root group imports a command module only when that command is invoked, so
``ttcompress --help`` and ``ttcompress --version`` import neither torch nor any command module;
the help listing is rendered from the static one-line descriptions in :data:`COMMANDS`
(``tests/test_package.py`` checks them against the commands' docstrings).
"""

from __future__ import annotations

import sys

import importlib
import click
import typer
from typer.core import TyperCommand, TyperGroup

from ttcompress._version import __version__
from ttcompress.cli._app import TYPER_SETTINGS
from ttcompress.cli._common import set_debug
from ttcompress.cli.threads import add_threads_option

__all__ = ["COMMANDS", "app", "load_command", "main"]

#: Command name -> (module under ``ttcompress.cli``, one-line help shown by ``ttcompress --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "decompose": ("decompose", "Compress MODEL (default: nn.Linear -> TT-matrix, nn.Conv2d -> CP; see --format); write a ttcompress checkpoint."),
    "demo": ("demo", "Train seed-cnn on mnist-5k; compress it 4× to 48× (TT + CP, calibrated), fine-tune with distillation; report."),
    "train": ("train", "Train ARCH from scratch on --data and write a ttcompress checkpoint to -o."),
    "finetune": ("finetune", "Fine-tune MODEL on --data and write the best checkpoint to -o."),
    "inspect": ("inspect", "Show MODEL's layers: shapes, parameter share, what is compressible and what the plan would build."),
    "report": ("report", "Measure params, compression, file size, FLOPs, latency and accuracy of each MODEL vs BASELINE."),
    "export": ("export", "Export MODEL for deployment, checked against the model at two batch sizes before it is written."),
    "sweep": ("sweep", "For each setting (cross product of the plan axes): decompose, evaluate, fine-tune, evaluate; then report."),
}


def load_command(name: str) -> click.Command:
    """Import the module of command ``name`` and return its click command (with the shared ``--threads``)."""
    module = importlib.import_module(f"ttcompress.cli.{COMMANDS[name][0]}")
    command = typer.main.get_command(module.app)
    if command.name != name:
        raise RuntimeError(f"module ttcompress.cli.{COMMANDS[name][0]} defines {command.name!r}, not {name!r}")
    return _plain_flags(add_threads_option(command))


def _plain_flags(command: click.Command) -> click.Command:
    """On/off flags show no ``<bool>`` value column in ``--help``: they take no value."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:  # typer's own Option class, or click's
            param.metavar = ""
    make_help = command.get_help_option

    def help_option(ctx: click.Context) -> object:
        option = make_help(ctx)
        if option is not None and getattr(option, "metavar", "") is None:
            option.metavar = ""
        return option

    command.get_help_option = help_option  # type: ignore[method-assign]
    return command


class LazyGroup(TyperGroup):
    """A root group that lists commands from :data:`COMMANDS` and imports one only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(name for name in self.commands if name not in COMMANDS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            # listing only (``ttcompress --help``): a stand-in carrying the one-line help
            return TyperCommand(cmd_name, short_help=COMMANDS[cmd_name][1])
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] in COMMANDS and args[0] not in self.commands:
            self.commands[args[0]] = load_command(args[0])
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="ttcompress",
    cls=LazyGroup,
    help="Compress trained PyTorch models with tensor decompositions "
    "(TT-matrix Linear layers, CP Conv2d layers), fine-tune them, and report the trade-off.",
    no_args_is_help=True,
    **TYPER_SETTINGS,
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
    """Console-script entry point.

    A command-line mistake (an unknown option, a missing argument, a bad value) is one ``error:``
    line on stderr and exit code 2, like every other bad input, instead of Click's framed box.
    """
    # typer vendors its own click: its usage-error class is BadParameter's base
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())}{where}\n")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
