"""The compression-format registry and the formats on it: tt, cp, svd, tucker2, auto.

Contracts: every format is exact at full rank (float64, max abs error <= 1e-9 on outputs of
size ~1), every Conv2d attribute is preserved, every format round-trips through save/load, the
auto choice is deterministic and explained, a glob matching nothing is an error with
suggestions, and no module outside the format packages names a format or a layer class.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ttcompress
from ttcompress.cli import app
from ttcompress.decompose.svd import truncated_svd
from ttcompress.decompose.tucker2 import tucker2, tucker2_reconstruct
from ttcompress.formats import (
    LAYER_TYPES,
    CompressionFormat,
    format_names,
    format_of,
    formats_for,
    get_format,
    register_format,
)
from ttcompress.formats.auto import Trial, choose
from ttcompress.checkpoint.io import load, save
from ttcompress.layers import SVDLinear, Tucker2Conv2d
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import CPSettings, Plan, PatternError, Rule, plan_layers

TOL = 1e-9
FAST = {"n_iter_max": 3}


def _double(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return module.double()


# ---- registry ----------------------------------------------------------------------------------------
def test_registry_lists_every_format():
    assert format_names() == ("tt", "cp", "svd", "tucker2", "tt_embedding", "mha", "auto")
    assert dict(LAYER_TYPES) == {n: get_format(n).layer_class for n in ("tt", "cp", "svd", "tucker2", "tt_embedding",
                                                                        "mha")}
    assert [f.name for f in formats_for(nn.Embedding(4, 4))] == ["tt_embedding"]
    assert formats_for(nn.MultiheadAttention(4, 2)) == ()  # structural: applied by surgery, never planned
    assert dict(ttcompress.LAYER_TYPES) == dict(LAYER_TYPES)
    assert [f.name for f in formats_for(nn.Linear(4, 4))] == ["tt", "svd"]
    assert [f.name for f in formats_for(nn.Conv2d(4, 4, 3))] == ["cp", "tucker2"]
    assert formats_for(nn.ReLU()) == ()
    assert format_of(SVDLinear(4, 3, rank=2)).name == "svd"
    assert format_of(nn.Linear(2, 2)) is None


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown format 'bogus'; registered: tt, cp"):
        get_format("bogus")
    with pytest.raises(TypeError, match="CompressionFormat"):
        register_format(int)  # type: ignore[arg-type]

    class Clash(CompressionFormat):
        name = "tt"

    with pytest.raises(ValueError, match="already registered"):
        register_format(Clash)


# ---- exact at full rank --------------------------------------------------------------------------------
def _cp_rank2_conv() -> nn.Conv2d:
    conv = _double(nn.Conv2d(3, 4, 3, padding=1))
    f = [torch.randn(n, 2, dtype=torch.float64) for n in (4, 3, 3, 3)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,cr,yr,xr->ocyx", *f))
    return conv


FULL_RANK: dict[str, tuple[Any, dict[str, Any], tuple[int, ...]]] = {
    # format: (dense layer factory, build options at full rank, input shape)
    "tt": (lambda: _double(nn.Linear(12, 8)), {"ranks": 10**6, "in_modes": [4, 3], "out_modes": [2, 4]}, (5, 12)),
    "svd": (lambda: _double(nn.Linear(12, 8)), {"rank": 8}, (5, 12)),
    "tucker2": (lambda: _double(nn.Conv2d(5, 7, 3, padding=1)), {"in_rank": 5, "out_rank": 7}, (2, 5, 6, 6)),
    # CP-ALS is exact on a kernel of exact CP rank 2 (a generic kernel's CP rank is not known)
    "cp": (_cp_rank2_conv, {"rank": 2, "n_iter_max": 200, "tol": 1e-14}, (2, 3, 6, 6)),
}


@pytest.mark.parametrize("name", list(FULL_RANK))
def test_every_format_exact_at_full_rank(name):
    make, options, shape = FULL_RANK[name]
    dense = make()
    built = get_format(name).build(dense, options)
    layer = built.layer
    assert built.error == layer.rel_error and built.fit is None and built.note is None
    x = torch.randn(*shape, dtype=torch.float64)
    tol = 1e-6 if name == "cp" else TOL  # ALS converges to the exact factors only up to its tolerance
    assert (layer(x) - dense(x)).abs().max() <= tol
    assert layer.rel_error <= tol
    assert format_of(layer).name == name
    rebuilt = get_format(name).rebuild(json.loads(json.dumps(layer.config()))).double()
    rebuilt.load_state_dict(layer.state_dict())
    # float64; an eval-mode layer may pick another exact evaluation by timing: equal to rounding
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=1e-12, atol=1e-12)


def test_formats_set_for_every_registered_format():
    assert set(FULL_RANK) == {n for n in format_names() if get_format(n).layer_class is not None} - {"tt_embedding", "mha"}


def test_truncated_svd_error_is_eckart_young():
    torch.manual_seed(0)
    w = torch.randn(20, 30, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    low = truncated_svd(w, rank=5)
    assert low.rel_error == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-12)
    assert float((w - low.to_matrix()).norm() / w.norm()) == pytest.approx(low.rel_error, rel=1e-9)
    by_eps = truncated_svd(w, eps=0.5)
    assert by_eps.rel_error <= 0.5 and truncated_svd(w, rank=by_eps.rank - 1).rel_error > 0.5


def test_tucker2_hooi_not_worse_than_hosvd():
    torch.manual_seed(0)
    k = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    hosvd = tucker2(k, out_rank=5, in_rank=4, n_iter_max=0)
    hooi = tucker2(k, out_rank=5, in_rank=4, n_iter_max=10)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    direct = float((k - tucker2_reconstruct(hooi.core, hooi.out_factor, hooi.in_factor)).norm() / k.norm())
    assert direct == pytest.approx(hooi.rel_error, rel=1e-9)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (9, 9)], ids=["wide", "tall", "square"])
def test_tucker2_leading_vectors_span_the_svd_subspace(shape):
    """The Gram-matrix route for wide unfoldings gives the SVD's leading subspace (float64)."""
    from ttcompress.decompose.tucker2 import _leading

    torch.manual_seed(3)
    # singular values 1, 0.9, ..., 0.1 (-> gaps of 0.1), so the leading 5 are well separated
    m, n = shape
    q1 = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    k = min(m, n)
    mat = q1[:, :k] @ torch.diag(torch.linspace(1.0, 0.1, k, dtype=torch.float64)) @ q2[:, :k].T
    u = _leading(mat, 5)
    ref = torch.linalg.svd(mat, full_matrices=False)[0][:, :5]
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(u @ u.T, ref @ ref.T, rtol=0, atol=1e-10)  # same projector
    torch.testing.assert_close(u.abs(), ref.abs(), rtol=0, atol=1e-10)  # distinct values: same vectors up to sign


