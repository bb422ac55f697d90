"""CP-ALS sweeps with cached Grams (ttcompress.decompose.cp_sweeps, issue 25).

Reference: TensorLy's ``parafac`` (the loop ``cp_als`` ran before), float64, same start.
"""

from __future__ import annotations

import pytest
import torch

from ttcompress.decompose.cp import cp_als, cp_reconstruct
from ttcompress.decompose.cp_lean import svd_start
from ttcompress.decompose.cp_sweeps import als_sweeps


def _parafac(kernel: torch.Tensor, start: list[torch.Tensor], n_iter: int) -> tuple[list[torch.Tensor], list[float]]:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    errors: list[float] = []
    with tl.backend_context("pytorch"):
        (_w, factors), _ = parafac(kernel, start[0].shape[1], n_iter_max=n_iter, init=tl.cp_tensor.CPTensor((None, start)),
                                   tol=0.0, normalize_factors=False, return_errors=True,
                                   callback=lambda _cp, e: errors.append(float(e)) and False)
    return list(factors), errors


@pytest.mark.parametrize(("shape", "rank"), [((8, 6, 3, 3), 5), ((12, 20, 5, 1), 30), ((6, 4, 1, 1), 3)])
def test_sweeps_follow_tensorly_parafac(shape, rank):
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(*shape, generator=g, dtype=torch.float64)
    kernel = kernel / kernel.norm()
    start = svd_start(kernel, rank, seed=0)
    ref, ref_errors = _parafac(kernel, [f.clone() for f in start], 12)
    errors: list[float] = []
    got, sweeps, final = als_sweeps(kernel, start, 12, lambda _i, e: errors.append(e) and False)
    assert sweeps == 12
    for a, b in zip(got, ref):  # same iterates, to rounding (Cholesky instead of LU)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # the same errors, and every error is the true one of its factors (checked for the last, densely)
    assert errors == pytest.approx(ref_errors, rel=1e-9, abs=1e-12)
    true = float((cp_reconstruct(got) - kernel).norm())
    assert errors[-1] == pytest.approx(true, rel=1e-9) and final == pytest.approx(true, rel=1e-9)


def test_small_errors_are_measured_on_the_reconstruction():
    g = torch.Generator().manual_seed(1)
    exact = cp_reconstruct([torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 3, 3)])
    fit = cp_als(exact, rank=3, n_iter_max=200, tol=0.0, init="svd")
    true = float((fit.to_tensor() - exact).norm() / exact.norm())
    assert fit.rel_error < 1e-6
    assert fit.rel_error == pytest.approx(true, rel=1e-6, abs=1e-12)  # no cancellation noise of ~1e-8


def test_cp_error_curve_is_reused_while_the_weight_is_unchanged():
    from ttcompress.formats import cp as cp_format

    w = torch.randn(8, 6, 3, 3)
    first = cp_format.cp_error_curve(w, 20)
    assert cp_format.cp_error_curve(w, 12) == first[:12]  # served from the cache
    assert cp_format._error_curve(w, 20) == first
    with torch.no_grad():
        w.mul_(0.5).add_(torch.randn(8, 6, 3, 3))  # changed in place: computed again
    assert cp_format.cp_error_curve(w, 20) == cp_format._error_curve(w, 20) != first


def test_solve_into_the_runs_buffers_matches_a_float64_solve():
    from ttcompress.decompose.cp_sweeps import _solve

    g = torch.Generator().manual_seed(2)
    operands: dict = {}
    results = []
    for mode in (0, 1, 0):  # mode 0's buffer is rewritten by its next update only
        a = torch.randn(40, 12, generator=g, dtype=torch.float64)
        v = a.T @ a
        m = torch.randn(7, 12, generator=g, dtype=torch.float64)
        got = _solve(v, m, operands, mode)
        torch.testing.assert_close(got, torch.linalg.solve(v, m.T).T, rtol=1e-10, atol=1e-12)
        results.append((mode, got.clone(), got))
    assert torch.equal(results[1][1], results[1][2])  # mode 1's result survived mode 0's update
    # not positive definite: the LU fallback, same answer
    v = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    m = torch.ones(5, 3, dtype=torch.float64)
    torch.testing.assert_close(_solve(v, m, operands, 2), torch.linalg.solve(v, m.T).T, rtol=1e-12, atol=0)


def test_steady_sweeps_reuse_their_buffers(monkeypatch):
    # the run's large temporaries are allocated once: a later sweep adds no buffer
    from ttcompress.decompose import cp_sweeps

    g = torch.Generator().manual_seed(3)
    kernel = torch.randn(10, 12, 5, 1, generator=g, dtype=torch.float64)
    kernel = kernel / kernel.norm()
    start = svd_start(kernel, 8, seed=0)
    seen: list[int] = []
    real = cp_sweeps.scratch

    def counting(cache, tag, shape, dtype, device):
        before = len(cache) if cache is not None else 0
        out = real(cache, tag, shape, dtype, device)
        seen.append(len(cache) - before if cache is not None else 1)
        return out

    import ttcompress.decompose.cp_lean as cp_lean

    monkeypatch.setattr(cp_sweeps, "scratch", counting)
    monkeypatch.setattr(cp_lean, "scratch", counting)
    per_sweep: list[int] = []
    cp_sweeps.als_sweeps(kernel, start, 4, lambda i, _e: per_sweep.append(sum(seen)) and False)
    assert per_sweep[2] == per_sweep[3] == per_sweep[4]  # sweeps 2-4 allocated nothing new
