"""Factorizing layer sizes into tensor-train modes.

A TT-matrix layer of size ``out_features x in_features`` reshapes its output and input indices
into ``d`` modes each, ``out_features = m_1 * ... * m_d`` and ``in_features = n_1 * ... * n_d``
(row-major, as :func:`torch.reshape`). The parameter count of the layer,
``sum_k r_{k-1} m_k n_k r_k``, is smallest when the modes are balanced, so this module picks, for a
given size and number of cores, the factorization with the smallest sum of modes; sizes with large
prime factors (97, 131, ...) are padded with zeros to a nearby size that factors well. Padding is
exact: padded inputs are zeros and padded outputs are cropped, so a layer's outputs never change.

References
----------
.. [1] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

__all__ = [
    "MAX_PAD_FRACTION",
    "balanced_modes",
    "choose_modes",
    "default_num_cores",
    "max_num_cores",
    "validate_modes",
]

#: Explicit modes may pad a size by at most this fraction (``prod(modes) <= size * (1 + f)``).
MAX_PAD_FRACTION = 0.25
_PAD_GAIN = 0.05


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return value


def default_num_cores(in_features: int, out_features: int) -> int:
    """Default number of TT cores ``d`` for a layer: about ``log_8`` of its larger size, in [2, 4].

    Parameters
    ----------
    in_features, out_features : int
        Layer sizes (positive).

    Returns
    -------
    int
        2 for sizes up to ~180, 3 up to ~1450, else 4 (4096 -> 4, i.e. modes of about 8).
    """
    size = max(_check_positive_int(in_features, "in_features"),
               _check_positive_int(out_features, "out_features"))
    return max(2, min(4, round(math.log(size) / math.log(8))))


def max_num_cores(in_features: int, out_features: int) -> int:
    """Most TT cores ``d`` a layer of these sizes can hold: every core needs a mode >= 2 on one side.

    The in side has at most ``floor(log2(floor(1.25 in_features)))`` modes >= 2 (their product is
    the size, zero-padded by at most :data:`MAX_PAD_FRACTION`), the out side likewise; more cores
    than both together would be ``1 x 1`` cores that hold nothing. ``d = 2`` is always allowed.
    The bound keeps ``d`` (from a file, a plan or a flag) from sizing lists or recursions: it is
    at most 62 for sizes below ``2**31``.

    Examples
    --------
    >>> max_num_cores(490, 32), max_num_cores(4096, 4096), max_num_cores(1, 1)
    (14, 24, 2)
    """
    ins = _check_positive_int(in_features, "in_features")
    outs = _check_positive_int(out_features, "out_features")
    return max(2, _most_modes(ins) + _most_modes(outs))


def _most_modes(size: int) -> int:
    """``floor(log2(padded size))``: most modes >= 2 whose product fits ``size`` padded."""
    return math.floor(size * (1 + MAX_PAD_FRACTION)).bit_length() - 1


def _divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


@functools.lru_cache(maxsize=8192)
def _min_sum_factorization(n: int, d: int, max_factor: int) -> tuple[int, ...] | None:
    """Non-increasing ``d`` factors of ``n`` (1 allowed) with the smallest sum, each <= max_factor."""
    if d == 1:
        return (n,) if n <= max_factor else None
    best: tuple[int, ...] | None = None
    best_sum = math.inf
    # The largest factor f is at least n ** (1/d); every other factor is <= f.
    lo = n ** (1.0 / d) - 1e-9
    for f in _divisors(n):
        if f < lo or f > max_factor:
            continue
        rest = _min_sum_factorization(n // f, d - 1, f)
        if rest is None:
            continue
        total = f + sum(rest)
        if total < best_sum:
            best, best_sum = (f, *rest), total
    return best


def _balanced_cost(n: int, d: int) -> tuple[float, tuple[int, ...]]:
    factors = _min_sum_factorization(n, d, n)
    if factors is None:  # unreachable: (n, 1, ..., 1) always exists
        raise RuntimeError(f"no factorization of {n} into {d} modes")
    return float(sum(factors)), factors


@functools.lru_cache(maxsize=1024)
def balanced_modes(size: int, d: int) -> tuple[int, ...]:
    """Balanced ``d`` modes whose product is ``size`` or a slightly larger, better-factoring size.

    Among sizes ``n' >= size`` the one minimizing ``sum(modes(n')) * n' / size`` is chosen (the sum of
    the modes drives the TT parameter count; the factor ``n' / size`` charges for padding), provided
    it is at least 5 % cheaper than ``size`` itself. The search stops as soon as the lower bound ``d * n'**(1/d)`` on the sum
    makes a larger ``n'`` unable to win, so it is short.

    Parameters
    ----------
    size : int
        The size to factor (>= 1).
    d : int
        Number of modes (>= 1).

    Returns
    -------
    tuple of int
        ``d`` modes in non-increasing order, product >= ``size``.

    Examples
    --------
    >>> balanced_modes(4096, 4), balanced_modes(97, 2), balanced_modes(1, 3)
    ((8, 8, 8, 8), (11, 9), (1, 1, 1))
    """
    _check_positive_int(size, "size")
    _check_positive_int(d, "d")
    best_cost, best = _balanced_cost(size, d)
    # Padding must pay for itself: it has to beat the unpadded cost by PAD_GAIN.
    target = best_cost * (1 - _PAD_GAIN)
    n = size
    while True:
        n += 1
        if d * n ** (1.0 / d) * n / size >= target or n > 2 * size:
            return best
        total, factors = _balanced_cost(n, d)
        cost = total * n / size
        if cost < target:
            best, target = factors, cost


def _capped_ranks(out_modes: Sequence[int], in_modes: Sequence[int], cap: Sequence[int]) -> tuple[int, ...]:
    """Ranks as TT-SVD caps them: ``r_k <= min(cap_k, r_{k-1} m_k n_k, prod_{i>k} m_i n_i)``."""
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    ranks = [1]
    for k in range(len(sizes) - 1):
        right = math.prod(sizes[k + 1:])
        ranks.append(min(cap[k + 1], ranks[-1] * sizes[k], right))
    ranks.append(1)
    return tuple(ranks)


def _params(out_modes: Sequence[int], in_modes: Sequence[int], cap: Sequence[int]) -> int:
    ranks = _capped_ranks(out_modes, in_modes, cap)
    return sum(ranks[k] * out_modes[k] * in_modes[k] * ranks[k + 1] for k in range(len(out_modes)))


def _arrange(out_multiset: tuple[int, ...], in_multiset: tuple[int, ...], cap: tuple[int, ...]
             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Order and pair two multisets of modes to minimize the TT parameter count at ``cap``."""
    d = len(out_multiset)
    if d > 4:  # brute force is d!^2; use the usual heuristic: large mode products at the ends.
        pairs = sorted(zip(sorted(out_multiset), sorted(in_multiset)), key=lambda p: p[0] * p[1])
        order: list[tuple[int, int]] = []
        for i, pair in enumerate(reversed(pairs)):
            (order.insert(0, pair) if i % 2 == 0 else order.append(pair))
        return tuple(p[0] for p in order), tuple(p[1] for p in order)
    best: tuple[int, tuple[tuple[int, ...], tuple[int, ...]]] | None = None
    for outs in sorted(set(itertools.permutations(out_multiset)), reverse=True):
        for ins in sorted(set(itertools.permutations(in_multiset)), reverse=True):
            p = _params(outs, ins, cap)
            if best is None or p < best[0]:
                best = (p, (outs, ins))
    if best is None:  # unreachable: the loops run at least once
        raise RuntimeError("no mode arrangement found")
    return best[1]


