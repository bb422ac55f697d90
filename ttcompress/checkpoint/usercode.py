"""Import a ``package.module:callable`` the user named on the command line (or in a Python call).

Only names the user gave are imported here: a name read from a file (a checkpoint, a sweep cache,
a resume state) is never passed to :func:`import_callable` (see docs/cli.md, "Trust").
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ttcompress.errors import TTCompressError, UserInputError

__all__ = ["import_callable", "is_user_callable"]

#: Prefixes of ``--data`` values that are not import paths.
_DATA_SCHEMES = ("imagefolder:", "tensors:", "torchvision:")


def is_user_callable(name: str) -> bool:
    """True if ``name`` reads as ``package.module:callable`` (not ``imagefolder:``/``tensors:``)."""
    key = name.strip()
    return ":" in key and not key.lower().startswith(_DATA_SCHEMES)


def import_callable(
    spec: str, *, what: str, error: type[TTCompressError] = UserInputError
) -> Callable[..., Any]:
    """The callable named ``package.module:attr`` (``attr`` may be dotted).

    Parameters
    ----------
    spec : str
        The import path.
    what : str
        How messages name it (``"data"``, ``"metric"``).
    error : type, default UserInputError
        The exception raised when it cannot be imported or is not callable.

    Raises
    ------
    error
        Malformed ``spec``, a module that fails to import (any exception at import time), a
        missing attribute, or an attribute that is not callable.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    mod_name, _, attr = spec.strip().partition(":")
    if not mod_name or not attr:
        raise error(f"{what} {spec!r} must be package.module:callable")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:  # user code may raise anything at import time
        raise error(f"cannot import {what} module {mod_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {spec!r} is not callable")
    return obj
