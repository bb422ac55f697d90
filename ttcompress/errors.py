"""Exceptions that mean "the user gave us something we cannot use".

The CLI turns these (and ``OSError``, ``MemoryError``, ``RecursionError``) into one line on stderr
and exit code 2; any other exception is an internal error (see :mod:`ttcompress.cli._common`).
Library code raises them with a message that names the offending input. :class:`UserInputError`
is also a ``ValueError``, so Python callers that catch ``ValueError`` for bad arguments still do.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


class TTCompressError(Exception):
    """Base class for user-facing errors (bad file, bad data root, bad plan, ...)."""


class CheckpointError(TTCompressError):
    """A model file is missing, unreadable, corrupted, or does not fit the architecture."""


class UnsafePickleError(CheckpointError):
    """Loading this file would unpickle arbitrary code; the user must opt in with ``trust_pickle``."""


class ArchRequiredError(CheckpointError):
    """A file holds weights (and maybe a plan) but no architecture; the caller must name one (``arch``)."""


class DataError(TTCompressError):
    """A dataset is unknown, absent, or unusable."""


class TrainingError(TTCompressError):
    """Training cannot go on (for example the loss became NaN)."""


class UserInputError(TTCompressError, ValueError):
    """An option or argument the user gave is invalid (also a ``ValueError`` for Python callers)."""


class InputError(UserInputError):
    """A value the user gave for parameter ``param`` is invalid, raised where it is validated.

    ``param`` is the library's name of the parameter (``"tt.ranks"``, ``"target_ratio"``,
    ``"calib_samples"``), never a command-line flag; ``problem`` says what is wrong with the value
    (``"must be a positive integer, got 0"``). The message is ``"{param} {problem}"``. The CLI maps
    ``param`` to its flag from one table (:func:`ttcompress.cli.flags.flag_for`).
    """

    def __init__(self, param: str, problem: str) -> None:
        self.param = param
        self.problem = problem
        super().__init__(f"{param}{'' if problem[:1] in (':', ';', ',') else ' '}{problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (DataLoader workers re-raise errors)
        return (type(self), (self.param, self.problem))


class OutputExistsError(TTCompressError, FileExistsError):
    """An output file already exists and overwriting it was not allowed."""


class UntrustedCodeError(CheckpointError):
    """A file names code to import (``package.module:callable``); the user must name it or pass ``trust_code``."""


def few(items: list[str]) -> str:
    """The first three items, and how many more: ``"a, b, c, ... (+4)"``."""
    return ", ".join(items[:3]) + (f", ... (+{len(items) - 3})" if len(items) > 3 else "")


def shape_mismatches(expected: Mapping[str, tuple[int, ...]], present: Mapping[str, tuple[int, ...]], *,
                     covered: Collection[str] | None = None, noun: str = "key", pair: str = "file vs model") -> list[str]:
    """What keeps tensors of shapes ``present`` from filling a state dict of shapes ``expected``: the
    missing keys (not in ``covered``, default ``present``), unexpected keys and wrong shapes, one
    short phrase each (empty when they fit)."""
    have = set(present) if covered is None else set(covered)
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in present if k not in expected]
    wrong = [f"{k} {list(present[k])} vs {list(expected[k])}" for k in expected
             if k in present and tuple(present[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing {noun}(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {noun}(s): {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s) ({pair}): {few(wrong)}")
    return problems


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one line of at most ``limit`` characters (its type's name when it has no message)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
