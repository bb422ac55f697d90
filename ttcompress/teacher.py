"""The dense model a compressed checkpoint came from, as the default teacher of ``finetune``.

``decompose`` records its source file in the checkpoint info (:func:`source_record`: absolute
path and SHA-256 of the content). :func:`default_teacher` finds it again: the file is used as the
distillation teacher only when it is still there with the same hash, so that a model replaced
since (retrained, overwritten) is never distilled from by mistake.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TeacherChoice", "default_teacher", "file_sha256", "source_record"]

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
