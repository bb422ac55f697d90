"""The memory budget of calibration statistics: how many bytes a layer's statistics may take.

Before a layer's statistics are allocated, their size is computed (:func:`exact_bytes`,
:func:`sketch_bytes`) and compared with the budget: a layer whose exact Gram matrices do not fit
is sketched (fewer rows), and one whose smallest sketch does not fit is fitted data-free (see
:class:`ttcompress.calibration.collector.StatsCollector`). Nothing is allocated before it is
known to fit, so a wide layer can never exhaust memory.

The default budget is :data:`DEFAULT_FRACTION` of the memory available now (``MemAvailable`` of
``/proc/meminfo`` for statistics on the CPU, the free memory of the device for statistics on a
GPU), at most :data:`DEFAULT_MAX_CALIB_MEMORY`: on a large machine a quarter of the free memory
would let one layer's statistics (and the fit's work arrays on them) take tens of GB, while no
layer needs more than the cap for its full sketch up to ``K`` = 52,428 (see the constant). A
``--calib-memory`` given explicitly is not capped. Budgets below :data:`MIN_CALIB_MEMORY` are
refused.
"""

from __future__ import annotations

import math
import re

import torch

from ttcompress.errors import InputError

__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_MAX_CALIB_MEMORY",
    "MIN_CALIB_MEMORY",
    "available_memory",
    "check_calib_memory",
    "default_calib_memory",
    "exact_bytes",
    "format_bytes",
    "parse_memory",
    "sketch_bytes",
]

#: Fraction of the available memory that calibration statistics may use by default.
DEFAULT_FRACTION = 0.25
#: The most the default budget takes (2 GiB), whatever the free memory. Exact statistics are chosen
#: only for ``K <= 4 l <= 4,096`` (``ttcompress.calibration.collector``), 0.94 GB at most, so they
#: never reach it; a sketch at the most rows (``l`` = 1,024) fits it up to ``K`` = 52,428. Every
#: layer of ``benchmarks/bench_scale.py``'s calibrated cases gets the same statistics under the cap
#: as under a 5 GB budget, at any rank (the largest: 0.94 GB, the exact Grams of ``Linear(4096,
#: 11008)``; 0.67 GB, CREPE's widest sketches; docs/benchmarks.md, issue 25), so their fits are
#: unchanged. On the 24 GB benchmark machine the quarter of the free memory was about 5 GB.
DEFAULT_MAX_CALIB_MEMORY = 2 * 2**30
#: The smallest budget accepted (16 MiB): below it even small layers would be fitted data-free.
MIN_CALIB_MEMORY = 16 * 2**20
#: Used when the available memory cannot be read (no ``/proc/meminfo``).
_FALLBACK_AVAILABLE = 4 * 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(value: str | int | float) -> int:
    """Bytes from ``value``: an int (bytes) or a string such as ``"4G"``, ``"512MiB"``, ``"1.5GB"``.

    ``K``/``M``/``G``/``T`` alone are binary (powers of 1024), ``KB``/``MB``/... decimal, ``KiB``/...
    binary. ``ValueError`` naming ``calib_memory`` for anything else.
    """
    if isinstance(value, bool):
        raise InputError("calib_memory", f"must be a size such as 4G or 512M, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise InputError("calib_memory", f"must be a size such as 4G or 512M, got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise InputError("calib_memory", f"must be a size such as 4G or 512M, got {type(value).__name__}")
    if not math.isfinite(number) or number < 0:
        raise InputError("calib_memory", f"must be a size such as 4G or 512M, got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(count: float) -> str:
    """``34359738368`` -> ``"34 GB"`` (decimal units, 2 significant digits below 10)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            value = count / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(count)} B"


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes available now for statistics on ``device`` (default CPU).

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (4 GiB when it cannot be read). CUDA: the free
    memory the driver reports for that device.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _FALLBACK_AVAILABLE


def default_calib_memory(device: torch.device | str | None = None) -> int:
    """:data:`DEFAULT_FRACTION` of :func:`available_memory`, at most :data:`DEFAULT_MAX_CALIB_MEMORY`
    and at least :data:`MIN_CALIB_MEMORY`."""
    share = min(int(DEFAULT_FRACTION * available_memory(device)), DEFAULT_MAX_CALIB_MEMORY)
    return max(MIN_CALIB_MEMORY, share)


def check_calib_memory(value: str | int | float | None, device: torch.device | str | None = None) -> int:
    """The budget in bytes: ``value`` parsed (:func:`parse_memory`), or the default when None.

    Raises
    ------
    ValueError
        ``value`` is not a size, or is below :data:`MIN_CALIB_MEMORY`.
    """
    if value is None:
        return default_calib_memory(device)
    budget = parse_memory(value)
    if budget < MIN_CALIB_MEMORY:
        raise InputError("calib_memory", f"{value!r} is below the minimum of {MIN_CALIB_MEMORY // 2**20} MiB")
    return budget


def exact_bytes(features: int, groups: int = 1) -> int:
    """Bytes of a layer's exact statistics and of the fit on them: three float64 ``K x K`` Gram
    matrices per group, and four more ``K x K`` work arrays for the solve of one group."""
    return (3 * groups + 4) * features * features * 8


def sketch_bytes(features: int, rows: int, groups: int = 1, *, paired: bool = True) -> int:
    """Bytes of a sketch of ``rows`` rows: the float32 buffer of ``2 rows`` rows of length ``2K``
    (``K`` when not ``paired``) per group, and the float64 factors the fit derives from one group
    (``rows x 2K`` and an ``rows x K`` basis)."""
    width = 2 * features if paired else features
    return groups * 2 * rows * width * 4 + rows * (width + features) * 8
