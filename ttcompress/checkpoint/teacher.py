"""The dense model a compressed checkpoint came from, as the default teacher of ``finetune``.

``decompose`` records its source file in the checkpoint info (:func:`source_record`: absolute
path and SHA-256 of the content). :func:`default_teacher` finds it again: the file is used as the
distillation teacher only when it is still there with the same hash, so that a model replaced
since (retrained, overwritten) is never distilled from by mistake. The recorded path is data:
only a regular file, or a directory of regular files, within :data:`MAX_SOURCE_BYTES` and
:data:`MAX_SOURCE_FILES` is hashed; a FIFO, a device or ``/usr`` means no distillation, at once.

:func:`load_teacher` loads a teacher file. A file that needs an architecture (a bare state dict)
gets the one given (``arch``), else the student's recorded architecture: the compressed model's
source architecture, usually the teacher's own. That recorded name passes the same trust rule as
any name read from a file (:func:`ttcompress.checkpoint.models.check_arch_trusted`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ttcompress.errors import ArchRequiredError, InputError
from ttcompress.checkpoint.io import ArchLike, load
from ttcompress.checkpoint.meta import read_meta
from ttcompress.checkpoint.models import check_arch_trusted

__all__ = [
    "MAX_SOURCE_BYTES",
    "MAX_SOURCE_FILES",
    "SourceNotHashable",
    "TeacherChoice",
    "default_teacher",
    "file_sha256",
    "load_teacher",
    "source_record",
]

_CHUNK = 1 << 20

#: Most bytes, and most files of a directory, hashed as a source model: a path recorded in a file
#: (``/usr``, a huge sparse file) must not keep ``finetune`` hashing for hours.
MAX_SOURCE_BYTES = 64 << 30
MAX_SOURCE_FILES = 1_000


class SourceNotHashable(Exception):
    """The path is not a regular file or a directory of at most :data:`MAX_SOURCE_FILES` regular files
    totalling at most :data:`MAX_SOURCE_BYTES` (a FIFO, a device, ``/usr``); the reason is the message."""


def _source_files(p: Path) -> list[Path]:
    """The files hashed for ``p``: itself (a regular file) or a directory's regular files in name
    order (its tree walked without following symlinked folders, at most MAX_SOURCE_FILES entries)."""
    try:
        mode = p.stat().st_mode
    except (OSError, ValueError) as exc:  # gone, a broken symlink, a name too long, a NUL byte
        raise SourceNotHashable(f"cannot be read ({exc.__class__.__name__})") from None
    if stat.S_ISREG(mode):
        files = [p]
    elif stat.S_ISDIR(mode):
        files, seen = [], 0
        for root, dirs, names in os.walk(p):
            seen += len(dirs) + len(names)
            if seen > MAX_SOURCE_FILES:
                raise SourceNotHashable(f"is a directory of more than {MAX_SOURCE_FILES:,} entries")
            files += [f for f in (Path(root) / n for n in names) if f.is_file()]  # regular (symlinks followed)
        files.sort()
    else:
        raise SourceNotHashable("is not a regular file or a directory (a FIFO, a device)")
    if sum(f.stat().st_size for f in files) > MAX_SOURCE_BYTES:
        raise SourceNotHashable(f"is larger than {MAX_SOURCE_BYTES >> 30} GiB")
    return files


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks); a directory hashes its files in name order.

    Only regular files are read, at most :data:`MAX_SOURCE_BYTES` in all (and at most
    :data:`MAX_SOURCE_FILES` entries of a directory): anything else raises
    :class:`SourceNotHashable` before a byte is read.
    """
    p = Path(path)
    digest = hashlib.sha256()
    for f in _source_files(p):
        if f != p:
            digest.update(str(f.relative_to(p)).encode())
        with os.fdopen(os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            st = os.fstat(fh.fileno())  # replaced by a FIFO since it was listed: refused, never blocks
            if not stat.S_ISREG(st.st_mode):
                raise SourceNotHashable("changed while it was hashed")
            left = st.st_size  # read no more than its size when it was opened
            while left > 0 and (chunk := fh.read(min(_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def source_record(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"source_path": absolute path, "source_sha256": hash}`` of an existing model file (else empty,
    also for a source that cannot be hashed: see :func:`file_sha256`)."""
    p = Path(path)
    try:
        return {"source_path": str(p.resolve()), "source_sha256": file_sha256(p)} if p.exists() else {}
    except (SourceNotHashable, OSError, ValueError):
        return {}


@dataclass(frozen=True)
class TeacherChoice:
    """What :func:`default_teacher` found: ``path`` to distill from (or None) and a one-line ``message``
    for stderr (None when the checkpoint records no source); ``warning`` is True for a mismatch."""

    path: Path | None
    message: str | None
    warning: bool = False


def default_teacher(info: Mapping[str, Any]) -> TeacherChoice:
    """The recorded source model of a checkpoint's ``info``, if it is still there and unchanged."""
    path, digest = info.get("source_path"), info.get("source_sha256")
    if not isinstance(path, str) or not isinstance(digest, str):
        return TeacherChoice(None, None)
    p = Path(path)
    shown = path if path.isprintable() else repr(path)  # a newline in a recorded path: still one line
    try:
        if not p.exists():
            return TeacherChoice(None, f"no distillation: the source model {shown} is gone (give --teacher)")
        same = file_sha256(p) == digest
    except (SourceNotHashable, OSError, ValueError) as exc:
        why = str(exc) if isinstance(exc, SourceNotHashable) else \
            f"cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})"
        return TeacherChoice(None, f"no distillation: the recorded source model {shown} {why} (give --teacher)",
                             warning=True)
    if not same:
        return TeacherChoice(None, f"warning: the source model {shown} changed since decompose (hash differs); "
                                   "not distilling (give --teacher to use it)", warning=True)
    return TeacherChoice(p, f"distilling from the source model {shown} (unchanged since decompose; --no-distill "
                            "turns this off)")


def load_teacher(
    path: str | os.PathLike[str],
    *,
    student: nn.Module,
    arch: ArchLike | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    student_arch: str | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """Load a distillation teacher; a file that needs an architecture gets ``arch`` or the student's.

    Parameters
    ----------
    path : str or PathLike
        The teacher: any input form of :func:`ttcompress.checkpoint.io.load`.
    student : nn.Module
        The model being fine-tuned; its recorded architecture (``ttcompress_meta["arch"]``) is the
        default for a teacher file that needs one.
    arch, arch_kwargs : optional
        The teacher's architecture, as :func:`ttcompress.checkpoint.io.load` takes them (the user names them).
    student_arch : str, optional
        The architecture name the user gave for the student: the same import path recorded by
        the student is then trusted for the teacher too.
    trust_pickle, trust_code : bool
        As for :func:`ttcompress.checkpoint.io.load`.

    Raises
    ------
    ArchRequiredError
        The teacher file needs an architecture, none is given and the student records none.
    InputError
        ``param="teacher_arch"`` or ``"teacher_arch_kwargs"``: ``arch`` unknown, or ``arch_kwargs``
        that it does not accept (or given without ``arch``).
    UntrustedCodeError
        The student's recorded architecture is an import path the user did not name.
    """
    if arch is not None:
        try:
            return load(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, trust_code=trust_code)
        except InputError as exc:  # the teacher's architecture: the user's teacher_arch, teacher_arch_kwargs
            if exc.param not in ("arch", "arch_kwargs"):
                raise
            raise InputError(f"teacher_{exc.param}", exc.problem) from exc
    if arch_kwargs is not None:
        raise InputError("teacher_arch_kwargs", "given without teacher_arch")
    try:
        return load(path, trust_pickle=trust_pickle, trust_code=trust_code)
    except ArchRequiredError:
        spec = read_meta(student).arch
        if spec is None:
            raise ArchRequiredError(
                f"{path}: the teacher needs an architecture and the student records none; pass teacher_arch"
            ) from None
    check_arch_trusted(spec.name, source="the student's recorded architecture (the teacher's default)",
                       user_arch=student_arch, trust_code=trust_code)
    return load(path, arch=spec.name, arch_kwargs=spec.kwargs, trust_pickle=trust_pickle, trust_code=trust_code)
