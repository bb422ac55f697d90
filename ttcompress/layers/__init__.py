"""Factorized layers: :class:`TTLinear` (TT-matrix) and :class:`CPConv2d` (CP convolution).

:data:`LAYER_TYPES` maps a checkpoint's recorded format name to its layer class, so a compressed
model can be rebuilt from ``layer.config()`` without unpickling code.
"""

from __future__ import annotations

from torch import nn

from ttcompress.layers.cp_conv import CPConv2d
from ttcompress.layers.tt_linear import TTLinear

__all__ = ["LAYER_TYPES", "CPConv2d", "TTLinear"]

LAYER_TYPES: dict[str, type[nn.Module]] = {"tt": TTLinear, "cp": CPConv2d}
