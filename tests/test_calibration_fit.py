"""Statistics and per-layer fits of data-aware decomposition (float64 references)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ttcompress.calibration.fit import (
    _damped,
    _solve_core,
    corrected_bias,
    fit_layer,
    objective,
    output_error,
    refine_by_gradient,
    refine_tt_cores,
    whitened_lowrank,
)
from ttcompress.calibration.reconstruct import dense_weight
from ttcompress.calibration.stats import LayerStats, StatsAccumulator, input_rows, layer_stats
from ttcompress.decompose.tt import tt_svd
from ttcompress.layers import CPConv2d, TTLinear

F64 = torch.float64


def _structured(n: int, features: int, dim: int, *, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Rows in a ``dim``-dimensional subspace with decaying scales, plus a little isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(features, dim, generator=gen, dtype=F64))[0]
    scales = torch.logspace(0, -1, dim, dtype=F64)
    z = torch.randn(n, dim, generator=gen, dtype=F64) * scales
    return z @ basis.T + noise * torch.randn(n, features, generator=gen, dtype=F64) + 0.3


def _reference_tt(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense TT-matrix by explicit index sums, ``W[(i..), (j..)] = prod_k G_k[:, i_k, j_k, :]``."""
    c = [core.to(F64) for core in cores]
    if len(c) == 2:
        w = torch.einsum("aimb,bjnc->ijmn", *c)
    else:
        w = torch.einsum("aimb,bjnc,ckod->ijkmno", *c)
    m = math.prod(core.shape[1] for core in c)
    return w.reshape(m, -1)


def _direct_error(w, b, w_hat, b_hat, x, xt) -> float:
    y = x @ w.T + (0 if b is None else b)
    y_hat = xt @ w_hat.T + (0 if b_hat is None else b_hat)
    return float((y - y_hat).norm() / y.norm())


# ------------------------------------------------------------------------------------------ stats
def test_linear_stats_of_3d_inputs_match_reference():
    lin = nn.Linear(6, 4).double()
    x = torch.randn(5, 7, 6, dtype=F64)
    xt = x + 0.1 * torch.randn_like(x)
    st = layer_stats(lin, [xt[:2], xt[2:]], dense_inputs=[x[:2], x[2:]])
    rows, rows_t = x.reshape(-1, 6), xt.reshape(-1, 6)
    torch.testing.assert_close(st.gram[0], rows_t.T @ rows_t)
    torch.testing.assert_close(st.cross[0], rows.T @ rows_t)
    torch.testing.assert_close(st.dense_gram[0], rows.T @ rows)
    torch.testing.assert_close(st.mean[0], rows_t.mean(0))
    assert (st.count, st.samples) == (35, 5)
    same = layer_stats(lin, x)
    torch.testing.assert_close(same.cross, same.gram)


@pytest.mark.parametrize("kwargs", [
    {"padding": 1, "groups": 2},
    {"padding": "same", "dilation": 2, "padding_mode": "reflect"},
    {"stride": 2, "padding": (1, 0)},
])
def test_conv_rows_reproduce_the_convolution(kwargs):
    conv = nn.Conv2d(4, 6, (3, 2), **kwargs).double()
    x = torch.randn(3, 4, 9, 8, dtype=F64)
    acc = StatsAccumulator(conv, max_positions=10_000)
    acc.update(x, x)
    st = acc.finalize()
    rows = input_rows(conv, x)  # (groups, N * L, K)
    w = conv.weight.reshape(conv.groups, -1, st.features)
    y = torch.cat([rows[g] @ w[g].T for g in range(conv.groups)], dim=1) + conv.bias
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(st.gram, rows.transpose(1, 2) @ rows)


def test_conv_positions_are_subsampled_deterministically():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 10, 10)
    first, second = (StatsAccumulator(conv, max_positions=16) for _ in range(2))
    first.update(x, x)
    second.update(x, x)
    assert first.count == 4 * 16
    torch.testing.assert_close(first.finalize().gram, second.finalize().gram)


