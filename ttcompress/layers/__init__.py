"""Factorized layers: :class:`TTLinear` (TT-matrix) and :class:`CPConv2d` (CP convolution), and
the layers of the other registered formats.

:data:`LAYER_TYPES` maps a checkpoint's recorded format name to its layer class, so a compressed
model can be rebuilt from ``layer.config()`` without unpickling code. It is a live view of the
format registry (:mod:`ttcompress.formats`).
"""

from __future__ import annotations

from ttcompress.formats.registry import LAYER_TYPES
from ttcompress.layers.cp_conv import CPConv2d
from ttcompress.layers.svd_linear import SVDLinear
from ttcompress.layers.tt_linear import TTLinear
from ttcompress.layers.tucker2_conv import Tucker2Conv2d

__all__ = ["LAYER_TYPES", "CPConv2d", "SVDLinear", "TTLinear", "Tucker2Conv2d"]
