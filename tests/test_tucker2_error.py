"""Tucker-2's HOOI error from the core's norm (issue 25): same value as the reconstruction's."""

from __future__ import annotations

import pytest
import torch

from ttcompress.decompose.tucker2 import tucker2, tucker2_reconstruct


@pytest.mark.parametrize(("shape", "ranks"), [((16, 12, 3, 3), (5, 4)), ((8, 32, 16, 1), (6, 8)),
                                              ((6, 5, 3, 3), (6, 5))])
def test_reported_error_is_the_reconstruction_error(shape, ranks):
    torch.manual_seed(0)
    k = torch.randn(*shape, dtype=torch.float64)
    dec = tucker2(k, out_rank=ranks[0], in_rank=ranks[1], n_iter_max=5)
    direct = float((k - tucker2_reconstruct(dec.core, dec.out_factor, dec.in_factor)).norm() / k.norm())
    assert dec.rel_error == pytest.approx(direct, rel=1e-10, abs=1e-12)


def test_near_exact_fit_is_measured_directly():
    # exact Tucker-2 structure: the error is ~1e-16, where ||K||^2 - ||core||^2 would be rounding noise
    torch.manual_seed(1)
    core = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(7, 2, dtype=torch.float64)).Q
    k = tucker2_reconstruct(core, u, v)
    dec = tucker2(k, out_rank=3, in_rank=2)
    assert dec.rel_error < 1e-12
