"""Sketched calibration statistics (Frequent Directions) against the exact Grams, and the memory budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttcompress.calibration.budget import MIN_CALIB_MEMORY, check_calib_memory, parse_memory
from ttcompress.calibration.collector import StatsCollector, sketch_rows_for
from ttcompress.calibration.fit import corrected_bias, fit_layer, output_error, whitened_lowrank
from ttcompress.calibration.sequential import calibrate_sequentially
from ttcompress.calibration.stats import FrequentDirections, layer_stats
from ttcompress.layers import CPConv2d, TTLinear


def _structured(n: int, k: int, rank: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """Rows of rank ``rank`` with a decaying spectrum, plus isotropic noise and an offset (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, k, generator=gen)
    scales = torch.linspace(3.0, 0.3, rank)
    return (torch.randn(n, rank, generator=gen) * scales) @ basis + noise * torch.randn(n, k, generator=gen) + 0.3


def test_frequent_directions_exact_below_capacity_and_bounded_above():
    a = _structured(300, 40, 6, seed=0).double()
    fd = FrequentDirections(1, 40, 200, dtype=torch.float64)
    fd.add(a[None])
    assert fd.exact
    torch.testing.assert_close(fd.result()[0].T @ fd.result()[0], a.T @ a)
    for ell in (8, 16):
        fd = FrequentDirections(1, 40, ell, dtype=torch.float64)
        for chunk in a.split(37):
            fd.add(chunk[None])
        b = fd.result()[0]
        assert b.shape[0] == ell and not fd.exact
        gap = torch.linalg.eigvalsh(a.T @ a - b.T @ b)
        assert float(gap.min()) > -1e-8 * float(gap.max())  # A^T A - B^T B is PSD
        s = torch.linalg.svdvals(a)
        for r in range(ell):  # ||A^T A - B^T B||_2 <= ||A - A_r||_F^2 / (l - r)
            assert float(gap.max()) <= float((s[r:] ** 2).sum()) / (ell - r) * (1 + 1e-9)


def test_sketched_centering_matches_exact_when_rows_fit():
    lin = nn.Linear(12, 5)
    x = _structured(30, 12, 4, seed=1)
    xt = x + 0.01 * torch.randn(30, 12, generator=torch.Generator().manual_seed(2))
    exact = layer_stats(lin, xt, dense_inputs=x).centered()
    sk = layer_stats(lin, xt, dense_inputs=x, sketch_rows=64).centered()
    rd, rc = sk.factors(0)
    for got, want in ((rc.T @ rc, exact.gram[0]), (rd.T @ rc, exact.cross[0]), (rd.T @ rd, exact.dense_gram[0])):
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("rank", [4, 16, 40])
def test_sketched_whitened_svd_within_two_percent_of_exact(rank):
    """Sketch s=64 of 3000 rows of length 2*192: the fit's true output error within 2 % of the exact fit's."""
    k, out = 192, 96
    x = _structured(3000, k, 24, seed=3)
    xt = x + 0.02 * torch.randn(3000, k, generator=torch.Generator().manual_seed(4))
    lin = nn.Linear(k, out)
    w, b = lin.weight.detach(), lin.bias.detach()
    exact = layer_stats(lin, xt, dense_inputs=x)
    sk = layer_stats(lin, xt, dense_inputs=x, sketch_rows=64)
    assert sk.sketched and not sk.exact and sk.rows.shape[1] == 64
    errors = []
    for st in (exact, sk):
        a, bb = whitened_lowrank(w, st.centered(), rank)
        errors.append(output_error(w, a @ bb, exact, bias=b, new_bias=corrected_bias(w, b, a @ bb, st)))
    assert errors[1] <= 1.02 * errors[0] + 1e-6, errors


def test_sketched_tt_als_and_cp_gradient_within_two_percent_of_exact():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = _structured(2000, 64, 12, seed=5)
    exact = layer_stats(lin, x)
    sk = layer_stats(lin, x, sketch_rows=32)
    fits = [fit_layer(lin, TTLinear.from_linear(lin, in_modes=(8, 8), out_modes=(6, 8), ranks=4), st)
            for st in (exact, sk)]
    true = [output_error(lin.weight, _dense(f.module), exact, bias=lin.bias, new_bias=f.module.bias) for f in fits]
    assert fits[1].method == "tt-als" and true[1] <= 1.02 * true[0] + 1e-6, true
    conv = nn.Conv2d(6, 8, 3, padding=1)
    imgs = _structured(40, 6 * 8 * 8, 5, seed=6).reshape(40, 6, 8, 8)
    exact = layer_stats(conv, imgs)
    sk = layer_stats(conv, imgs, sketch_rows=64)  # 2,560 patch rows of length 54: shrunk in float32
    assert not sk.exact
    fits = []
    for st in (exact, sk):
        torch.manual_seed(1)
        fits.append(fit_layer(conv, CPConv2d.from_conv(conv, rank=6), st, steps=30))
    true = [output_error(conv.weight.reshape(8, -1), _dense(f.module), exact, bias=conv.bias,
                         new_bias=f.module.bias if hasattr(f.module, "bias") else None) for f in fits]
    assert fits[1].method == "gradient" and true[1] <= 1.02 * true[0] + 1e-6, true


