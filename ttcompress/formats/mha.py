"""The ``mha`` format: ``nn.MultiheadAttention`` -> :class:`~ttcompress.layers.attention.FactorizedMultiheadAttention`.

A *structural* format: the conversion is exact (the packed ``in_proj_weight`` is split into the
Linear children ``q``, ``k``, ``v``, and ``out_proj`` becomes ``out``) and compresses nothing by
itself. It exists so that the projections become layers a plan can address by name
(``encoder.layers.*.self_attention.q``) and compress with any Linear format, and so that a
checkpoint records the conversion (the parent's ``config()`` first, then its compressed children).
Surgery applies it where needed (:func:`ttcompress.compression.pipeline.compress_with_report`); a plan never
selects it for a layer.

References
----------
A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ttcompress.formats.base import BuildResult, CompressionFormat, FormatDescription, LayerDecision, dense_params
from ttcompress.formats.registry import register_format
from ttcompress.layers.attention import FactorizedMultiheadAttention, unsupported_reason

__all__ = ["MHAFormat", "MHASettings"]


@dataclass(frozen=True)
class MHASettings:
    """The ``mha`` format has no options: the conversion is exact."""


@register_format
class MHAFormat(CompressionFormat):
    """Multi-head attention with its four projections as child Linear layers (exact)."""

    name = "mha"
    targets = (nn.MultiheadAttention,)
    layer_class = FactorizedMultiheadAttention
    settings = MHASettings
    structural = True
    summary = "MultiheadAttention -> q/k/v/out child Linear layers (exact; structural)"

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        before = dense_params(module)
        reason = unsupported_reason(module)
        shape = (int(module.embed_dim), int(module.embed_dim))
        return LayerDecision(name, type(module).__name__, shape, "dense" if reason else self.name, {}, before,
                             before, reason, aliases)

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        return BuildResult.of(FactorizedMultiheadAttention.from_mha(module))

    def describe(self, layer: nn.Module) -> FormatDescription:
        text = f"{layer.num_heads} heads"
        return FormatDescription(self.name, (int(layer.embed_dim), int(layer.embed_dim)), (), None, None, text)
