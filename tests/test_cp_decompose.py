"""CP-ALS of conv kernels (ttcompress.decompose.cp): recovery, monotonicity, counts, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from ttcompress.decompose import cp as cpmod
from ttcompress.decompose.cp import (
    CPDecomposition,
    cp_als,
    cp_param_count,
    cp_rank_for_ratio,
    cp_reconstruct,
)


def _rank_r_kernel(
    shape: tuple[int, int, int, int], rank: int, seed: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return cp_reconstruct(
        [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    )


def _trained_like(shape: tuple[int, int, int, int], seed: int = 0) -> torch.Tensor:
    """Kernel with the decaying spectra of trained filters: rotated power-law core + noise."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*shape, generator=g, dtype=torch.float64)
    for mode, n in enumerate(shape):
        decay = (torch.arange(n, dtype=torch.float64) + 1) ** -0.7
        view = [1, 1, 1, 1]
        view[mode] = n
        core = core * decay.reshape(view)
    for mode, n in enumerate(shape):
        q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
        core = torch.movedim(torch.tensordot(q, core, dims=([1], [mode])), 0, mode)
    noise = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (core + 0.05 * core.std() * noise).float()


# ------------------------------------------------------------------ recovery and quality


@pytest.mark.parametrize(
    ("shape", "rank"),
    [
        ((8, 6, 3, 3), 4),
        ((8, 6, 3, 3), 7),
        ((5, 1, 3, 5), 3),
        ((6, 4, 1, 1), 4),
        ((6, 5, 2, 3), 5),
    ],
)
def test_rank_r_kernel_recovered_at_rank_r(
    shape: tuple[int, int, int, int], rank: int
) -> None:
    kernel = _rank_r_kernel(shape, rank, seed=rank)
    res = cp_als(kernel, rank=rank, n_iter_max=2000, tol=1e-13)
    assert isinstance(res, CPDecomposition)
    assert res.rel_error <= 1e-4
    # the reported error is the true one
    true = float((res.to_tensor() - kernel).norm() / kernel.norm())
    assert true == pytest.approx(res.rel_error, abs=1e-9)
    assert [tuple(f.shape) for f in res.factors] == [(n, rank) for n in shape]


def test_error_does_not_increase_with_rank_on_trained_kernel() -> None:
    kernel = _trained_like((16, 16, 3, 3))
    errors = [cp_als(kernel, rank=r, n_iter_max=150).rel_error for r in (1, 4, 16, 48)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.5 * errors[0]


def test_result_dtype_device_and_balance() -> None:
    kernel = _trained_like((6, 5, 3, 3))
    res = cp_als(kernel, rank=3, n_iter_max=50)
    assert all(
        f.dtype == torch.float32 and f.device == kernel.device for f in res.factors
    )
    norms = torch.stack([f.double().norm(dim=0) for f in res.factors])
    assert torch.allclose(
        norms, norms[:1].expand_as(norms), rtol=1e-4
    )  # weights spread evenly
    res64 = cp_als(kernel.double(), rank=3, n_iter_max=50)
    assert res64.factors[0].dtype == torch.float64
    assert 0.0 <= res.rel_error < 1.0 and 1 <= res.n_iter <= 50


def test_seed_makes_it_reproducible_and_restarts_keep_the_best() -> None:
    kernel = _trained_like((10, 8, 3, 3), seed=1)
    a = cp_als(kernel, rank=5, n_iter_max=30, init="random", seed=3)
    b = cp_als(kernel, rank=5, n_iter_max=30, init="random", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    assert a.rel_error == b.rel_error and a.n_iter == b.n_iter
    c = cp_als(kernel, rank=5, n_iter_max=30, init="random", seed=4)
    assert not torch.equal(a.factors[0], c.factors[0])
    best = cp_als(kernel, rank=5, n_iter_max=30, init="random", seed=3, n_restarts=3)
    assert best.rel_error <= a.rel_error


@pytest.mark.parametrize("init", ["auto", "svd", "random"])
def test_every_init_works_also_above_mode_sizes(init: str) -> None:
    kernel = _trained_like((6, 4, 3, 3))
    res = cp_als(kernel, rank=8, init=init, n_iter_max=200)  # rank > C_in, kh, kw
    assert res.rel_error < 0.2


def test_zero_kernel() -> None:
    res = cp_als(torch.zeros(3, 2, 3, 3), rank=2)
    assert res.rel_error == 0.0 and res.n_iter == 0
    assert all(float(f.abs().sum()) == 0.0 for f in res.factors)


# ------------------------------------------------------------------ degenerate runs warn


def test_diverging_components_warn_with_layer_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # border-rank-2 tensor of rank 4 (de Silva & Lim 2008): the best rank-2 fit does not
    # exist and ALS drives two terms to grow and cancel. 50 iterations reach terms ~1.6x the
    # tensor; lower the threshold so that the test does not have to wait for 10x.
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4, 1, generator=g, dtype=torch.float64) for _ in range(2))
    tensor = sum(
        cp_reconstruct([b if i == j else a for i in range(4)]) for j in range(4)
    )
    monkeypatch.setattr(cpmod, "DIVERGENCE_RATIO", 1.2)
    with pytest.warns(UserWarning, match=r"layer 'features\.3'.*degenerate"):
        cp_als(tensor, rank=2, n_iter_max=50, tol=0, name="features.3")