# ---- every Conv2d attribute is kept (Tucker-2) --------------------------------------------------------------
CONV_CONFIGS: dict[str, dict[str, Any]] = {
    "asym-stride-pad-dil": {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)},
    "same": {"kernel_size": 3, "padding": "same"},
    "same-even-dilated": {"kernel_size": (2, 4), "padding": "same", "dilation": (3, 2)},
    "valid": {"kernel_size": 3, "padding": "valid"},
    "no-bias": {"kernel_size": 3, "padding": 1, "bias": False},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "replicate": {"kernel_size": (3, 5), "padding": (1, 2), "padding_mode": "replicate"},
    "circular-same-even": {"kernel_size": (4, 3), "padding": "same", "padding_mode": "circular"},
    "1x1-stride": {"kernel_size": 1, "stride": 2},
    "groups-2": {"kernel_size": 3, "padding": 1, "groups": 2},
}


@pytest.mark.parametrize("config", list(CONV_CONFIGS))
def test_tucker2_keeps_every_conv_attribute(config):
    kwargs = dict(CONV_CONFIGS[config])
    conv = _double(nn.Conv2d(4, 6, **kwargs))
    layer = Tucker2Conv2d.from_conv(conv, in_rank=4, out_rank=6)
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        want = getattr(conv, attr)
        assert getattr(layer, attr) == (want if isinstance(want, (str, int)) else tuple(want)), attr
    assert (layer.bias is None) == (conv.bias is None)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    assert (layer(x) - conv(x)).abs().max() <= TOL
    assert (layer.to_conv()(x) - conv(x)).abs().max() <= TOL


def test_tucker2_refuses_depthwise_and_compresses_grouped_per_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, groups=8)
            self.grouped = nn.Conv2d(16, 32, 3, groups=2)

    dec = {d.name: d for d in plan_layers(Net(), Plan(formats=("tucker2",)))}
    assert dec["dw"].skipped == "depthwise conv: no channel mode to factor"
    assert dec["grouped"].format == "tucker2" and dec["grouped"].params_before / dec["grouped"].params_after >= 4


