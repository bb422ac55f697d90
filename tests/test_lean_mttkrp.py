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


@pytest.mark.parametrize("shape", [(4, 10, 3, 1), (7, 5, 3, 2), (2, 6)])
@pytest.mark.parametrize("float32", [False, True])
def test_buffers_kept_between_calls_give_fresh_results(shape, float32, monkeypatch):
    # one run's cache (unfoldings + scratch buffers) across "sweeps" with changing factors: every
    # result matches the float64 reference, and no result is overwritten by a later call
    from ttcompress.decompose import cp_lean

    if float32:  # the float32 products and their casts too
        monkeypatch.setattr(cp_lean, "FLOAT32_MIN_WORK", 1)
    torch.manual_seed(1)
    rank = 4
    t = torch.randn(*shape, dtype=torch.float64)
    cache: dict = {}
    kept = []
    for _sweep in range(3):
        factors = [torch.randn(n, rank, dtype=torch.float64) for n in shape]
        for mode in range(len(shape)):
            got = lean_mttkrp(t, (None, factors), mode, cache)
            want = _reference(t, factors, mode)
            tol = 1e-5 if float32 else 1e-12
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            kept.append((got.clone(), got))
    assert any(key[0] == "buf" for key in cache)  # buffers were kept for reuse
    for copy, result in kept:
        assert torch.equal(copy, result)
