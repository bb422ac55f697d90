"""Shared CLI plumbing: error handling, the ``--debug`` switch and consoles.

Results go to stdout (``out``), progress and messages to stderr (``err``).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from ttcompress.errors import TTCompressError

# Tables are wide: when stdout is not a terminal (a pipe, a file, CI), render at 160 columns
# unless COLUMNS says otherwise, rather than rich's 80.
_PIPE_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
out = Console(soft_wrap=True, width=_PIPE_WIDTH)
err = Console(stderr=True, soft_wrap=True)

_state = {"debug": False}

# Exceptions that mean "bad input": one line on stderr, exit code 2 (traceback only with --debug).
USER_ERRORS: tuple[type[BaseException], ...] = (
    TTCompressError,
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    PermissionError,
)

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(value: bool) -> None:
    _state["debug"] = value


def is_debug() -> bool:
    return _state["debug"]


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (code 2)."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())


def cli_errors(fn: F) -> F:
    """Decorator for commands: turn user errors into one stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if is_debug():
                raise
            raise fail(_one_line(exc)) from None
        except KeyboardInterrupt:
            if is_debug():
                raise
            print("interrupted", file=sys.stderr)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]
