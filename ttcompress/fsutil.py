"""Filesystem helpers: :func:`atomic_write` (write to a temporary file, then rename it into place).

Kept apart from checkpoint I/O so that every module that writes a file (plans, reports, plots,
training checkpoints) can import it without importing model loading.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ttcompress.errors import OutputExistsError

__all__ = ["MODEL_SUFFIXES", "PathLike", "atomic_dir", "atomic_write", "check_not_inputs", "strip_model_suffix"]

PathLike = str | os.PathLike[str]

#: Extensions of model files, stripped from a file name to name its model (``model.pt`` -> ``model``).
MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def strip_model_suffix(name: str) -> str:
    """``name`` without one of :data:`MODEL_SUFFIXES` (kept when nothing would be left)."""
    for ext in MODEL_SUFFIXES:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _file_id(path: PathLike) -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` names after symlinks; None when it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved_chain(path: PathLike) -> list[Path]:
    """``path`` with its symlinks resolved (as far as it exists), then every directory above it."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        resolved = Path(os.path.abspath(path))
    return [resolved, *resolved.parents]


def check_not_inputs(
    outputs: Iterable[PathLike | None],
    inputs: Iterable[PathLike | None],
    *,
    replaces_directory: bool = False,
) -> None:
    """Refuse an output that would write over one of ``inputs``, before anything is read or written.

    An output is refused when it is an input (same file after symlinks, or another hard link to
    it), or lies inside an input directory (a Hugging Face directory's ``model.safetensors``).
    With ``replaces_directory`` (an output directory replaced as a whole), an output directory
    that contains an input is refused as well. Files are compared by device and inode, so
    symlinks, hard links and bind mounts do not hide an input. ``None`` entries and inputs that
    do not exist are skipped.

    Raises
    ------
    OutputExistsError
        Naming the output and the input it would overwrite.
    """
    sources = [(Path(i), key) for i in inputs if i is not None and (key := _file_id(i)) is not None]
    if not sources:
        return
    for out in outputs:
        if out is None:
            continue
        chain = _resolved_chain(out)
        ids = [_file_id(p) for p in chain]
        for src, key in sources:
            kind = "directory" if os.path.isdir(src) else "file"
            if ids[0] == key:
                raise OutputExistsError(f"output must differ from the input {kind}: {out} is {src}")
            if key in ids[1:]:
                raise OutputExistsError(f"output {out} is inside the input directory {src}; write it elsewhere")
            if replaces_directory and ids[0] is not None and ids[0] in {_file_id(p) for p in _resolved_chain(src)[1:]}:
                raise OutputExistsError(f"output directory {out} contains the input {src}; write it elsewhere")