# ---- save / load round trip -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tt", "cp", "svd", "tucker2", "auto"])
def test_every_format_round_trips_through_save_load(tmp_path, fmt):
    model = build_arch("seed-cnn").eval()
    x = torch.randn(2, 1, 28, 28)
    plan = Plan(formats=(fmt,), cp=CPSettings(options=FAST))
    result = ttcompress.compress_with_report(model, plan)
    formats = {r.format for r in result.compressed}
    assert formats and (fmt == "auto" or fmt in formats)
    if fmt == "auto":
        assert formats <= {"tt", "cp", "svd", "tucker2"}
    path = save(result.model, tmp_path / "m.tt.pt")
    back = load(path)
    for r in result.compressed:
        assert format_of(back.get_submodule(r.name)).name == r.format
    # The weights come back bit for bit; the outputs agree to rounding, because an eval-mode layer
    # may pick another exact evaluation (factorized or merged kernel) by timing.
    saved = result.model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in back.state_dict().items()) and back.state_dict().keys() == saved.keys()
    with torch.no_grad():
        torch.testing.assert_close(back(x), result.model(x), rtol=1e-5, atol=1e-6)


# ---- auto ------------------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Conv2d(8, 16, 3))
    with torch.no_grad():  # layer 0 has exact rank 3: SVD at rank 3 is exact, TT at the same budget is not
        model[0].weight.copy_(torch.randn(48, 3) @ torch.randn(3, 64))
    return model


def test_auto_is_deterministic_and_explained():
    runs = [ttcompress.compress_with_report(_mlp(), Plan(formats=("auto",), cp=CPSettings(options=FAST)))
            for _ in range(2)]
    first, second = ([(r.format, r.ranks, r.note) for r in run.records] for run in runs)
    assert first == second
    rec = {r.name: r for r in runs[0].records}
    assert rec["0"].format == "svd" and rec["0"].rel_error < 1e-5
    assert rec["0"].note.startswith("auto: svd has the lowest error") and "(vs tt " in rec["0"].note
    assert rec["2"].format in ("cp", "tucker2") and rec["2"].note.startswith("auto: ")
    meta = runs[0].model.ttcompress_meta["layers"]["0"]
    assert meta["format"] == "svd" and meta["note"] == rec["0"].note
    # the budget is the default format's: TT max rank 8 for the Linear
    dec = plan_layers(_mlp(), Plan(formats=("auto",)))[0]
    assert rec["0"].params_after <= dec.options["budget"] == dec.params_after


def _cp_winning_conv() -> nn.Conv2d:
    """A float64 conv whose kernel has CP rank 4 up to 1e-3 noise: CP at rank 4 beats Tucker-2 at that budget.

    (The noise keeps CP-ALS's error above the ~1e-8 noise floor of its error formula, where the
    sweep at which a fit stops would be decided by rounding.)"""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,cr,yr,xr->ocyx", *(torch.randn(n, 4, dtype=torch.float64)
                                                              for n in (16, 12, 3, 3))))
        conv.weight.add_(1e-3 * torch.randn(16, 12, 3, 3, dtype=torch.float64))
    return conv


def test_cp_trial_bounds_the_full_fit_and_finishes_to_it():
    fmt, conv = get_format("cp"), _cp_winning_conv()
    with torch.no_grad():
        conv.weight.add_(0.05 * torch.randn_like(conv.weight))  # not exactly rank 4: ALS needs many sweeps
    options = {"rank": 4, "tol": 1e-8}
    full = fmt.build(conv, options).layer
    trial = fmt.build_trial(conv, options)
    assert trial.layer.n_iter <= 10 < full.n_iter
    assert trial.error >= full.rel_error
    done = fmt.finish_trial(conv, trial, options).layer
    assert done.n_iter == full.n_iter
    assert done.rel_error == pytest.approx(full.rel_error, rel=1e-9)
    torch.testing.assert_close(done.kernel(), full.kernel(), rtol=1e-7, atol=1e-9)
    # a plan that asks for a short fit anyway, or several restarts: the trial is the full build
    for short in ({"rank": 4, "n_iter_max": 5, "tol": 1e-2}, {"rank": 4, "n_restarts": 2, "n_iter_max": 20}):
        trial = fmt.build_trial(conv, short)
        assert fmt.finish_trial(conv, trial, short) is trial


