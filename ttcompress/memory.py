"""Memory: an estimate before a large allocation, and the allocator's out-of-memory errors in words.

A size the user gives (an input shape, an architecture's kwargs) can ask for more memory than the
machine has. Where the size is known before allocating, :func:`check_allocation` refuses it with a
``MemoryError`` that says how much it needs; elsewhere PyTorch's allocator raises a
``RuntimeError`` (CPU: ``DefaultCPUAllocator: can't allocate memory``) or
``torch.OutOfMemoryError`` (CUDA), which :func:`out_of_memory_message` words as one line. The
module does not import torch: the CLI's error handler uses it, and ``--help`` stays light.
"""

from __future__ import annotations

import re

__all__ = ["available_bytes", "check_allocation", "out_of_memory_message"]

_TRIED = re.compile(r"tried to allocate\s+([\d.]+)\s*(bytes|[KMGTP]i?B)", re.IGNORECASE)
_UNITS = {"bytes": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40, "pb": 2**50, "pib": 2**50}  # fmt: skip
_CPU_OOM = ("DefaultCPUAllocator", "not enough memory", "can't allocate memory")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GB"


def available_bytes() -> int | None:
    """Bytes of memory that can be allocated now (``MemAvailable``, Linux); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse, before allocating, ``nbytes`` of memory for ``what`` when more than is available.

    Raises
    ------
    MemoryError
        ``"{what} needs N GB, more than the M GB available"``.
    """
    available = available_bytes()
    if available is not None and nbytes > available:
        raise MemoryError(f"{what} needs {_gb(nbytes)}, more than the {_gb(available)} available")


def out_of_memory_message(exc: BaseException) -> str | None:
    """``"out of memory: ... needs N GB"`` when ``exc`` is an allocator's out-of-memory error, else None."""
    text = " ".join(str(exc).split())
    oom = isinstance(exc, RuntimeError) and (
        type(exc).__name__ == "OutOfMemoryError" or any(marker in text for marker in _CPU_OOM)
    )  # torch.OutOfMemoryError is a RuntimeError
    if not oom:
        return None
    tried = _TRIED.search(text)
    if tried is None:
        return "out of memory: an allocation failed"
    nbytes = float(tried.group(1)) * _UNITS[tried.group(2).lower()]
    return f"out of memory: an allocation needs {_gb(nbytes)}, more than is available"