def _dense(layer: nn.Module) -> torch.Tensor:
    from ttcompress.calibration.reconstruct import dense_weight
    return dense_weight(layer).detach()


def test_memory_budget_parsing_and_minimum():
    assert parse_memory("64M") == 64 * 2**20 and parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory(4096) == 4096 and parse_memory("2GiB") == 2 * 2**30
    for bad in ("abc", "-1G", "4X", True):
        with pytest.raises(ValueError, match="calib_memory"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="below the minimum"):
        check_calib_memory("1M")
    assert check_calib_memory(None) >= MIN_CALIB_MEMORY


def test_collector_chooses_exact_sketch_or_none_by_budget():
    coll = StatsCollector([torch.randn(2, 8)], memory="64M")
    assert coll.choose(nn.Linear(256, 64)).kind == "exact"
    wide = coll.choose(nn.Linear(8192, 64))
    assert wide.kind == "sketch" and wide.rows == sketch_rows_for(None) // 2 and wide.bytes <= 64 * 2**20
    assert "sketched, s=" in wide.note
    huge = coll.choose(nn.Conv2d(1024, 128, (64, 1)))  # K = 65,536: 103 GB of exact Grams
    assert huge.kind == "none" and "> budget 67 MB: fitted data-free" in huge.note


def test_wide_conv_over_budget_is_fitted_data_free_with_a_note():
    """A K = 65,536 conv on a tiny input under a 64 MB budget: no statistics, built data-free, noted."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1024, 128, (64, 1)))
    work = nn.Sequential(nn.Conv2d(1024, 128, (64, 1)))
    work.load_state_dict(dense.state_dict())
    seen = {}

    def build(name, layer, stats):
        seen[name] = stats
        return nn.Conv2d(1024, 128, (64, 1))

    coll = StatsCollector([torch.randn(2, 1024, 64, 1)], memory="64M")
    done = calibrate_sequentially(dense, work, ["0"], build, None, collector=coll)
    assert seen["0"] is None
    assert done["0"].statistics.endswith("fitted data-free") and done["0"].error_after is None


def test_compress_reports_sketched_layer_and_stays_close_to_exact():
    from ttcompress.compression.plan import Plan
    from ttcompress.compression.pipeline import compress_with_report

    torch.manual_seed(0)
    x = _structured(512, 2048, 20, seed=7)  # 512 rows: a 256-row sketch keeps them all (exact)
    results = {}
    for memory in ("16M", "4G"):
        model = nn.Sequential(nn.Linear(2048, 32), nn.ReLU(), nn.Linear(32, 4))
        torch.manual_seed(0)
        model.load_state_dict(nn.Sequential(nn.Linear(2048, 32), nn.ReLU(), nn.Linear(32, 4)).state_dict())
        plan = Plan(formats=("svd",), settings=(("svd", {"rank": 6}),), layers=("0",), min_saving=0)
        results[memory] = compress_with_report(model, plan, calib_data=x, calib_memory=memory).records[0]
    sk, ex = results["16M"], results["4G"]
    assert sk.note == "statistics sketched, s=128" and ex.note == "statistics sketched, s=256"
    assert sk.fit_method == "whitened-svd" and sk.out_error_after <= 1.02 * ex.out_error_after + 1e-6


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2), groups=2),
    nn.Conv2d(3, 5, (5, 1), padding="same", padding_mode="reflect"),
    nn.Conv2d(4, 4, 3, stride=2),
])
def test_input_rows_of_kept_positions_match_the_unfolded_rows(conv):
    """The gathered patches (every position, or the kept ones) are exactly ``F.unfold``'s rows."""
    from torch.nn import functional as F

    from ttcompress.calibration.stats import _conv_padding, input_rows

    x = torch.randn(3, conv.in_channels, 11, 9, generator=torch.Generator().manual_seed(0))
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    cols = F.unfold(F.pad(x, _conv_padding(conv), mode=mode), conv.kernel_size, dilation=conv.dilation,
                    stride=conv.stride)  # (N, C*kh*kw, L)
    g, k = conv.groups, cols.shape[1] // conv.groups
    full = cols.reshape(3, g, k, -1).permute(1, 0, 3, 2).reshape(g, -1, k)  # (groups, N * L, K)
    assert torch.equal(input_rows(conv, x), full)
    per = full.shape[1] // 3
    pos = torch.tensor([0, 2, 5, per - 1])
    want = full.reshape(full.shape[0], 3, per, -1)[:, :, pos].reshape(full.shape[0], -1, full.shape[-1])
    assert torch.equal(input_rows(conv, x, positions=pos), want)


