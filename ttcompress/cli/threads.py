"""``--threads N``: one option, defined here once and added to every command by :func:`add_threads_option`.

The command's own code never sees the option: the wrapper sets torch's intra-op thread count for
the command's run and restores it afterwards. Without it, torch's default applies (all cores, or
``OMP_NUM_THREADS`` when set). The decompositions' own thread juggling (one thread for small
eigensolvers and ALS problems, :mod:`ttcompress.decompose._threads`) only ever lowers the count.
Nothing here imports torch until a command runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Annotated, Any, Optional

import click
import typer

from ttcompress.cli._common import fail

__all__ = ["THREADS_HELP", "ThreadsOpt", "add_threads_option", "intra_op_threads", "requested_threads"]

THREADS_HELP = ("Intra-op CPU threads for this command (default: torch's, i.e. all cores or OMP_NUM_THREADS). "
                "Must be >= 1.")

ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help=THREADS_HELP, show_default=False, metavar="N")]

_state: dict[str, int | None] = {"threads": None}


def _threads_param() -> click.Parameter:
    """The ``--threads`` parameter, built by typer from :data:`ThreadsOpt` like every other option."""
    probe = typer.Typer()

    @probe.command()
    def _probe(threads: ThreadsOpt = None) -> None:  # pragma: no cover - never called
        pass

    return typer.main.get_command(probe).params[0]


def requested_threads() -> int | None:
    """The ``--threads`` value of the running command, None when it was not given."""
    return _state["threads"]


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block (unchanged for None), restored after."""
    if threads is None:
        yield
        return
    import torch  # only once a command runs: `ttcompress --help` does not import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    _state["threads"] = threads
    try:
        yield
    finally:
        _state["threads"] = None
        torch.set_num_threads(before)


def add_threads_option(command: click.Command) -> click.Command:
    """Give ``command`` the ``--threads N`` option (once); its run happens under :func:`intra_op_threads`."""
    if any(param.name == "threads" for param in command.params) or command.callback is None:
        return command
    command.params.append(_threads_param())
    callback = command.callback

    @functools.wraps(callback)
    def run(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        if threads is not None and threads < 1:
            raise fail(f"--threads must be a positive integer, got {threads}")
        with intra_op_threads(threads):
            return callback(*args, **kwargs)

    command.callback = run
    return command
