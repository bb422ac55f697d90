"""When the layers' custom autograd functions may run, and when plain differentiable ops must.

``TTLinear``'s chain and the layout-switching 1x1 products of ``CPConv2d``/``Tucker2Conv2d`` are
``torch.autograd.Function`` subclasses (for their memory layouts and saved tensors). Their plain
counterparts compute the same numbers with ordinary ops that autograd differentiates itself.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

__all__ = ["plain_ops_only"]


def plain_ops_only() -> bool:
    """Whether a custom autograd function must not be used here: when tracing or compiling (a
    TorchScript or exported graph cannot hold a Python autograd function; the compiler schedules
    layouts itself), under ``torch.func`` transforms (``vmap``/``grad``, e.g. per-sample
    gradients) and inside a forward-mode AD level (``torch.autograd.forward_ad.dual_level``),
    neither of which these autograd functions implement."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling()
                or _functorch_active() or getattr(forward_ad, "_current_level", -1) >= 0)


# Private torch APIs (present in every torch this package supports; looked up defensively).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
