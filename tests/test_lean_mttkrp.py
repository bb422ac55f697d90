"""The memory-lean MTTKRP against TensorLy's dense reference (issue 25: both contraction orders)."""

from __future__ import annotations

import pytest
import torch

from ttcompress.decompose.cp_lean import lean_mttkrp


def _reference(tensor, factors, mode):
    # unfold(tensor, mode) @ khatri_rao(all factors but mode), built densely in float64
    others = [m for m in range(tensor.ndim) if m != mode]
    rank = factors[0].shape[1]
    kr = factors[others[0]]
    for m in others[1:]:
        kr = torch.einsum("ir,jr->ijr", kr, factors[m]).reshape(-1, rank)
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1) @ kr


@pytest.mark.parametrize("shape", [(4, 10, 3, 1), (7, 5, 3, 2), (3, 4, 9, 1), (2, 6)])
@pytest.mark.parametrize("weighted", [False, True])
def test_lean_mttkrp_matches_the_dense_khatri_rao_product(shape, weighted):
    torch.manual_seed(0)
    rank = 5
    t = torch.randn(*shape, dtype=torch.float64)
    factors = [torch.randn(n, rank, dtype=torch.float64) for n in shape]
    weights = torch.rand(rank, dtype=torch.float64) + 0.5 if weighted else None
    for mode in range(len(shape)):
        want = _reference(t, factors, mode) * (weights if weighted else 1.0)
        got = lean_mttkrp(t, (weights, factors), mode)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
