"""Library parameter names -> command-line flags, for error messages.

The library's errors name its parameters (``tt.ranks``, ``cp_ranks``, ``target_ratio``); a command
that passes options through to it rewrites those names into the flags the user typed, so that
``--tt-ranks 0`` is answered with ``tt.ranks (--tt-ranks) must be a positive integer, got 0``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

from ttcompress.errors import TTCompressError, UserInputError

__all__ = ["PLAN_FLAGS", "flags_in_errors", "with_flags"]

#: Parameters of :func:`ttcompress.compression.planfile.plan_from_options` and the plan settings, by the flag
#: of ``ttcompress decompose`` that sets them.
PLAN_FLAGS: Mapping[str, str] = {
    "tt.ranks": "--tt-ranks", "tt_ranks": "--tt-ranks",
    "tt.eps": "--tt-eps", "tt_eps": "--tt-eps",
    "tt.d": "--tt-d", "tt_d": "--tt-d",
    "cp.rank": "--cp-ranks", "cp_ranks": "--cp-ranks",
    "cp.ratio": "--cp-ratio", "cp_ratio": "--cp-ratio",
    "target_ratio": "--target-ratio",
    "layers": "--layers",
    "exclude": "--exclude",
    "formats": "--format",
}  # fmt: skip


def with_flags(message: str, flags: Mapping[str, str] = PLAN_FLAGS) -> str:
    """``message`` with each parameter name of ``flags`` followed by its flag: ``tt.ranks (--tt-ranks)``."""
    names = sorted(flags, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")(?![\w-]|\.\w)")
    return pattern.sub(lambda m: f"{m.group(1)} ({flags[m.group(1)]})", message)


@contextlib.contextmanager
def flags_in_errors(flags: Mapping[str, str] = PLAN_FLAGS) -> Iterator[None]:
    """Within: a ``ValueError``/``TypeError`` (or :class:`UserInputError`) about options is raised again
    with :func:`with_flags` applied to its message."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TTCompressError) and not isinstance(exc, UserInputError):
            raise  # a file's error (checkpoint, data): not about options
        kind = UserInputError if isinstance(exc, UserInputError) else TypeError if isinstance(exc, TypeError) else ValueError
        raise kind(with_flags(str(exc), flags)) from exc
