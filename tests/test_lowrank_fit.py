"""Large-layer low-rank fits (issue 25): randomized truncated SVD, Cholesky whitening, float32 Grams,
errors through the factors -- each against the float64 full-SVD / exact path, with stated tolerances."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ttcompress.calibration.fit as fit
from ttcompress.calibration.fit import fit_layer, lowrank_output_errors, output_error, whitened_lowrank
from ttcompress.calibration.stats import StatsAccumulator, layer_stats
from ttcompress.decompose.svd import randomized_svd, use_randomized_svd
from ttcompress.formats.registry import get_format
from ttcompress.layers import TTLinear

F64 = torch.float64


def _rows(n: int, k: int, dim: int, seed: int, *, noise: float = 0.05) -> torch.Tensor:
    """``n`` rows of length ``k``: a ``dim``-dimensional part with decaying scales, isotropic noise, an offset."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, k, generator=gen)
    scales = torch.logspace(0.5, -0.5, dim)
    return (torch.randn(n, dim, generator=gen) * scales) @ basis + noise * torch.randn(n, k, generator=gen) + 0.2


def _optimal_error(a: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(a.to(F64))
    return float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())


def _error(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    a = a.to(F64)
    return float((a - (u * s) @ vh).norm() / a.norm())


# ------------------------------------------------------------------------------ randomized SVD
def test_randomized_svd_matches_full_svd_on_a_decaying_spectrum():
    """Singular values decaying 10x per 20: the leading 40 triplets to 1e-5 (float32 products)."""
    gen = torch.Generator().manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(700, 300, generator=gen, dtype=F64)).Q
    q2 = torch.linalg.qr(torch.randn(600, 300, generator=gen, dtype=F64)).Q
    s_true = torch.logspace(0, -15, 300, dtype=F64)
    a = (q1 * s_true) @ q2.T
    u, s, vh = randomized_svd(a, 40)
    assert u.shape == (700, 40) and s.shape == (40,) and vh.shape == (40, 600) and u.dtype == F64
    torch.testing.assert_close(s, s_true[:40], rtol=1e-5, atol=1e-6)
    assert _error(a, u, s, vh) <= _optimal_error(a, 40) + 1e-5
    torch.testing.assert_close(u.T @ u, torch.eye(40, dtype=F64), atol=1e-5, rtol=0)
    wide = randomized_svd(a.T, 40)  # a wide matrix: the same triplets, transposed
    torch.testing.assert_close(wide[1], s, rtol=1e-5, atol=1e-6)


def test_randomized_svd_on_a_flat_spectrum_within_two_percent_and_seeded():
    """A random (nn.Linear-initialised) weight, rank a sixth of its size: the worst case (flat,
    Marchenko-Pastur spectrum); q = 3 power iterations stay within 2 % of the optimal error."""
    torch.manual_seed(0)
    w = nn.Linear(600, 1400).weight.detach()
    r = 100
    u, s, vh = randomized_svd(w, r)
    assert _error(w, u, s, vh) <= 1.02 * _optimal_error(w, r)
    again = randomized_svd(w, r)
    assert torch.equal(again[1], s)  # deterministic for a seed
    assert _error(w, *randomized_svd(w, r, power_iters=0)) > _error(w, u, s, vh)  # the iterations matter


def test_use_randomized_only_far_below_the_size():
    assert use_randomized_svd(11008, 4096, 746)
    assert not use_randomized_svd(11008, 4096, 2000)
    assert not use_randomized_svd(300, 200, 4)  # small layers keep the full SVD


def test_randomized_svd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        randomized_svd(torch.randn(5, 4), 0)
    with pytest.raises(ValueError, match="power_iters"):
        randomized_svd(torch.randn(5, 4), 2, power_iters=-1)
    with pytest.raises(ValueError, match="2-D"):
        randomized_svd(torch.randn(5), 2)


