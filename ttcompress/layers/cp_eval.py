"""How :class:`ttcompress.layers.cp_conv.CPConv2d` picks its evaluation path: cost model and timer.

A CP convolution can run as its factorized chain of small convolutions or as one convolution with
the reconstructed kernel; both are exact. In training the choice follows :func:`dense_is_cheaper`;
in eval mode ``CPConv2d`` decides once per input shape: from the cost model alone when it is a clear
call on a large input (:func:`clear_choice`), otherwise by timing both paths with :func:`dense_wins`
(a single call of each when one call is long, so that a served model's first request is not many
times slower than the next).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = [
    "CALL_COST", "CHAIN_SLOWDOWN", "CLEAR_FACTOR", "FACTORIZED_MARGIN", "LONG_CALL_SECONDS", "MODEL_MIN_MACS",
    "PASS_WEIGHT", "TIMING_MIN_SECONDS", "TIMING_ROUNDS", "clear_choice", "dense_is_cheaper", "dense_wins",
    "path_costs", "seconds",
]

# Cost model of the training-time evaluation choice (see dense_is_cheaper), from
# benchmarks/bench_cp_eval.py and bench_cp_conv.py on CPU: MAC rate of the factorized chain
# relative to one dense convolution (measured 1.5x to 6x slower per MAC, 3.5x typical); cost of one
# element moved by a factorized pass, and of one extra convolution call, in MACs.
CHAIN_SLOWDOWN = 3
PASS_WEIGHT = 8
CALL_COST = 200_000


# Eval-mode timing (see dense_wins): rounds per path, the least time one timed block takes, and
# the margin by which the factorized chain must beat the dense kernel to be chosen.
TIMING_ROUNDS = 3
TIMING_MIN_SECONDS = 2e-3
FACTORIZED_MARGIN = 0.95
#: A path whose first call takes at least this long is timed by that one call (no rounds): noise is
#: small next to it, and rounds would make the first call of a large layer many times slower.
LONG_CALL_SECONDS = 0.05

# Cost-model shortcut of the eval-mode choice (see clear_choice): on inputs of at least
# MODEL_MIN_MACS dense multiply-adds, a path the cost model finds CLEAR_FACTOR times cheaper is
# taken without timing (the model's per-MAC rate is off by up to 2x, measured: see CHAIN_SLOWDOWN).
CLEAR_FACTOR = 3.0
MODEL_MIN_MACS = 20_000_000


def seconds(fn: Callable[[], object], calls: int = 1) -> float:
    """Wall-clock seconds of ``calls`` calls of ``fn`` (per call)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def dense_wins(dense: Callable[[], object], factorized: Callable[[], object]) -> bool:
    """Measured choice: is ``dense`` at least as fast as ``FACTORIZED_MARGIN`` x ``factorized``?

    Both are called once to warm up; then, in :data:`TIMING_ROUNDS` interleaved rounds, each is
    timed over as many calls as make :data:`TIMING_MIN_SECONDS` (from the warm-up time, at most
    100), and the best per-call times are compared. When a warm-up call takes
    :data:`LONG_CALL_SECONDS` or more, each path is instead timed by one more call. The margin favours the dense kernel, which runs
    the same convolution as ``nn.Conv2d``: when the two are within timing noise, the compressed
    layer costs what the dense one does.
    """
    first = max(seconds(factorized), seconds(dense))
    if first >= LONG_CALL_SECONDS:  # one more call each (the warm-up was the first): no rounds
        return seconds(factorized) >= FACTORIZED_MARGIN * seconds(dense)
    calls = max(1, min(100, int(TIMING_MIN_SECONDS / max(first, 1e-7))))
    dense_best = factorized_best = math.inf
    for _ in range(TIMING_ROUNDS):
        dense_best = min(dense_best, seconds(dense, calls))
        factorized_best = min(factorized_best, seconds(factorized, calls))
    return factorized_best >= FACTORIZED_MARGIN * dense_best


def clear_choice(dense_cost: float, factorized_cost: float) -> bool | None:
    """The cost model's choice when it is clear (True: dense), None when timing should decide.

    Clear: the input is large (``dense_cost >= MODEL_MIN_MACS``, where timing costs the most) and
    one path is :data:`CLEAR_FACTOR` times cheaper than the other by :func:`path_costs`.
    """
    if dense_cost < MODEL_MIN_MACS:
        return None
    if factorized_cost * CLEAR_FACTOR <= dense_cost:
        return False
    if dense_cost * CLEAR_FACTOR <= factorized_cost:
        return True
    return None


def dense_is_cheaper(**shape: int | tuple[int, int]) -> bool:
    """Cost-model choice: is one dense conv cheaper than the factorized chain for this input?

    Keywords as for :func:`path_costs`.
    """
    dense, factorized = path_costs(**shape)  # type: ignore[arg-type]
    return factorized > dense


def path_costs(
    *,
    batch: int,
    height: int,
    width: int,
    out_hw: tuple[int, int],
    in_channels: int,
    out_channels: int,
    groups: int,
    rank: int,
    kernel_size: tuple[int, int],
) -> tuple[float, float]:
    """Cost-model estimates, in multiply-add units, of ``(dense, factorized)`` for this input.

    In multiply-add units: the dense path costs ``N Ho Wo C_out C_in/G kh kw`` MACs plus building
    the kernel (``C_out C_in/G kh kw R``). The factorized chain costs :data:`CHAIN_SLOWDOWN` times
    its MACs (pointwise ``N H W C_in R``, depthwise ``N Ho Wo G R kh kw``, pointwise ``N Ho Wo R
    C_out``: small and depthwise convolutions run well below the rate of one large one), plus
    :data:`PASS_WEIGHT` per element its passes read or write, plus :data:`CALL_COST` for each of
    its three extra convolution calls (per-op overhead, which dominates small inputs).
    """
    g, r = groups, rank
    kh, kw = kernel_size
    out_h, out_w = out_hw
    cin, cout = in_channels // g, out_channels
    dense = batch * out_h * out_w * cout * cin * kh * kw + cout * cin * kh * kw * r
    pixels_in, pixels_out = batch * height * width, batch * out_h * out_w
    macs = pixels_in * in_channels * r + pixels_out * g * r * (kh * kw + cout // g)
    traffic = (pixels_in * (in_channels + g * r) + pixels_out * g * r * 2
               + pixels_out * (g * r + cout))
    factorized = CHAIN_SLOWDOWN * macs + PASS_WEIGHT * traffic + CALL_COST * 3
    return float(dense), float(factorized)
