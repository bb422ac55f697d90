"""Export keeps the factors: a switch the layers read where they would otherwise pick a dense path.

In eval mode (and for small inputs) the factorized layers may evaluate through the dense weight
they reconstruct from their factors, when a cost model or a timing says it is faster. An exporter
that traces that path stores the reconstructed weight as a constant, so the exported file holds
the dense model. Inside :func:`keep_factors` every layer takes its factorized path instead (TT as
its chain of one contraction per core, CP as its four convolutions, Tucker-2 as three, SVD as two
matmuls), so the graph computes from the factors and the file holds them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["keep_factors", "keeping_factors"]

_state = threading.local()


@contextlib.contextmanager
def keep_factors() -> Iterator[None]:
    """Within: every factorized layer evaluates from its factors, whatever path it would pick."""
    previous = getattr(_state, "keep", False)
    _state.keep = True
    try:
        yield
    finally:
        _state.keep = previous


def keeping_factors() -> bool:
    """Whether a :func:`keep_factors` block is active on this thread."""
    return bool(getattr(_state, "keep", False))