# ------------------------------------------------------------------------------ float32 Grams
def test_float32_gram_blocks_match_float64_reference():
    """float32 rows of K >= GRAM_FLOAT32_FEATURES: the Gram summed from float32 products of
    GRAM_BLOCK_ROWS rows is within 1e-6 (relative to its largest entry) of the float64 product;
    identical inputs keep one matrix."""
    lin = nn.Linear(1024, 8)
    x = _rows(5000, 1024, 12, seed=1)
    acc = StatsAccumulator(lin)
    for chunk in x.split(1700):
        acc.update(chunk, chunk)
    st = acc.finalize()
    ref = x.to(F64).T @ x.to(F64)
    assert float((st.gram[0] - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    assert st.gram is st.cross is st.dense_gram
    torch.testing.assert_close(st.mean[0], x.to(F64).mean(0))
    centered = st.centered()
    assert centered.gram is centered.cross is centered.dense_gram
    xt = x + 0.1
    acc.update(x[:100], xt[:100])  # rows that differ part the three Grams
    parted = acc.finalize()
    assert parted.gram is not parted.cross
    rows = torch.cat([x, x[:100]]).to(F64)
    rows_t = torch.cat([x, xt[:100]]).to(F64)
    for got, want in ((parted.gram, rows_t.T @ rows_t), (parted.cross, rows.T @ rows_t),
                      (parted.dense_gram, rows.T @ rows)):
        assert float((got[0] - want).abs().max()) <= 1e-6 * float(want.abs().max())


# ------------------------------------------------------------------------------ whitened fits
def _exact_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force today's path: eigendecomposition and full SVD."""
    monkeypatch.setattr(fit, "use_randomized_svd", lambda *a: False)


def _fast_and_exact(monkeypatch, w, st, rank, judge) -> tuple[float, float]:
    """Output errors (on the statistics ``judge``) of the fit on ``st``: the new path, today's path."""
    a, b = whitened_lowrank(w, st, rank)
    fast = output_error(w, a.double() @ b.double(), judge)
    with monkeypatch.context() as m:
        _exact_path(m)
        a0, b0 = whitened_lowrank(w, st, rank)
    return fast, output_error(w, a0.double() @ b0.double(), judge)


@pytest.mark.parametrize("same", [True, False], ids=["same-inputs", "compressed-inputs"])
@pytest.mark.parametrize("isotropic", [True, False], ids=["isotropic", "structured"])
def test_cholesky_randomized_fit_within_two_percent_of_exact(monkeypatch, same, isotropic):
    """A layer past RANDOMIZED_MIN_SIZE (out 1100, K 520, rank 80): the Cholesky-whitened randomized
    fit's output error within 2 % of the eigendecomposition + full SVD fit."""
    k, out, rank = 520, 1100, 80
    x = torch.randn(3000, k, generator=torch.Generator().manual_seed(2)) if isotropic else _rows(3000, k, 60, seed=2)
    xt = x if same else x + 0.05 * torch.randn(3000, k, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    lin = nn.Linear(k, out)
    w = lin.weight.detach()
    st = layer_stats(lin, xt, dense_inputs=None if same else x)
    assert use_randomized_svd(out, k, rank)
    fast, exact = _fast_and_exact(monkeypatch, w, st, rank, st)
    assert exact <= fast <= 1.02 * exact, (fast, exact)


def test_sketched_randomized_fit_within_two_percent_of_exact(monkeypatch):
    k, out, rank = 1100, 520, 80
    x = _rows(2500, k, 80, seed=4)
    torch.manual_seed(1)
    lin = nn.Linear(k, out)
    w = lin.weight.detach()
    st = layer_stats(lin, x, sketch_rows=256)
    assert st.sketched
    fast, exact = _fast_and_exact(monkeypatch, w, st, rank, layer_stats(lin, x))
    assert fast <= 1.02 * exact, (fast, exact)


def test_lowrank_output_errors_match_output_error():
    gen = torch.Generator().manual_seed(5)
    x = _rows(400, 30, 8, seed=6).double()
    xt = x + 0.1 * torch.randn(400, 30, generator=gen, dtype=F64)
    lin = nn.Linear(30, 20).double()
    w, bias = lin.weight.detach(), lin.bias.detach()
    cands = [(torch.randn(20, 4, generator=gen, dtype=F64), torch.randn(4, 30, generator=gen, dtype=F64), nb)
             for nb in (None, bias + 0.1)]
    for st in (layer_stats(lin, xt, dense_inputs=x), layer_stats(lin, x), layer_stats(lin, xt, dense_inputs=x,
                                                                                         sketch_rows=16)):
        got = lowrank_output_errors(w, cands, st, bias=bias)
        want = [output_error(w, a @ b, st, bias=bias, new_bias=nb) for a, b, nb in cands]
        assert got == pytest.approx(want, rel=1e-9)
    # a float32 layer from GRAM_FLOAT32_FEATURES on: tr(W G W^T) from float32 products, within 1e-5
    lin = nn.Linear(1024, 64)
    x = _rows(1500, 1024, 30, seed=8)
    st = layer_stats(lin, x)
    w = lin.weight.detach()
    cands = [(torch.randn(64, 8, generator=gen), torch.randn(8, 1024, generator=gen) / 30, lin.bias.detach())]
    got = lowrank_output_errors(w, cands, st, bias=lin.bias.detach())
    assert got == pytest.approx([output_error(w, cands[0][0] @ cands[0][1], st, bias=lin.bias.detach(),
                                              new_bias=lin.bias.detach())], rel=1e-5)


def test_calibrated_svd_build_of_a_large_layer(monkeypatch):
    """The svd format's calibrated build past the randomized threshold: a randomized data-free start
    (no full SVD of the weight), the fit within 2 % of today's (full SVD start and fit)."""
    k, out = 520, 1100
    x = _rows(3000, k, 60, seed=7)
    torch.manual_seed(2)
    lin = nn.Linear(k, out)
    st = layer_stats(lin, x)
    fmt = get_format("svd")
    called = []
    monkeypatch.setattr("ttcompress.layers.svd_linear.truncated_svd",
                        lambda *a, **kw: called.append(1) or pytest.fail("full SVD of the weight"))
    fast = fmt.build(lin, {"rank": 80, "eps": None}, calib=st).fit
    assert not called and fast is not None and fast.method == "whitened-svd"
    monkeypatch.undo()
    _exact_path(monkeypatch)
    monkeypatch.setattr("ttcompress.formats.svd.use_randomized_svd", lambda *a: False)
    exact = fmt.build(lin, {"rank": 80, "eps": None}, calib=st).fit
    assert exact.error_after <= fast.error_after <= 1.02 * exact.error_after, (fast, exact)
    assert fast.error_before <= 1.02 * exact.error_before  # the randomized start is near the SVD's


def test_tt_als_on_sketched_statistics_with_padded_output_modes():
    """Output modes whose product exceeds out_features (19 -> 4 x 5): the targets, built by blocks
    of rows, fill only the real rows (a bench run of Linear(4096, 11008) failed here)."""
    torch.manual_seed(3)
    lin = nn.Linear(36, 19)
    x = _rows(800, 36, 10, seed=9)
    st = layer_stats(lin, x, sketch_rows=16)
    assert st.sketched and not st.exact
    start = TTLinear.from_linear(lin, in_modes=(6, 6), out_modes=(4, 5), ranks=3)
    result = fit_layer(lin, start, st)
    assert result.method == "tt-als" and result.error_after < result.error_before
