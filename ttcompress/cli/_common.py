"""Shared CLI plumbing: error handling, the ``--debug`` switch, consoles and the overwrite rule.

Results go to stdout (``out``), progress and messages to stderr (``err``).

Errors (see ``docs/cli.md``, "Errors and exit codes"):

* a user error (:data:`USER_ERRORS`: our own :class:`~ttcompress.errors.TTCompressError`
  types, an :class:`~ttcompress.errors.InputError` with its parameter's flag added
  (:func:`ttcompress.cli.flags.with_flag`), ``OSError`` from reading or writing files, ``MemoryError``, ``RecursionError``) is one
  ``error: ...`` line on stderr and exit code 2, as is the allocator's out-of-memory
  ``RuntimeError`` / ``torch.OutOfMemoryError`` (``out of memory: ... needs N GB``);
* any other exception is a bug in ttcompress: an ``internal error: ...`` line, the traceback, and
  exit code :data:`EXIT_INTERNAL` (70, ``EX_SOFTWARE``);
* Ctrl-C exits with code 130; ``--debug`` lets every exception propagate with its traceback;
* log lines and warnings of transformers (and huggingface_hub, safetensors, tokenizers) are shown
  only with ``--debug`` (:func:`quiet_libraries`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import sys
import traceback
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from ttcompress.cli.flags import with_flag
from ttcompress.errors import InputError, OutputExistsError, TTCompressError, UserInputError
from ttcompress.fsutil import check_not_inputs
from ttcompress.memory import out_of_memory_message

DEFAULT_PIPE_WIDTH = 160


def pipe_width(environ: Any = os.environ) -> int:
    """Width of tables when stdout is not a terminal: ``COLUMNS`` when it is a positive int, else 160.

    A bad value (``COLUMNS=abc``, ``0``, ``-5``) falls back to the default instead of failing.
    """
    text = str(environ.get("COLUMNS", "")).strip()
    if text.isdigit() and 0 < int(text) <= 10_000:
        return int(text)
    return DEFAULT_PIPE_WIDTH


# Tables are wide: when stdout is not a terminal (a pipe, a file, CI), render at 160 columns
# unless COLUMNS says otherwise, rather than rich's 80.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else pipe_width())
err = Console(stderr=True, soft_wrap=True)

_state = {"debug": False}

# Exceptions that mean "bad input or environment": one line on stderr, exit code 2 (traceback only
# with --debug). Not ValueError/TypeError: outside our own error types they mean a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    TTCompressError,
    OSError,
    MemoryError,
    RecursionError,
)

EXIT_USER = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): an internal software error
BUG_REPORT = "please report it, with the traceback above, to the ttcompress maintainers"

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(value: bool) -> None:
    _state["debug"] = value


def is_debug() -> bool:
    return _state["debug"]


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (code 2)."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=EXIT_USER)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        text = f"out of memory{': ' + str(exc) if str(exc) else ''}"
    elif isinstance(exc, RecursionError):
        text = "input nested too deeply (maximum recursion depth exceeded)"
    elif isinstance(exc, InputError):  # the parameter's flag, from one table (ttcompress.cli.flags)
        text = with_flag(exc)
    elif isinstance(exc, OSError) and not isinstance(exc, TTCompressError) and exc.strerror:
        text = exc.strerror
        where = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
        if where:
            text = f"{text}: {' -> '.join(where)}"
    else:
        text = _worker_cause(str(exc).strip()) or type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
    return " ".join(text.split())


def _worker_cause(text: str) -> str:
    """The original message of an exception re-raised from a DataLoader worker (its last line)."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head else last


def internal_error(exc: BaseException) -> typer.Exit:
    """Print the traceback and ``internal error: ...`` on stderr; return the exit to raise (code 70)."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    summary = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    print(f"internal error: {summary}; this is a bug in ttcompress, {BUG_REPORT}", file=sys.stderr)
    return typer.Exit(code=EXIT_INTERNAL)


#: Libraries whose log lines and warnings are shown only with ``--debug``: they would break the
#: one-line rule (transformers warns about a config value, then the error follows).
QUIET_LIBRARIES = ("transformers", "huggingface_hub", "safetensors", "tokenizers")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide :data:`QUIET_LIBRARIES`' log records and Python warnings (unless ``--debug``)."""
    if is_debug():
        yield
        return
    saved_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    # transformers sets its logger's level from this variable when it first configures it, which
    # may happen inside the command (it is imported on first use)
    os.environ["TRANSFORMERS_VERBOSITY"] = "critical"
    loggers = [logging.getLogger(name) for name in QUIET_LIBRARIES]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=rf"^({'|'.join(QUIET_LIBRARIES)})(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if saved_env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = saved_env


def cli_errors(fn: F) -> F:
    """Decorator for commands: user errors → one stderr line, exit 2; anything else → internal error.

    Third-party libraries' log lines and warnings are hidden (:func:`quiet_libraries`) unless ``--debug``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with quiet_libraries():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except USER_ERRORS as exc:
            if is_debug():
                raise
            raise fail(_one_line(exc)) from None
        except KeyboardInterrupt:
            if is_debug():
                raise
            print("interrupted", file=sys.stderr)
            raise typer.Exit(code=130) from None
        except Exception as exc:
            if is_debug():
                raise
            oom = out_of_memory_message(exc)  # the allocator's RuntimeError: too large, not a bug
            if oom is not None:
                raise fail(oom) from None
            raise internal_error(exc) from None

    return wrapper  # type: ignore[return-value]


def check_outputs(
    paths: Iterable[str | os.PathLike[str] | None],
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """The overwrite rule: refuse to replace an existing output unless ``overwrite`` is set.

    An output that is one of the command's ``inputs`` or lies inside an input directory is
    refused even with ``overwrite`` (:func:`ttcompress.fsutil.check_not_inputs`).

    Raises
    ------
    OutputExistsError
        One of ``paths`` exists (a directory is always refused) and ``overwrite`` is False, or
        it would write over one of ``inputs``.
    """
    paths = list(paths)
    check_not_inputs(paths, inputs)
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise OutputExistsError(f"output path is a directory: {p}")
        if not overwrite and (p.exists() or p.is_symlink()):
            raise OutputExistsError(f"{p} already exists; pass --overwrite to replace it")


def check_dir_output(output: Path, *, overwrite: bool, inputs: Iterable[str | os.PathLike[str] | None] = ()) -> None:
    """The output rule for a directory output: it may exist only with --overwrite, and is not an input."""
    check_not_inputs([output], inputs, replaces_directory=True)
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")


def data_inputs(data: str | None) -> list[Path]:
    """The files or directories a ``--data`` name reads (``tensors:FILE``, ``imagefolder:PATH``), as inputs."""
    if data is None:
        return []
    kind, sep, rest = data.strip().partition(":")
    return [Path(rest)] if sep and rest and kind.lower() in ("tensors", "imagefolder") else []


def check_inputs(*paths: str | os.PathLike[str] | None) -> None:
    """Refuse an input that exists but is not a regular file or a directory (a FIFO, a device).

    Reading a FIFO would block until someone writes to it. Missing files and directories are
    left to the loaders, whose messages say what was expected.
    """
    for path in paths:
        if path is None:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UserInputError(f"{path} is not a regular file")
