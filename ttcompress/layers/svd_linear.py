"""``SVDLinear``: a Linear layer whose weight is a rank-``r`` product ``W = second @ first``.

Evaluated as two matmuls (``x -> x first^T -> (.) second^T + b``), ``r (m + n)`` multiply-adds
per sample, or as one matmul with the product when that is cheaper (``r (m + n) >= m n``, only
at ranks that do not compress). See :mod:`ttcompress.decompose.svd` for the decomposition.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.decompose.svd import truncated_svd
from ttcompress.layers._export import keeping_factors
from ttcompress.layers._weight import DenseWeightAttribute

__all__ = ["SVDLinear"]


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


class SVDLinear(DenseWeightAttribute, nn.Module):
    """Low-rank ``nn.Linear``: ``y = x first^T second^T + b``.

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``.
    rank : int
        Inner dimension (at most ``min(in_features, out_features)``).
    bias : bool
        Whether the layer has a bias.
    device, dtype : optional
        Factory arguments for the parameters.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = _positive(in_features, "in_features")
        self.out_features = _positive(out_features, "out_features")
        self.rank = _positive(rank, "rank")
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be <= min(in_features, out_features) = {min(in_features, out_features)}, "
                             f"got {rank}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.second = nn.Parameter(torch.empty(out_features, rank, **factory))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.rel_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors whose product has ``nn.Linear``'s default weight variance ``1 / (3 in)``.

        ``Var W_ij = r s1^2 s2^2``; both factors get ``s^2 = (1 / (3 in r)) ** 0.5``.
        """
        std = (1.0 / (3.0 * self.in_features * self.rank)) ** 0.25
        with torch.no_grad():
            self.first.normal_(0.0, std)
            self.second.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None, eps: float | None = None) -> SVDLinear:
        """Build from a trained ``nn.Linear`` by truncated SVD of its weight (rank and/or eps).

        The bias, device and dtype are kept; ``rel_error`` is set to the achieved relative error.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        low = truncated_svd(w, rank=rank, eps=eps)
        layer = cls(linear.in_features, linear.out_features, rank=low.rank, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.first.copy_(low.right)
            layer.second.copy_(low.left)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)  # type: ignore[union-attr]
        layer.rel_error = low.rel_error
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` product (differentiable)."""
        return self.second @ self.first

    def to_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same device and dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.first.device, dtype=self.first.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def config(self) -> dict[str, Any]:
        """JSON-serializable kwargs: ``SVDLinear(**layer.config())`` rebuilds the structure."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    @property
    def factorized(self) -> bool:
        """True when two matmuls cost fewer multiply-adds than one with the product."""
        return self.rank * (self.in_features + self.out_features) < self.in_features * self.out_features

    @property
    def flops(self) -> int:
        """Multiply-adds per sample of the evaluation ``forward`` uses."""
        dense = self.in_features * self.out_features
        return min(self.rank * (self.in_features + self.out_features), dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factorized or keeping_factors():
            return F.linear(F.linear(x, self.first), self.second, self.bias)
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}"
                + ("" if self.bias is not None else ", bias=False"))
