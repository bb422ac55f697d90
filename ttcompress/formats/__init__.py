"""Compression formats: one module per format, registered by name.

================ ====================== =========================================================
name             compresses             module
================ ====================== =========================================================
``tt``           ``Linear``             :mod:`ttcompress.formats.tt` (TT-matrix, TT-SVD)
``cp``           ``Conv2d``             :mod:`ttcompress.formats.cp` (CP, CP-ALS)
``svd``          ``Linear``             :mod:`ttcompress.formats.svd` (low-rank product, truncated SVD)
``tucker2``      ``Conv2d``             :mod:`ttcompress.formats.tucker2` (1x1, kxk core, 1x1; HOSVD + HOOI)
``tt_embedding`` ``Embedding``          :mod:`ttcompress.formats.tt_embedding` (TT-matrix table, TT-SVD)
``mha``          ``MultiheadAttention`` :mod:`ttcompress.formats.mha` (exact; q/k/v/out become Linear children)
``auto``         Linear, Conv2d         :mod:`ttcompress.formats.auto` (per layer, the lowest error at the budget)
================ ====================== =========================================================

A new format is one new module here: subclass :class:`CompressionFormat`, decorate it with
:func:`register_format`, and import the module below. Plans, surgery, checkpoints, inspect and
reports find it through the registry.
"""

from __future__ import annotations

# The registry first: the format modules register themselves into it on import.
from ttcompress.formats.registry import (
    DENSE,
    LAYER_TYPES,
    compressible,
    default_format,
    format_names,
    format_of,
    formats_for,
    get_format,
    layer_classes,
    register_format,
    structural_classes,
)
from ttcompress.formats.base import CompressionFormat, FormatDescription, Ladder, LayerDecision
from ttcompress.formats import tt  # noqa: E402,F401  (built-in formats register themselves, in this order)
from ttcompress.formats import cp  # noqa: E402,F401
from ttcompress.formats import svd  # noqa: E402,F401
from ttcompress.formats import tucker2  # noqa: E402,F401
from ttcompress.formats import tt_embedding  # noqa: E402,F401
from ttcompress.formats import mha  # noqa: E402,F401
from ttcompress.formats import auto  # noqa: E402,F401  (last: it compares the formats above)

__all__ = [
    "DENSE",
    "LAYER_TYPES",
    "CompressionFormat",
    "FormatDescription",
    "Ladder",
    "LayerDecision",
    "compressible",
    "default_format",
    "format_names",
    "format_of",
    "formats_for",
    "get_format",
    "layer_classes",
    "register_format",
    "structural_classes",
]
