"""Progress of the calibration passes: every batch that a statistics pass has run through the model.

Calibration runs the calibration inputs through the model once for the rank allocator (``Gram``
statistics of every layer) and once per layer for the sequential fits. Each pass reports
``progress(stage, done, total)`` after every batch to the callback set by :func:`calib_progress`
(a :class:`contextvars.ContextVar`, like :func:`ttcompress.decompose.cp.cp_progress`), so that a
long pass shows its progress without threading a callback through every signature. ``stage``
names the pass: ``"statistics"`` (the allocator's pass over all layers) or ``"statistics NAME"``
(one layer's sequential pass).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

__all__ = ["StatsProgressFn", "calib_progress", "report_batch"]

#: ``progress(stage, done, total)``: ``done`` of ``total`` batches of the pass ``stage`` are through.
StatsProgressFn = Callable[[str, int, int], None]

_PROGRESS: contextvars.ContextVar[StatsProgressFn | None] = contextvars.ContextVar(
    "ttcompress_calib_progress", default=None)


@contextlib.contextmanager
def calib_progress(progress: StatsProgressFn | None) -> Iterator[None]:
    """Within the block, calibration passes report each batch to ``progress`` (None: to nobody)."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def report_batch(stage: str, done: int, total: int) -> None:
    """Tell the current :func:`calib_progress` callback, if any, that ``done`` of ``total`` batches are through."""
    progress = _PROGRESS.get()
    if progress is not None:
        progress(stage, done, total)
