"""Exceptions that mean "the user gave us something we cannot use".

The CLI turns these (and ``ValueError``/``TypeError`` raised for bad arguments) into one line on
stderr and exit code 2. Library code raises them with a message that names the offending input.
"""

from __future__ import annotations


class TTCompressError(Exception):
    """Base class for user-facing errors (bad file, bad data root, bad plan, ...)."""


class CheckpointError(TTCompressError):
    """A model file is missing, unreadable, corrupted, or does not fit the architecture."""


class UnsafePickleError(CheckpointError):
    """Loading this file would unpickle arbitrary code; the user must opt in with ``trust_pickle``."""


class DataError(TTCompressError):
    """A dataset is unknown, absent, or unusable."""


class TrainingError(TTCompressError):
    """Training cannot go on (for example the loss became NaN)."""


class UntrustedCodeError(CheckpointError):
    """A file names code to import (``package.module:callable``); the user must name it or pass ``trust_code``."""