def choose_modes(
    in_features: int,
    out_features: int,
    *,
    d: int | None = None,
    ranks: int | Sequence[int] = 8,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Choose ``(in_modes, out_modes)`` for a TT-matrix layer.

    Each size is factored into ``d`` balanced modes by :func:`balanced_modes` (zero-padding sizes
    with large prime factors), then the modes are ordered and paired so that the parameter count
    ``sum_k r_{k-1} m_k n_k r_k`` with the given rank cap is smallest.

    Parameters
    ----------
    in_features, out_features : int
        Layer sizes (>= 1).
    d : int, optional
        Number of cores, at most :func:`max_num_cores`; default :func:`default_num_cores`.
    ranks : int or sequence of int, default 8
        Rank cap used to score the arrangements (an int, or a full tuple ``(1, r_1, ..., 1)``).

    Returns
    -------
    in_modes, out_modes : tuple of int
        ``prod(in_modes) >= in_features`` and ``prod(out_modes) >= out_features``.

    Raises
    ------
    ValueError
        ``d`` is more than :func:`max_num_cores` (checked before ``d`` sizes anything).
    """
    _check_positive_int(in_features, "in_features")
    _check_positive_int(out_features, "out_features")
    if d is None:
        d = default_num_cores(in_features, out_features)
    _check_positive_int(d, "d")
    most = max_num_cores(in_features, out_features)
    if d > most:  # before d sizes any list or recursion
        raise ValueError(f"d (number of TT cores) = {d} is more than a {in_features} -> {out_features} layer can "
                         f"hold: at most {most} (each core needs a mode >= 2)")
    cap = _rank_caps(ranks, d)
    outs, ins = _arrange(balanced_modes(out_features, d), balanced_modes(in_features, d), cap)
    return ins, outs


def _rank_caps(ranks: int | Sequence[int], d: int) -> tuple[int, ...]:
    """Validate ``ranks`` (int cap or full tuple) and return a full tuple of caps of length d + 1."""
    if isinstance(ranks, bool):
        raise TypeError("ranks must be an int or a sequence of ints, got bool")
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"ranks must be a positive integer (>= 1), got {ranks}")
        return (1,) + (ranks,) * (d - 1) + (1,)
    if not isinstance(ranks, Sequence) or isinstance(ranks, str):
        raise TypeError(f"ranks must be an int or a sequence of ints, got {type(ranks).__name__}")
    values = tuple(ranks)
    if any(isinstance(r, bool) or not isinstance(r, int) for r in values):
        raise TypeError(f"ranks must contain only ints, got {values!r}")
    if len(values) != d + 1:
        raise ValueError(f"ranks must have d + 1 = {d + 1} entries (1, r_1, ..., r_{d - 1}, 1), "
                         f"got {len(values)}: {values!r}")
    if values[0] != 1 or values[-1] != 1:
        raise ValueError(f"ranks must start and end with 1, got {values!r}")
    if any(r < 1 for r in values):
        raise ValueError(f"ranks must be positive integers (>= 1), got {values!r}")
    return values


def validate_modes(modes: Sequence[int], size: int, *, name: str, d: int | None = None) -> tuple[int, ...]:
    """Check explicit modes for a size and return them as a tuple.

    The product must equal ``size``, or be a padded size: larger than ``size`` by at most
    ``MAX_PAD_FRACTION`` (the padding is exact, but a much larger product is almost surely a typo).

    Parameters
    ----------
    modes : sequence of int
        The modes, each >= 1.
    size : int
        The size they factor.
    name : str
        Parameter name for error messages (``"in_modes"`` / ``"out_modes"``).
    d : int, optional
        Required number of modes.

    Raises
    ------
    ValueError
        If a mode is not positive, the count differs from ``d``, or the product does not fit.
    """
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(modes).__name__}")
    values = tuple(modes)
    if not values:
        raise ValueError(f"{name} must contain at least one mode")
    if any(isinstance(m, bool) or not isinstance(m, int) for m in values):
        raise TypeError(f"{name} must contain only ints, got {values!r}")
    if any(m < 1 for m in values):
        raise ValueError(f"{name} must contain positive integers (>= 1), got {values!r}")
    if d is not None and len(values) != d:
        raise ValueError(f"{name} must have d = {d} modes, got {len(values)}: {values!r}")
    product = math.prod(values)
    limit = math.floor(size * (1 + MAX_PAD_FRACTION))
    if not size <= product <= limit:
        raise ValueError(
            f"{name}={values!r} multiply to {product}, but must multiply to the size {size} "
            f"(or to a zero-padded size in [{size}, {limit}])"
        )
    return values