def test_stalled_run_warns() -> None:
    kernel = torch.randn(8, 6, 1, 1, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"layer 'fc'.*stalled"):
        cp_als(kernel, rank=3, n_iter_max=1, init="random", name="fc")


def test_healthy_run_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cp_als(_trained_like((8, 8, 3, 3)), rank=6, n_iter_max=100, name="ok")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -2}, ValueError, "rank"),
        ({"rank": 1.5}, TypeError, "rank"),
        ({"rank": True}, TypeError, "rank"),
        ({"rank": 2, "n_iter_max": 0}, ValueError, "n_iter_max"),
        ({"rank": 2, "tol": -1.0}, ValueError, "tol"),
        ({"rank": 2, "init": "nope"}, ValueError, "init"),
        ({"rank": 2, "n_restarts": 0}, ValueError, "n_restarts"),
        ({"rank": 2, "seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        cp_als(torch.randn(3, 2, 3, 3), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_kernel_rejected_with_name(bad: float) -> None:
    kernel = torch.randn(3, 2, 3, 3)
    kernel[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"layer 'conv1'.*NaN or Inf"):
        cp_als(kernel, rank=2, name="conv1")


def test_bad_kernel_type_and_shape() -> None:
    with pytest.raises(TypeError, match="kernel"):
        cp_als([[1.0]], rank=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4-D"):
        cp_als(torch.randn(3, 3, 3), rank=1)


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    ("c_out", "c_in", "kh", "kw", "rank", "groups"),
    [
        (64, 64, 3, 3, 16, 1),
        (10, 1, 3, 3, 3, 1),
        (32, 8, 3, 5, 4, 4),
        (16, 16, 1, 1, 7, 1),
    ],
)
def test_param_count_formula(
    c_out: int, c_in: int, kh: int, kw: int, rank: int, groups: int
) -> None:
    count = cp_param_count(c_out, c_in, kh, kw, rank, groups)
    assert count == groups * rank * (c_in + kh + kw + c_out // groups)
    if groups == 1:
        assert count == rank * (c_in + kh + kw + c_out)
    assert cp_param_count(c_out, c_in, kh, kw, rank, groups, bias=True) == count + c_out


@pytest.mark.parametrize("ratio", [1.0, 2.0, 4.0, 8.0, 16.0, 7.7])
@pytest.mark.parametrize("bias", [False, True])
def test_rank_for_ratio_is_the_largest_rank_reaching_it(
    ratio: float, bias: bool
) -> None:
    c_out, c_in, kh, kw = 256, 256, 3, 3
    dense = c_out * c_in * kh * kw + (c_out if bias else 0)
    rank = cp_rank_for_ratio(c_out, c_in, kh, kw, ratio, bias=bias)
    assert rank >= 1
    assert dense / cp_param_count(c_out, c_in, kh, kw, rank, bias=bias) >= ratio
    assert dense / cp_param_count(c_out, c_in, kh, kw, rank + 1, bias=bias) < ratio


def test_rank_for_ratio_zero_when_unreachable_and_bad_ratio() -> None:
    assert cp_rank_for_ratio(2, 1, 1, 1, 2.0) == 0  # a 1x1 conv 1->2 cannot shrink
    with pytest.raises(ValueError, match="ratio"):
        cp_rank_for_ratio(8, 8, 3, 3, 0.0)
    with pytest.raises(ValueError, match="groups"):
        cp_param_count(10, 2, 3, 3, 2, groups=3)


def test_paper_mnist_compression_numbers() -> None:
    # Lebedev et al. 2015, MNIST net: conv 1->10 and conv 10->10, 3x3. The ratio counts conv
    # WEIGHTS ONLY (no biases), both convs together: (90 + 900) / (R*17 + R*26).
    dense = 10 * 1 * 3 * 3 + 10 * 10 * 3 * 3
    expected = {3: 7.7, 6: 3.8, 9: 2.6}
    for rank, ratio in expected.items():
        cp = cp_param_count(10, 1, 3, 3, rank) + cp_param_count(10, 10, 3, 3, rank)
        assert round(dense / cp, 1) == ratio


# ---------------------------------------------------------------------------- stopping, progress, batches
@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_stops_at_first_relative_improvement_below_tol(tol: float) -> None:
    from ttcompress.decompose.cp import CPProgress

    kernel = torch.randn(32, 24, 3, 3, generator=torch.Generator().manual_seed(3))
    log: list[CPProgress] = []
    res = cp_als(kernel, rank=20, n_iter_max=500, tol=tol, progress=log.append)
    assert [p.iteration for p in log] == list(range(res.n_iter + 1))
    assert all(p.n_iter_max == 500 and p.restart == 0 and p.n_restarts == 1 for p in log)
    improvements = [p.improvement for p in log[1:]]
    for prev, p in itertools.pairwise(log):
        assert p.improvement == pytest.approx((prev.rel_error - p.rel_error) / prev.rel_error)
    assert all(i >= tol for i in improvements[:-1]) and improvements[-1] < tol
    assert res.n_iter < 500
    assert res.rel_error == pytest.approx(log[-1].rel_error, rel=1e-6)


def test_cp_als_many_matches_cp_als_in_order_serial_and_in_workers() -> None:
    from ttcompress.decompose.cp_batch import cp_als_many

    g = torch.Generator().manual_seed(4)
    jobs = [(torch.randn(16, 8, 3, 3, generator=g), 5), (torch.randn(24, 16, 1, 1, generator=g), 3),
            (torch.randn(8, 8, 3, 1, generator=g), 4)]
    expected = [cp_als(k, rank=r, n_iter_max=30) for k, r in jobs]
    done: list[int] = []
    for workers in (1, 2):
        results = cp_als_many(jobs, workers=workers, n_iter_max=30, on_done=lambda i, *_: done.append(i))
        for (res, seconds), exp in zip(results, expected):
            assert seconds >= 0 and res.rank == exp.rank and res.n_iter == exp.n_iter
            assert res.rel_error == pytest.approx(exp.rel_error, rel=1e-9)
            for a, b in zip(res.factors, exp.factors):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sorted(done) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="workers"):
        cp_als_many(jobs, workers=0)


# ------------------------------------------------------------------ warm start and progress context


def test_warm_start_continues_the_same_als_iterates() -> None:
    kernel = _trained_like((10, 8, 3, 3)).double()
    whole = cp_als(kernel, rank=6, n_iter_max=25, tol=0)
    first = cp_als(kernel, rank=6, n_iter_max=10, tol=0)
    rest = cp_als(kernel, rank=6, n_iter_max=15, tol=0, init=first)
    assert rest.n_iter == 15
    assert rest.rel_error <= first.rel_error
    assert rest.rel_error == pytest.approx(whole.rel_error, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(rest.to_tensor(), whole.to_tensor(), rtol=1e-7, atol=1e-9)


def test_warm_start_must_match_the_kernel() -> None:
    kernel = torch.randn(6, 4, 3, 3)
    start = cp_als(kernel, rank=3, n_iter_max=2)
    with pytest.raises(ValueError, match="init"):
        cp_als(kernel, rank=4, init=start)
    with pytest.raises(ValueError, match="init"):
        cp_als(torch.randn(6, 5, 3, 3), rank=3, init=start)


def test_cp_progress_reaches_calls_below_and_is_restored() -> None:
    kernel = torch.randn(6, 4, 3, 3)
    seen: list[cpmod.CPProgress] = []
    mine: list[cpmod.CPProgress] = []
    with cpmod.cp_progress(seen.append):
        cp_als(kernel, rank=3, n_iter_max=4, tol=0)
        cp_als(kernel, rank=3, n_iter_max=2, tol=0, progress=mine.append)  # an explicit callback wins
        with cpmod.cp_progress(None):
            cp_als(kernel, rank=3, n_iter_max=3, tol=0)
    cp_als(kernel, rank=3, n_iter_max=3, tol=0)
    assert [p.iteration for p in seen] == [0, 1, 2, 3, 4]
    assert [p.iteration for p in mine] == [0, 1, 2]


def test_svd_start_of_a_tall_unfolding_uses_the_small_gram_with_the_same_subspace() -> None:
    from ttcompress.decompose.cp_lean import svd_start

    kernel = _trained_like((40, 6, 1, 1)).double()  # mode 0 is tall: 40 x 6
    factors = svd_start(kernel, 4, seed=0)
    u, s, _ = torch.linalg.svd(kernel.reshape(40, 6), full_matrices=False)
    torch.testing.assert_close(factors[0].abs(), (u[:, :4] * s[:4]).abs(), rtol=1e-8, atol=1e-10)
    # above the unfolding's rank (6) the extra columns are noise, not arbitrary null-space vectors
    wide = svd_start(kernel, 9, seed=0)[0]
    assert wide.shape == (40, 9) and bool(torch.isfinite(wide).all())
    torch.testing.assert_close(wide[:, :6].abs(), (u * s).abs(), rtol=1e-8, atol=1e-10)