# ------------------------------------------------------------------------------------------ errors
def test_output_error_and_bias_correction_match_activations():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, dtype=F64) + 1.0
    xt = x + 0.3 * torch.randn(200, 8, generator=gen, dtype=F64) + 0.2
    w, w_hat = torch.randn(5, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    b, b_hat = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    st = layer_stats(nn.Linear(8, 5), xt, dense_inputs=x)
    assert output_error(w, w_hat, st, bias=b, new_bias=b_hat) == pytest.approx(
        _direct_error(w, b, w_hat, b_hat, x, xt), rel=1e-10)
    assert objective(w, w_hat, st) == pytest.approx(float((x @ w.T - xt @ w_hat.T).square().sum()), rel=1e-10)
    b_new = corrected_bias(w, b, w_hat, st)
    torch.testing.assert_close((xt @ w_hat.T + b_new).mean(0), (x @ w.T + b).mean(0))
    assert output_error(w, w_hat, st, bias=b, new_bias=b_new) < output_error(w, w_hat, st, bias=b, new_bias=b_hat)


# ------------------------------------------------------------------------------------------ svd
def test_whitened_lowrank_beats_plain_svd_and_is_optimal():
    x = _structured(400, 30, 8)
    w = torch.randn(20, 30, dtype=F64)
    st = layer_stats(nn.Linear(30, 20), x)
    a, b = whitened_lowrank(w, st, 4, damping=0.0)
    u, s, vh = torch.linalg.svd(w)
    plain = output_error(w, (u[:, :4] * s[:4]) @ vh[:4], st)
    calibrated = output_error(w, a @ b, st)
    assert calibrated < 0.7 * plain
    # optimal: small perturbations of either factor never help
    base = objective(w, a @ b, st)
    for _ in range(5):
        assert objective(w, (a + 1e-3 * torch.randn_like(a)) @ b, st) >= base
        assert objective(w, a @ (b + 1e-3 * torch.randn_like(b)), st) >= base


def test_exact_recovery_when_weight_is_low_rank_on_the_input_subspace():
    gen = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(24, 5, generator=gen, dtype=F64))[0]
    x = torch.randn(300, 5, generator=gen, dtype=F64) @ basis.T
    # W restricted to the subspace has rank 2; off the subspace it is large and full rank
    w = torch.randn(16, 2, generator=gen, dtype=F64) @ torch.randn(2, 5, generator=gen, dtype=F64) @ basis.T
    w = w + 3.0 * torch.randn(16, 24, generator=gen, dtype=F64) @ (torch.eye(24, dtype=F64) - basis @ basis.T)
    st = layer_stats(nn.Linear(24, 16), x)
    a, b = whitened_lowrank(w, st, 2, damping=0.0)
    assert _direct_error(w, None, a @ b, None, x, x) < 1e-10
    assert output_error(w, a @ b, st) < 1e-7  # the Gram form cancels down to ~sqrt(float64 eps)
    assert float((w - a @ b).norm() / w.norm()) > 0.5
    a, b = whitened_lowrank(w, st, 2)  # default damping: nearly exact
    assert output_error(w, a @ b, st) < 1e-3


# ------------------------------------------------------------------------------------------ TT
@pytest.mark.parametrize("out_modes,in_modes", [((4, 5), (6, 6)), ((2, 2, 5), (3, 3, 4))])
def test_tt_als_lowers_output_error(out_modes, in_modes):
    x = _structured(500, 36, 7, seed=3)
    w = torch.randn(20, 36, dtype=F64)
    st = layer_stats(nn.Linear(36, 20), x)
    tt = tt_svd(w, ranks=3, in_modes=in_modes, out_modes=out_modes)
    cores = refine_tt_cores(tt.cores, in_modes, out_modes, w, st, sweeps=3, damping=0.0)
    assert [c.shape for c in cores] == [c.shape for c in tt.cores]
    ref = _reference_tt(list(cores))
    layer = TTLinear(36, 20, ranks=tt.ranks, in_modes=in_modes, out_modes=out_modes, bias=False,
                     dtype=F64)
    with torch.no_grad():
        for param, core in zip(layer.cores, cores):
            param.copy_(core)
    torch.testing.assert_close(layer(x), x @ ref.T)  # the layer's own forward agrees
    before, after = output_error(w, _reference_tt(list(tt.cores)), st), output_error(w, ref, st)
    assert after < 0.6 * before


def test_tt_core_solve_is_a_stationary_point_and_never_increases_the_objective():
    x = _structured(300, 24, 6, seed=4)
    w = torch.randn(12, 24, dtype=F64)
    st = layer_stats(nn.Linear(24, 12), x)
    g, gt, c = (t[0] for t in _damped(st, 1e-6))
    d = w @ c
    cores = [core.clone() for core in tt_svd(w, ranks=2, in_modes=(2, 3, 4), out_modes=(2, 2, 3)).cores]
    values = [objective(w, _reference_tt(cores), st, damping=1e-6)]
    for k in (0, 1, 2, 1, 0, 2):
        _solve_core(cores, k, gt, d)
        values.append(objective(w, _reference_tt(cores), st, damping=1e-6))
        # gradient with respect to the solved core vanishes
        core = cores[k].clone().requires_grad_(True)
        trial = list(cores)
        trial[k] = core
        w_hat = _reference_tt(trial)
        loss = ((w_hat @ gt) * w_hat).sum() - 2 * (d * w_hat).sum()
        (grad,) = torch.autograd.grad(loss, core)
        assert float(grad.norm()) < 1e-6 * float(loss.detach().abs())
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:]))
    assert values[-1] < 0.9 * values[0]