def test_layer_statistics_stop_the_forward_pass_at_the_layer_after_the_first_batch():
    """Later batches run each model only up to the layer; the statistics are those of all batches."""
    calls = []

    class Count(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), Count())
    work = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), Count())
    work.load_state_dict(dense.state_dict())
    batches = list(torch.randn(12, 6, generator=torch.Generator().manual_seed(1)).split(4))
    stats, _choice = StatsCollector(batches).layer_stats(dense, work, "2")
    assert len(calls) == 2  # batch 0 only, once per model
    want = layer_stats(dense[2], torch.relu(dense[0](torch.cat(batches))))
    torch.testing.assert_close(stats.gram, want.gram)
    calls.clear()
    StatsCollector(batches).input_stats(dense, ["0", "2"])
    assert len(calls) == 1


def test_mixed_rows_keep_means_trace_exact_and_the_gram_close():
    """``max_rows``: 4,000 rows mixed 4 to 1 before a sketch that keeps them all; means, count and
    trace exact, the Gram an unbiased estimate (close for structured rows)."""
    lin = nn.Linear(16, 3)
    x = _structured(4000, 16, 4, seed=8)
    exact = layer_stats(lin, x)
    mixed = layer_stats(lin, x, sketch_rows=1000, max_rows=1000)
    assert mixed.rows.shape[1] == 1000 and not mixed.exact
    torch.testing.assert_close(mixed.mean, exact.mean)
    torch.testing.assert_close(mixed.trace, torch.diagonal(exact.gram[0]).sum()[None])
    rd, rc = mixed.factors(0)
    gram = rc.T @ rc
    assert float(torch.linalg.matrix_norm(gram - exact.gram[0]) / torch.linalg.matrix_norm(exact.gram[0])) < 0.1


def test_sketch_of_identical_inputs_is_half_width_and_widens_when_they_differ():
    """Same inputs in both models: X alone is sketched and given back as [R | R]; a later batch
    that differs widens the sketch (no shrink here: the rows themselves)."""
    from ttcompress.calibration.stats import SketchAccumulator

    lin = nn.Linear(5, 2)
    gen = torch.Generator().manual_seed(0)
    a, b, bt = (torch.randn(4, 5, generator=gen) for _ in range(3))
    acc = SketchAccumulator(lin, rows=16)
    acc.update(a, a.clone())
    assert acc._fd.buffer.shape[-1] == 5
    torch.testing.assert_close(acc.finalize().rows[0], torch.cat([a, a], dim=1))
    acc.update(b, bt)
    want = torch.cat([torch.cat([a, a], dim=1), torch.cat([b, bt], dim=1)])
    torch.testing.assert_close(acc.finalize().rows[0], want)


def test_exact_statistics_from_float32_rows_match_a_float64_reference():
    """Exact Grams take each chunk's products in float32 (accumulated in float64): against the
    Grams of the same rows in float64, relative error <= 1e-5 (Frobenius), means to 1e-6, and the
    whitened fit's output error to 1e-4 relative."""
    conv = nn.Conv2d(8, 6, (7, 1), padding=(3, 0))
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 8, 32, 1, generator=gen) + 0.5).relu() * 3.0
    x_t = x + 0.1 * torch.randn(x.shape, generator=gen)
    got = layer_stats(conv, x_t, dense_inputs=x, max_positions=32)
    want = layer_stats(conv.double(), x_t.double(), dense_inputs=x.double(), max_positions=32)
    for a, b in ((got.gram, want.gram), (got.cross, want.cross), (got.dense_gram, want.dense_gram)):
        assert a.dtype == torch.float64
        assert float((a - b).norm() / b.norm()) <= 1e-5
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.dense_mean, want.dense_mean, rtol=1e-6, atol=1e-6)
    w = conv.weight.detach().double().reshape(6, -1)
    e = [output_error(w, (lambda ab: ab[0] @ ab[1])(whitened_lowrank(w, s, 3)), s) for s in (got, want)]
    assert abs(e[0] - e[1]) <= 1e-4 * e[1]
