"""The dense ``(out, K)`` weight and the bias a layer is equivalent to, differentiably.

``K`` is ``in_features`` for a linear layer and ``C_in / groups * kh * kw`` for a convolution
(``weight.reshape(C_out, -1)``), matching the rows of :func:`ttcompress.calibration.stats.input_rows`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dense_weight", "effective_bias", "set_effective_bias"]


def _linear_chain(module: nn.Module) -> list[nn.Linear] | None:
    if isinstance(module, nn.Sequential) and len(module) > 0 and all(isinstance(m, nn.Linear) for m in module):
        return list(module)  # type: ignore[arg-type]
    return None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The equivalent dense weight as a 2-D ``(out, K)`` tensor, differentiable in the parameters.

    Supports ``nn.Linear``, ``nn.Conv2d``, an ``nn.Sequential`` of ``nn.Linear`` (a low-rank
    product ``W_k ... W_1``), and any module with a ``dense_weight()`` method: every factorized
    layer of :mod:`ttcompress.layers` has one, so this function never asks for a layer's class.

    Raises
    ------
    TypeError
        For any other module.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, nn.Conv2d):
        return module.weight.reshape(module.out_channels, -1)
    chain = _linear_chain(module)
    if chain is not None:
        w = chain[0].weight
        for layer in chain[1:]:
            w = layer.weight @ w
        return w
    method = getattr(module, "dense_weight", None)
    if callable(method):
        return method()
    raise TypeError(f"module must be a Linear, Conv2d, a Sequential of Linear, or a layer with a "
                    f"dense_weight() method (every factorized layer); got {type(module).__name__}")


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The additive bias of the layer's output (composed through a chain of ``nn.Linear``)."""
    chain = _linear_chain(module)
    if chain is None:
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None
    b: torch.Tensor | None = None
    for layer in chain:
        b = None if b is None else layer.weight @ b
        if layer.bias is not None:
            b = layer.bias if b is None else b + layer.bias
    return b


def set_effective_bias(module: nn.Module, bias: torch.Tensor) -> bool:
    """Make the layer's output bias equal ``bias`` (in place, no grad); False when it has none.

    For a chain of ``nn.Linear`` the last layer's bias absorbs the difference.
    """
    chain = _linear_chain(module)
    target = chain[-1] if chain is not None else module
    own = getattr(target, "bias", None)
    if not isinstance(own, torch.Tensor):
        return False
    current = effective_bias(module)
    with torch.no_grad():
        shift = bias.to(own) - (current.detach() if current is not None else 0.0)
        own.add_(shift)
    return True
