"""Validators shared by the plan and the format settings: each returns the normalized value or
raises :class:`~ttcompress.errors.InputError` whose ``param`` is ``what`` (a parameter, never a command-line flag)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ttcompress.errors import InputError

__all__ = [
    "MAX_TT_CORES",
    "check_d",
    "check_eps",
    "check_keys",
    "check_modes",
    "check_patterns",
    "check_pos_int",
    "check_ranks",
    "check_ratio",
    "check_build_options",
    "freeze_options",
]


def check_pos_int(value: Any, what: str) -> int:
    """A positive ``int`` (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(what, f"must be a positive integer, got {value!r}")
    if value <= 0:
        raise InputError(what, f"must be a positive integer, got {value}")
    return value


def check_ranks(value: Any, what: str) -> int | tuple[int, ...] | None:
    """None, a positive int, or a non-empty sequence of positive ints (returned as a tuple)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(what, "must not be empty")
        return tuple(check_pos_int(v, what) for v in value)
    return check_pos_int(value, what)


def check_modes(value: Any, what: str) -> tuple[int, ...] | None:
    """None or a non-empty sequence of positive ints."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(what, f"must be a non-empty list of positive integers, got {value!r}")
    return tuple(check_pos_int(v, what) for v in value)


def check_eps(value: Any, what: str) -> float | None:
    """None or a relative error in (0, 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(what, f"must be a relative error in (0, 1), got {value!r}")
    return float(value)


def check_ratio(value: Any, what: str) -> float | None:
    """None or a finite compression factor > 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1.0:
        raise InputError(what, f"must be a compression factor > 1, got {value!r}")
    return float(value)


#: Most TT cores accepted anywhere: each core needs a mode >= 2, so no layer smaller than
#: ``2**32 x 2**32`` can hold more (each layer is bounded by its own sizes too:
#: :func:`ttcompress.decompose.modes.max_num_cores`).
MAX_TT_CORES = 64


def check_d(value: Any, what: str) -> int | None:
    """None or an integer from 2 to :data:`MAX_TT_CORES` (a number of TT cores)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_TT_CORES:
        raise InputError(what, f"must be an integer from 2 to {MAX_TT_CORES} (number of TT cores), got {value!r}")
    return value


def check_patterns(value: Any, what: str) -> tuple[str, ...]:
    """Glob patterns: a string or a list of strings, each possibly comma-separated."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InputError(what, f"must be a list of glob patterns, got {value!r}")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise InputError(what, f"must hold non-empty glob patterns, got {v!r}")
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


def check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    """``data`` is a mapping whose keys are all in ``allowed``."""
    if not isinstance(data, Mapping):
        raise InputError(where, f"must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InputError(where, f": unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}")


def freeze_options(options: Any, what: str) -> tuple[tuple[str, Any], ...]:
    """Keyword arguments (mapping or pairs) as a sorted tuple of pairs with JSON-serializable values."""
    if options is None:
        return ()
    if isinstance(options, Mapping):
        items = list(options.items())
    elif isinstance(options, (list, tuple)) and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in options):
        items = [tuple(kv) for kv in options]
    else:
        raise InputError(what, f"must be a mapping of keyword arguments, got {options!r}")
    for k, v in items:
        if not isinstance(k, str):
            raise InputError(what, f": keys must be strings, got {k!r}")
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise InputError(f"{what}[{k!r}]", f"must be JSON-serializable, got {v!r}") from None
    return tuple(sorted(items))


def check_build_options(options: tuple[tuple[str, Any], ...], allowed: Mapping[str, Any], what: str) -> None:
    """Frozen keyword options (:func:`freeze_options`) whose keys are in ``allowed`` and whose values
    fit it: ``int`` a non-negative integer, ``float`` a finite number >= 0, a tuple of strings one of them."""
    for key, value in options:
        if key not in allowed:
            raise InputError(what, f": unknown option {key!r}; allowed: {', '.join(allowed)}")
        kind = allowed[key]
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            expected = "a non-negative integer"
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            expected = "a finite number >= 0"
        else:
            ok = value in kind
            expected = f"one of {', '.join(map(str, kind))}"
        if not ok:
            raise InputError(f"{what}[{key!r}]", f"must be {expected}, got {value!r}")
