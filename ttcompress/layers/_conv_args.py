"""Checks of ``nn.Conv2d``-style constructor arguments shared by the factorized conv layers."""

from __future__ import annotations

from typing import Any

__all__ = ["conv_pair", "positive_int"]


def conv_pair(value: Any, name: str, *, minimum: int) -> tuple[int, int]:
    """Normalize an int or a length-2 sequence of ints (as ``nn.Conv2d`` accepts) to a pair."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value
