"""Dry-run weight errors match the real (data-free) run: the contract of ``decompose --dry-run``.

A small CNN and an MLP, every format: each compressed layer's previewed error is within 0.05 of the
error the real run measures (and, at these sizes, exact: the same computation); ``auto`` previews the
format the real run picks. Over the budget, errors are bounds or estimates, labelled as such.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ttcompress.compression.dryrun import preview_plan
from ttcompress.formats.cp import cp_error_curve
from ttcompress.compression.plan import Plan
from ttcompress.compression.pipeline import compress_with_report

TOL = 0.05


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(24, 32, 1), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


FORMATS = ["tt", "cp", "svd", "tucker2", "auto"]


def _real(model: nn.Module, plan: Plan) -> dict[str, tuple[str, float]]:
    done = compress_with_report(model, plan)
    return {r.name: (r.format, r.rel_error) for r in done.records if r.format != "dense"}


@pytest.mark.parametrize("make", [small_cnn, mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dry_run_errors_match_the_real_run(make, fmt: str) -> None:
    plan = Plan(formats=(fmt,), others="dense")
    preview = preview_plan(make(), plan)
    real = _real(make(), plan)
    shown = {lp.decision.name: lp for lp in preview.layers if lp.decision.format != "dense"}
    assert set(shown) == set(real)
    done = compress_with_report(make(), plan)
    assert preview.params_after == done.params_after  # projected parameters are the real run's
    if make is mlp and fmt in ("cp", "tucker2"):
        assert not real  # nothing for a conv format to compress in an MLP
        return
    assert real, "the plan compresses something"
    for name, (real_fmt, real_err) in real.items():
        lp = shown[name]
        assert lp.format == real_fmt, (name, lp.format, real_fmt)  # auto shows the format it picks
        assert lp.error_kind == "exact"  # small layers: decomposed and measured
        assert abs(lp.est_error - real_err) <= TOL, (name, lp.est_error, real_err)
        assert lp.est_error <= 1.0 + 1e-9


@pytest.mark.parametrize("fmt", ["tt", "cp", "tucker2", "auto"])
def test_over_budget_errors_are_labelled_and_honest(fmt: str) -> None:
    """With no decomposition budget nothing is decomposed (SVD's error is exact from the spectrum): a bound stays above the real error and at
    most 1; CP's estimate stays near it; every value is labelled as what it is."""
    model = small_cnn if fmt in ("cp", "tucker2") else mlp
    plan = Plan(formats=(fmt,), others="dense")
    preview = preview_plan(model(), plan, budget=0)
    real = _real(model(), plan)
    for lp in preview.layers:
        if lp.decision.format == "dense":
            continue
        real_fmt, real_err = real[lp.decision.name]
        assert lp.error_kind in ("upper bound", "estimate") or lp.format == "svd"  # svd: exact from its spectrum
        assert 0.0 <= lp.est_error <= 1.0
        if lp.error_kind == "upper bound" and lp.format == real_fmt:
            assert lp.est_error >= real_err - 1e-6, (lp.decision.name, lp.est_error, real_err)
        if lp.format == "cp" and real_fmt == "cp":
            assert abs(lp.est_error - real_err) <= 0.1, (lp.decision.name, lp.est_error, real_err)


def test_cp_error_curve_is_an_error_at_every_rank() -> None:
    """Above the channel counts the multilinear-rank bound is 0, yet a 4-way kernel is not exact there:
    the curve stays positive, non-increasing, at most 1, and near CP-ALS's error (its calibration holds
    Gaussian kernels to 0.074; this small one is among the worst)."""
    from ttcompress.decompose.cp import cp_als

    torch.manual_seed(0)
    w = torch.randn(16, 12, 3, 3)
    curve = cp_error_curve(w, 60)
    assert all(0.0 <= e <= 1.0 for e in curve)
    assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))
    assert curve[20 - 1] > 0.05  # rank 20 >= max(C_in, C_out) = 16
    for rank in (8, 20, 40):
        real = cp_als(w, rank=rank, tol=1e-3).rel_error
        assert abs(math.sqrt(curve[rank - 1]) - real) <= 0.08, (rank, math.sqrt(curve[rank - 1]), real)
    one_by_one = torch.randn(16, 12, 1, 1)  # a matrix: the estimate is the exact SVD tail
    s = torch.linalg.svdvals(one_by_one.reshape(16, 12).double())
    exact = float(s[5:].square().sum() / s.square().sum())
    assert cp_error_curve(one_by_one, 5)[-1] == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("settings", [{"tt": {"eps": 0.6}}, {"svd": {"eps": 0.6}}], ids=["tt-eps", "svd-eps"])
def test_error_bound_plans_project_the_built_parameters(settings) -> None:
    """Ranks set by an error bound are only known after decomposing: the dry run's exact preview
    gives them, so projected parameters and errors equal the real run's."""
    from ttcompress.formats import get_format

    (name, opts), = settings.items()
    fmt_settings = get_format(name).settings(**opts)
    if name == "tt":
        plan = Plan(formats=("tt",), others="dense", tt=fmt_settings)
    else:
        plan = Plan(formats=(name,), others="dense", settings=((name, fmt_settings),))
    preview = preview_plan(mlp(), plan)
    done = compress_with_report(mlp(), plan)
    assert preview.params_after == done.params_after < done.params_before
    real = {r.name: r.rel_error for r in done.compressed}
    for lp in preview.layers:
        if lp.decision.format != "dense":
            assert lp.error_kind == "exact" and lp.est_error == pytest.approx(real[lp.decision.name], abs=1e-6)
            assert lp.est_error <= 0.6 + 1e-9
