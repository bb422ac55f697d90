"""Reading a small file the user points at (a JSON config, a plan): regular files only, size-capped.

Every JSON or YAML file ttcompress reads from a user's path goes through :func:`read_small_file`:
``config.json``, ``ttcompress.json`` and ``model.safetensors.index.json`` of a Hugging Face
directory, and plan files. A FIFO would block the reader until someone writes to it, and
``/dev/zero`` (or a symlink to it) would be read until memory runs out: the path is checked with
``stat`` (symlinks followed) before it is opened, opened non-blocking, checked again on the open
descriptor, and read no further than the cap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ttcompress.errors import TTCompressError, UserInputError

__all__ = ["MAX_SMALL_FILE_BYTES", "check_regular_file", "read_small_file", "read_small_text"]

#: The most bytes of a JSON or YAML file ttcompress reads (configs, records, indexes, plans).
MAX_SMALL_FILE_BYTES = 16 << 20

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def _check_kind(p: Path, st: os.stat_result, what: str, limit: int | None, error: type[TTCompressError]) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device or special file")
        raise error(f"{p} is not a regular file ({kind}; expected a {what})")
    if limit is not None and st.st_size > limit:
        raise error(f"{p} is larger than {_size(limit)} ({st.st_size:,} bytes; the limit for a {what})")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n:,} bytes"


def check_regular_file(
    path: str | os.PathLike[str], *, what: str, error: type[TTCompressError] = UserInputError
) -> int:
    """The size of ``path`` if it is a regular file (symlinks followed), without opening it.

    Raises ``FileNotFoundError`` when nothing is there, ``error`` for a FIFO, a device or a directory.
    """
    st = os.stat(path)
    _check_kind(Path(path), st, what, None, error)
    return st.st_size


def read_small_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    limit: int = MAX_SMALL_FILE_BYTES,
    error: type[TTCompressError] = UserInputError,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (symlinks are followed).

    Parameters
    ----------
    path : str or PathLike
        The file.
    what : str
        What the file is, for messages (``"config.json"``, ``"plan file"``).
    limit : int, optional
        Most bytes read (default :data:`MAX_SMALL_FILE_BYTES`, 16 MiB).
    error : type, optional
        The error raised for a file that is not a regular file or is too large.

    Raises
    ------
    FileNotFoundError
        Nothing is at ``path`` (callers word their own message).
    error
        Not a regular file (a FIFO, a device, a directory), or larger than ``limit``; checked
        before the file is read, so neither blocks nor reads without end.
    """
    p = Path(path)
    _check_kind(p, os.stat(p), what, limit, error)  # FileNotFoundError propagates
    fd = os.open(p, _OPEN_FLAGS)
    try:
        _check_kind(p, os.fstat(fd), what, limit, error)  # replaced between stat and open
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise error(f"{p} is larger than {_size(limit)} (the limit for a {what})")
    return data


def read_small_text(
    path: str | os.PathLike[str],
    *,
    what: str,
    limit: int = MAX_SMALL_FILE_BYTES,
    error: type[TTCompressError] = UserInputError,
) -> str:
    """:func:`read_small_file` decoded as UTF-8 (invalid UTF-8 raises ``error``)."""
    data = read_small_file(path, what=what, limit=limit, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}; expected a {what})") from None
