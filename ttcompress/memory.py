"""Memory: an estimate before a large allocation, and the allocator's out-of-memory errors in words.

A size the user gives (an input shape, an architecture's kwargs) can ask for more memory than the
machine has. Where the size is known before allocating, :func:`check_allocation` refuses it with a
``MemoryError`` that says how much it needs; elsewhere PyTorch's allocator raises a
``RuntimeError`` (CPU: ``DefaultCPUAllocator: can't allocate memory``) or
``torch.OutOfMemoryError`` (CUDA), which :func:`out_of_memory_message` words as one line. The
module does not import torch: the CLI's error handler uses it, and ``--help`` stays light.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import sys

__all__ = ["available_bytes", "check_allocation", "out_of_memory_message", "release_freed", "RELEASE_AFTER_VALUES"]

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


_LIBC: list = []
#: Layers with at least this many weights hand their freed memory back after a fit (a garbage
#: collection costs tens of milliseconds: not worth it after every small layer).
RELEASE_AFTER_VALUES = 2**20


def release_freed() -> bool:
    """Collect garbage and hand the C heap's freed memory back to the system; whether it could.

    glibc keeps the memory of freed small and medium blocks in its heap for reuse, so after one
    large layer's fit (L-BFGS histories, trial builds) the process's resident size stays at its high
    mark and the next layer's work adds on top. ``malloc_trim(0)`` returns those pages. On other C
    libraries (macOS, musl) only the garbage collection runs (False).
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    if not _LIBC:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    libc = _LIBC[0]
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


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
