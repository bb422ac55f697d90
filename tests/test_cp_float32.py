"""CP-ALS with float32 MTTKRP products (issue 25): same fit as float64 within stated tolerances."""

from __future__ import annotations

import pytest
import torch

from ttcompress.decompose import cp_lean
from ttcompress.decompose.cp import cp_als


@pytest.mark.parametrize(("shape", "rank"), [((24, 40, 6, 1), 30), ((16, 12, 3, 3), 20), ((40, 8, 5, 1), 8)])
def test_float32_products_fit_like_float64(monkeypatch, shape, rank):
    torch.manual_seed(0)
    k = torch.randn(*shape, dtype=torch.float64)
    exact = cp_als(k, rank=rank, n_iter_max=25, tol=0.0)
    monkeypatch.setattr(cp_lean, "FLOAT32_MIN_WORK", 0)  # every product in float32
    fast = cp_als(k, rank=rank, n_iter_max=25, tol=0.0)
    # reference: the float64 fit; the float32 one reaches the same error to 1e-4 (absolute, rel. error)
    assert abs(fast.rel_error - exact.rel_error) <= 1e-4
    # and its reported error is its true one, measured densely in float64: the error comes from the
    # last float32 MTTKRP (||K||^2 - 2 <K, K^> + ||K^||^2), its rounding ~1e-9 relative here
    true = float((fast.to_tensor().double() - k).norm() / k.norm())
    assert fast.rel_error == pytest.approx(true, rel=1e-6)
    true64 = float((exact.to_tensor().double() - k).norm() / k.norm())
    assert exact.rel_error == pytest.approx(true64, rel=1e-9)  # float64 products: to rounding


def test_products_below_the_threshold_stay_float64():
    a = torch.randn(10, 20, dtype=torch.float64)
    b = torch.randn(20, 5, dtype=torch.float64)
    torch.testing.assert_close(cp_lean._product(a, b), a @ b, rtol=0, atol=0)
