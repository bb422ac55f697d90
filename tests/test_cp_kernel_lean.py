"""The blockwise CP kernel matrix (``ttcompress.layers._cp_kernel``): same values and gradients as
``CPConv2d.kernel()``, and no ``R K`` tensor kept for the backward pass (issue 25)."""

from __future__ import annotations

import pytest
import torch

import ttcompress.layers._cp_kernel as lean
from ttcompress.layers.cp_conv import CPConv2d


def _layer(groups: int, rank: int) -> CPConv2d:
    torch.manual_seed(0)
    return CPConv2d(6 * groups, 4 * groups, (5, 3), rank=rank, groups=groups).double()


@pytest.mark.parametrize(("groups", "block"), [(1, 40), (2, 1), (1, 10**9)])
def test_blockwise_kernel_matches_kernel_values_and_gradients(groups: int, block: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(groups, rank=7)
    monkeypatch.setattr(lean, "BLOCK_VALUES", block)
    weight = torch.randn(layer.out_channels, 6 * 15, dtype=torch.float64)
    plain = layer.kernel().reshape(layer.out_channels, -1)
    (plain * weight).sum().backward()
    expected = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    g, r = groups, layer.rank
    got = lean.cp_kernel_matrix(layer.out_factor.reshape(g, 4, r), layer.in_factor.reshape(g, r, 6),
                                layer.kh_factor.reshape(g, r, 5), layer.kw_factor.reshape(g, r, 3)
                                ).reshape(layer.out_channels, -1)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    (got * weight).sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert len(grads) == len(expected) == 4
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_blockwise_kernel_passes_gradcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "BLOCK_VALUES", 30)
    torch.manual_seed(1)
    factors = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
               torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True),
               torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lean.cp_kernel_matrix, factors)


def _largest_saved(layer: CPConv2d) -> int:
    """Most values of one tensor autograd saves while building ``dense_weight()``."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.dense_weight().sum().backward()
    return max(sizes)


def test_dense_weight_of_a_wide_layer_saves_no_rank_times_k_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(1, rank=8)
    terms = layer.rank * 6 * 15  # R K
    assert _largest_saved(layer) >= terms  # kernel()'s path keeps the (R, C_in, kh, kw) terms
    monkeypatch.setattr(lean, "BLOCK_VALUES", 64)
    monkeypatch.setattr("ttcompress.layers.cp_conv.LEAN_MIN_VALUES", 64)
    assert _largest_saved(layer) < terms / 4  # only the factors


def test_dense_weight_of_a_small_layer_is_kernels_bit_for_bit() -> None:
    layer = _layer(1, rank=8)
    assert layer.rank * 6 * 15 <= lean.LEAN_MIN_VALUES
    assert torch.equal(layer.dense_weight(), layer.kernel().reshape(layer.out_channels, -1))
