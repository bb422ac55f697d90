"""The dense model a compressed checkpoint came from, as the default teacher of ``finetune``.

``decompose`` records its source file in the checkpoint info (:func:`source_record`: absolute
path and SHA-256 of the content). :func:`default_teacher` finds it again: the file is used as the
distillation teacher only when it is still there with the same hash, so that a model replaced
since (retrained, overwritten) is never distilled from by mistake.

:func:`load_teacher` loads a teacher file. A file that needs an architecture (a bare state dict)
gets the one given (``arch``), else the student's recorded architecture: the compressed model's
source architecture, usually the teacher's own. That recorded name passes the same trust rule as
any name read from a file (:func:`ttcompress.models.check_arch_trusted`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ttcompress.errors import ArchRequiredError
from ttcompress.io import ArchLike, load
from ttcompress.meta import read_meta
from ttcompress.models import check_arch_trusted

__all__ = ["TeacherChoice", "default_teacher", "file_sha256", "load_teacher", "source_record"]

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks); a directory hashes its files in name order."""
    p = Path(path)
    digest = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            digest.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def source_record(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"source_path": absolute path, "source_sha256": hash}`` of an existing model file (else empty)."""
    p = Path(path)
    if not p.exists():
        return {}
    return {"source_path": str(p.resolve()), "source_sha256": file_sha256(p)}


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
    if not p.exists():
        return TeacherChoice(None, f"no distillation: the source model {p} is gone (give --teacher)")
    if file_sha256(p) != digest:
        return TeacherChoice(None, f"warning: the source model {p} changed since decompose (hash differs); "
                                   "not distilling (give --teacher to use it)", warning=True)
    return TeacherChoice(p, f"distilling from the source model {p} (unchanged since decompose; --no-distill "
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
        The teacher: any input form of :func:`ttcompress.io.load`.
    student : nn.Module
        The model being fine-tuned; its recorded architecture (``ttcompress_meta["arch"]``) is the
        default for a teacher file that needs one.
    arch, arch_kwargs : optional
        The teacher's architecture, as :func:`ttcompress.io.load` takes them (the user names them).
    student_arch : str, optional
        The architecture name the user gave for the student: the same import path recorded by
        the student is then trusted for the teacher too.
    trust_pickle, trust_code : bool
        As for :func:`ttcompress.io.load`.

    Raises
    ------
    ArchRequiredError
        The teacher file needs an architecture, none is given and the student records none.
    UntrustedCodeError
        The student's recorded architecture is an import path the user did not name.
    """
    if arch is not None:
        return load(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, trust_code=trust_code)
    if arch_kwargs is not None:
        raise ValueError("teacher_arch_kwargs given without teacher_arch")
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