def test_auto_fully_fits_a_winning_cp_candidate():
    conv = _cp_winning_conv()
    options = get_format("auto").decide(conv, "c", None, override={"ranks": 4}).options
    built = get_format("auto").build(conv, options, name="c")
    layer = built.layer
    full = get_format("cp").build(conv, options["trials"]["cp"]).layer
    assert type(layer).__name__ == "CPConv2d" and layer.n_iter == full.n_iter
    assert layer.rel_error == pytest.approx(full.rel_error, rel=1e-9, abs=1e-12)
    assert built.note.startswith("auto: cp has the lowest error") and not hasattr(layer, "ttcompress_note")


def test_auto_ties_go_to_fewer_flops_then_registration_order():
    a, b, c = Trial("tt", 10, 0.1000, 50), Trial("svd", 10, 0.1004, 40), Trial("x", 10, 0.3, 1)
    winner, why = choose([a, b, c], tie_tol=1e-3)
    assert winner is b and "ties within 0.001" in why and "fewest multiply-adds (40)" in why
    assert choose([a, b], tie_tol=0.0)[0] is a
    assert choose([Trial("tt", 1, 0.1, 5), Trial("svd", 1, 0.1, 5)], tie_tol=0.0)[0].format == "tt"


def test_auto_is_the_default_under_target_ratio():
    model = _mlp()
    total = sum(p.numel() for p in model.parameters())
    decisions = plan_layers(model, Plan(target_ratio=3.0))
    assert {d.format for d in decisions} == {"auto"}
    assert sum(d.params_after for d in decisions) <= total / 3.0
    result = ttcompress.compress_with_report(_mlp(), Plan(target_ratio=3.0, cp=CPSettings(options=FAST)))
    assert result.ratio >= 3.0 and all(r.note for r in result.compressed)
    # 4x: the conv must shrink too (at 3x the budget left after the exact rank-3 SVD would take the
    # conv to 1.13x, where it is kept dense; the CP estimate no longer reads 0 above its channel counts)
    fixed = plan_layers(_mlp(), Plan(target_ratio=4.0, formats=("svd",)))
    assert fixed[0].format == "svd" and fixed[1].format == "auto"


# ---- plans accept every registered name ------------------------------------------------------------------
def test_plan_files_accept_every_format(tmp_path):
    data = {"svd": {"rank": 4}, "tucker2": {"ranks": [2, 3], "options": {"n_iter_max": 2}},
            "auto": {"tie_tol": 0.01}, "formats": ["tucker2", "svd"],
            "rules": [{"pattern": "0", "format": "auto"}, {"pattern": "2", "format": "tucker2", "ranks": 5}]}
    plan = Plan.from_dict(data)
    assert plan.to_dict() == data
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.settings_for("svd").rank == 4 and plan.settings_for("tucker2").ranks == (2, 3)
    dec = {d.name: d for d in plan_layers(_mlp(), plan)}
    assert dec["0"].format == "auto" and dec["2"].options["in_rank"] == 5
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        Plan(formats=("nope",))
    with pytest.raises(ValueError, match=r"tucker2\.ranks must be one int"):
        Plan.from_dict({"tucker2": {"ranks": [1, 2, 3]}})
    with pytest.raises(ValueError, match="do not combine it with svd.rank"):
        Plan(target_ratio=2.0, settings={"svd": {"rank": 3}})


# ---- globs that match nothing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (Plan(exclude=("classifer.3",)), "exclude pattern 'classifer.3' matches no layer; closest: classifier.3"),
        (Plan(layers=("nomatch*",)), "layers pattern 'nomatch*' matches no layer; layers are: features.0"),
        (Plan(rules=(Rule("feature.3", format="dense"),)), "rule pattern 'feature.3' matches no layer; closest: features.3"),
    ],
)
def test_pattern_matching_nothing_is_an_error(plan, match):
    with pytest.raises(PatternError, match=match.replace(".", r"\.").replace("*", r"\*")):
        plan_layers(build_arch("seed-cnn"), plan)


