"""``layer.weight`` for factorized layers, for code written against ``nn.Linear``/``nn.Conv2d``.

Model code often reads its layers' ``weight`` without calling them: transformers' ViT and CLIP
patch embeddings cast their input to ``projection.weight.dtype``, T5's feed-forward compares its
hidden states' dtype with ``wo.weight.dtype``. A factorized layer has no such parameter, so such a
model would fail after surgery. :class:`DenseWeightAttribute` gives it a read-only ``weight``: the
equivalent dense weight built from the factors (differentiable, the layer's dtype and device).
Building it costs what ``dense_weight()`` costs, on every read.
"""

from __future__ import annotations

import torch

__all__ = ["DenseWeightAttribute"]


class DenseWeightAttribute:
    """Mixin: ``weight`` (read-only) is the layer's ``kernel()`` (a convolution's
    ``(C_out, C_in / groups, kh, kw)``) or else its ``dense_weight()`` (a linear layer's ``(out, in)``)."""

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense weight (as ``nn.Linear``/``nn.Conv2d`` would hold it), built on read."""
        kernel = getattr(self, "kernel", None)
        return kernel() if callable(kernel) else self.dense_weight()  # type: ignore[attr-defined]