def test_tt_als_with_padded_modes_is_never_worse():
    x = _structured(200, 10, 4, seed=5)
    w = torch.randn(7, 10, dtype=F64)
    st = layer_stats(nn.Linear(10, 7), x)
    layer = TTLinear.from_linear(_linear(w), ranks=2, in_modes=(3, 4), out_modes=(2, 4))
    before = output_error(w, layer.dense_weight().detach(), st)
    cores = refine_tt_cores(list(layer.cores), layer.in_modes, layer.out_modes, w, st)
    after = output_error(w, _reference_tt(list(cores))[:7, :10], st)
    assert after <= before


def _linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


# ------------------------------------------------------------------------------------------ fit_layer
def test_fit_layer_tt_and_two_factor_with_bias():
    x = _structured(400, 36, 6, seed=6)
    dense = _linear(torch.randn(20, 36, dtype=F64), torch.randn(20, dtype=F64))
    st = layer_stats(dense, x)
    tt = fit_layer(dense, TTLinear.from_linear(dense, ranks=2, in_modes=(6, 6), out_modes=(4, 5)), st)
    assert tt.method == "tt-als" and tt.error_after < 0.5 * tt.error_before
    with torch.no_grad():
        y, y_hat = dense(x), tt.module(x)
    assert float((y - y_hat).norm() / y.norm()) == pytest.approx(tt.error_after, rel=1e-8)
    torch.testing.assert_close(y_hat.mean(0), y.mean(0))
    low = nn.Sequential(nn.Linear(36, 3, bias=False), nn.Linear(3, 20)).double()
    svd = fit_layer(dense, low, st)
    assert svd.method == "whitened-svd" and svd.error_after < svd.error_before
    assert float((dense(x) - svd.module(x)).norm() / dense(x).norm()) == pytest.approx(svd.error_after, rel=1e-8)


def test_cp_conv_gradient_refinement_lowers_output_error():
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    channels = torch.randn(2, 4, dtype=F64)
    # structured inputs: smooth images along two fixed channel patterns
    grid = torch.linspace(0, 1, 8, dtype=F64)
    smooth = torch.stack([torch.outer(torch.sin(3 * grid + p), torch.cos(2 * grid + p)) for p in range(32)])
    x = (smooth[:16, None] * channels[0, None, :, None, None] + smooth[16:, None] * channels[1, None, :, None, None]
         + 0.01 * torch.randn(16, 4, 8, 8, dtype=F64))
    st = layer_stats(conv, x, max_positions=10_000)
    start = CPConv2d.from_conv(conv, rank=2)
    result = fit_layer(conv, start, st, steps=60)
    assert result.method == "gradient"
    assert result.error_after < 0.7 * result.error_before
    y, y_hat = conv(x), result.module(x)
    assert float((y - y_hat).norm() / y.norm()) == pytest.approx(result.error_after, rel=1e-6)


def test_refine_by_gradient_never_worse_than_the_start():
    x = _structured(100, 12, 3, seed=8)
    dense = _linear(torch.randn(6, 12, dtype=F64))
    st = layer_stats(dense, x)
    low = nn.Sequential(nn.Linear(12, 2, bias=False), nn.Linear(2, 6, bias=False)).double()
    a, b = whitened_lowrank(dense.weight.detach(), st, 2)
    with torch.no_grad():
        low[0].weight.copy_(b)
        low[1].weight.copy_(a)
    before = objective(dense.weight, dense_weight(low).detach(), st, damping=1e-4)
    value = refine_by_gradient(low, dense_weight, dense.weight, st, steps=5)
    after = objective(dense.weight, dense_weight(low).detach(), st, damping=1e-4)
    assert after <= before * (1 + 1e-12)
    assert value * float(((dense.weight @ (st.dense_gram[0] + 0)) * dense.weight).sum()) >= 0


def test_bad_arguments():
    st = layer_stats(nn.Linear(4, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="rank"):
        whitened_lowrank(torch.randn(3, 4), st, 0)
    with pytest.raises(ValueError, match="weight"):
        output_error(torch.randn(3, 5), torch.randn(3, 5), st)
    with pytest.raises(ValueError, match="damping"):
        objective(torch.randn(3, 4), torch.randn(3, 4), st, damping=-1.0)
    with pytest.raises(TypeError, match="stats"):
        output_error(torch.randn(3, 4), torch.randn(3, 4), "stats")  # type: ignore[arg-type]
    assert isinstance(st, LayerStats)