def test_cli_pattern_matching_nothing_exits_2_with_one_line(tmp_path):
    src = tmp_path / "cnn.pt"
    torch.save(build_arch("seed-cnn").state_dict(), src)
    out = tmp_path / "o.tt.pt"
    result = CliRunner().invoke(app, ["decompose", str(src), "--arch", "seed-cnn", "--exclude", "classifer.3",
                                      "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "closest: classifier.3" in result.stderr
    assert not out.exists()


def test_cli_format_option(tmp_path):
    src = tmp_path / "cnn.pt"
    torch.save(build_arch("seed-cnn").state_dict(), src)
    out = tmp_path / "o.tt.pt"
    result = CliRunner().invoke(app, ["decompose", str(src), "--arch", "seed-cnn", "--format", "svd,tucker2",
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    formats = {r["format"] for r in json.loads(result.stdout)["layers"]}
    assert formats <= {"svd", "tucker2", "dense"} and {"svd", "tucker2"} <= formats
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "TUCKER2" in shown.stdout and "SVD" in shown.stdout
    bad = CliRunner().invoke(app, ["decompose", str(src), "--arch", "seed-cnn", "--format", "svdd", "-o", str(out)])
    assert bad.exit_code == 2 and "unknown format 'svdd'" in bad.stderr


# ---- no format names outside the format packages ---------------------------------------------------------
PACKAGE = Path(ttcompress.__file__).parent
#: Modules allowed to name formats: the format packages (formats/, layers/, decompose/, and the
#: numerics of calibration/, which picks a fitting method per layer class), the public API, io.py
#: until its rebuild goes through the registry, and models.py, whose built-in "seed-tt2"
#: architecture is made of TT layers.
PACKAGES = ("formats", "layers", "decompose", "calibration")
ALLOWED = {"__init__.py", "checkpoint/io.py", "checkpoint/models.py"}


def _names_formats(path: Path) -> list[str]:
    # formats with a layer of their own; "auto" is also the ordinary word for device="auto" etc.
    formats = set(LAYER_TYPES)
    classes = {c.__name__ for c in LAYER_TYPES.values()}
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in formats:
            hits.append(f"{node.value!r} (line {node.lineno})")
        elif isinstance(node, ast.Name) and node.id in classes:
            hits.append(f"{node.id} (line {node.lineno})")
        elif isinstance(node, ast.alias) and node.name in classes:
            hits.append(node.name)
    return hits


def test_no_module_outside_the_format_packages_names_a_format():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in PACKAGES or str(rel) in ALLOWED:
            continue
        hits = _names_formats(path)
        if hits:
            offenders[str(rel)] = hits
    assert offenders == {}


def test_layers_inside_a_factorized_layer_are_not_candidates():
    model = ttcompress.compress(nn.Sequential(nn.Conv2d(8, 16, 3)), Plan(formats=("tucker2",)))
    assert [type(m).__name__ for m in model] == ["Tucker2Conv2d"]  # it holds three nn.Conv2d
    assert plan_layers(model, Plan()) == []
    with pytest.raises(PatternError, match="'0.core' matches no layer; layers are: 0$"):
        plan_layers(model, Plan(exclude=("0.core",)))


def test_new_layers_work_with_calibration_reconstruct():
    from ttcompress.calibration.reconstruct import dense_weight

    conv = _double(nn.Conv2d(4, 6, 3, groups=2))
    layer = Tucker2Conv2d.from_conv(conv, in_rank=2, out_rank=3)
    assert torch.allclose(dense_weight(layer), conv.weight.reshape(6, -1), atol=TOL)
    lin = _double(nn.Linear(5, 4))
    assert torch.allclose(dense_weight(SVDLinear.from_linear(lin, rank=4)), lin.weight, atol=TOL)


@pytest.mark.parametrize("shape, ranks", [((128, 64, 1, 1), (6, 12)), ((64, 128, 1, 1), (12, 6)), ((32, 3, 7, 7), (8, 16))])
def test_tucker2_sizes_the_layer_by_the_ranks_the_decomposition_returns(shape, ranks) -> None:
    # A 1x1 kernel's output rank is at most its input rank (and vice versa): torchvision ResNet's
    # downsample convs crashed here when the requested ranks differed.
    from ttcompress.layers.tucker2_conv import Tucker2Conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[0], shape[2:], padding=shape[2] // 2).double()
    layer = Tucker2Conv2d.from_conv(conv, in_rank=ranks[0], out_rank=ranks[1])
    x = torch.randn(2, shape[1], 9, 9, dtype=torch.float64)
    assert layer(x).shape == conv(x).shape
    assert layer.core.weight.shape[0] <= ranks[1] and layer.core.weight.shape[1] <= ranks[0]
    full = Tucker2Conv2d.from_conv(conv, in_rank=shape[1], out_rank=shape[0])  # exact at full rank
    torch.testing.assert_close(full(x), conv(x), rtol=1e-9, atol=1e-9)