@functools.lru_cache(maxsize=1)
def _umask_by_flipping() -> int:
    # Only where /proc is missing: os.umask can only be read by setting it, so do it once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask() -> int:
    """The process umask, read from ``/proc/self/status`` without changing it (else once, see above)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return _umask_by_flipping()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _remove_stale_temps(dest: Path) -> None:
    """Remove ``.NAME.PID.*.tmp`` files left beside ``dest`` by a writer that died (SIGKILL, power loss).

    A temp file whose PID is a live process other than this one may be a concurrent write and
    is left alone; names without a PID (older ttcompress) are stale by now.
    """
    prefix, me = f".{dest.name}.", os.getpid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(".tmp")) or not entry.is_file(follow_symlinks=False):
                continue
            pid_text = name[len(prefix) :].split(".", 1)[0]
            if pid_text.isdigit() and (int(pid_text) == me or _pid_alive(int(pid_text))):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


class _Terminated(SystemExit):
    """SIGTERM arrived during :func:`atomic_write` or :func:`atomic_dir`: unwind (removing the temp), then exit 143."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`_Terminated` in the main thread instead of killing at once.

    A Python handler already installed is kept (it is called); an ignored SIGTERM stays ignored.
    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN or previous is None:
        yield
        return

    unwinding = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal unwinding
        if unwinding:  # a second SIGTERM while cleaning up: let the cleanup finish
            return
        unwinding = True
        if callable(previous):
            previous(signum, frame)
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    If the ``with`` block raises, or SIGTERM arrives (it then ends the process with exit code
    143 once the temporary file is removed), nothing is written at ``path``: an existing file
    there stays as it was and the temporary file ``.NAME.PID.*.tmp`` is removed. One left by a
    process that could not clean up (SIGKILL) is removed by the next write to ``path``.
    Missing parent directories are created. The file gets the mode ``0o666 & ~umask``; the
    umask is read without changing it.

    Parameters
    ----------
    path : str or PathLike
        Destination file.
    mode : {"wb", "w"}
        Binary or text mode.
    encoding : str, optional
        Text encoding for ``mode="w"`` (default UTF-8).

    Yields
    ------
    file object
        Write to it; do not close it yourself.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    dest = Path(path)
    if dest.is_dir():
        raise IsADirectoryError(f"output path is a directory: {dest}")
    blocker = next((p for p in dest.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"cannot write {dest}: {blocker} is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    with _sigterm_unwinds():
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            if "b" in mode:
                handle: IO[Any] = os.fdopen(fd, "wb")
            else:
                handle = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
            fd = -1  # owned (and closed) by ``handle`` from here on
            with handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, dest)
        except BaseException:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    _fsync_dir(dest.parent)


#: A temporary or displaced directory of :func:`atomic_dir`: ``.NAME.PID.RANDOM.tmpdir`` / ``.olddir``,
#: or the names of older versions (``.NAME.tmp-RANDOM``, ``.NAME.old-RANDOM``), after ``.NAME.``.
_DIR_TEMP = re.compile(r"(?:(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.(?P<kind>tmp|old)dir|(?P<legacy>tmp|old)-[A-Za-z0-9_]{8})")


def _remove_stale_temp_dirs(dest: Path) -> None:
    """Remove the temporary directories that a dead writer of ``dest`` left beside it (SIGKILL, power loss).

    Those of a live process other than this one may be a concurrent write and are left alone. A
    displaced previous ``dest`` (``.olddir``, a kill between the two renames) is put back when
    ``dest`` is missing, else removed.
    """
    prefix, me = f".{dest.name}.", os.getpid()
    try:
        entries = [e for e in os.scandir(dest.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        match = _DIR_TEMP.fullmatch(entry.name[len(prefix) :])
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if match["pid"] is not None and (int(match["pid"]) == me or _pid_alive(int(match["pid"]))):
            continue
        displaced = Path(entry.path) / dest.name
        if "old" in (match["kind"], match["legacy"]) and (displaced.exists() or displaced.is_symlink()):
            if dest.exists() or dest.is_symlink():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.replace(displaced, dest)
                    os.rmdir(entry.path)
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` onto ``dest``; an existing ``dest`` is moved aside first and put back on failure."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".olddir", dir=dest.parent))
    displaced = old / dest.name
    try:
        os.replace(dest, displaced)
        os.replace(tmp, dest)
    except BaseException:
        if not (dest.exists() or dest.is_symlink()) and (displaced.exists() or displaced.is_symlink()):
            os.replace(displaced, dest)
        raise
    finally:
        if dest.exists() or dest.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable (not possible on every platform)
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_dir(dest: PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest`` by renames.

    The directory counterpart of :func:`atomic_write`: if the ``with`` block raises, or SIGTERM
    arrives (the process then exits with code 143 once the temporary directory is removed),
    ``dest`` is untouched and the temporary directory ``.NAME.PID.RANDOM.tmpdir`` is removed. One
    left by a process that could not clean up (SIGKILL) is removed by the next write to ``dest``.

    Raises
    ------
    OutputExistsError
        ``dest`` exists and ``overwrite`` is False.
    """
    dest = Path(dest)
    _remove_stale_temp_dirs(dest)  # first: it may put back a ``dest`` that a killed write displaced
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_unwinds():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmpdir", dir=dest.parent))
        try:
            yield tmp
            for f in sorted(tmp.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.chmod(tmp, 0o777 & ~_umask())
            _replace_dir(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(dest.parent)
