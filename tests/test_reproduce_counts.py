"""The published parameter counts and compression ratios of the two source experiments.

Uses the same functions as ``benchmarks/reproduce_tt_thesis.py`` and
``benchmarks/reproduce_cp_paper.py`` (loaded from their files; ``benchmarks/`` is not a package).
Counts are exact integers; the CP ratios are compared at the paper's one decimal.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ttcompress.layers.tt_linear import TTLinear
from ttcompress.checkpoint.models import build_arch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tt() -> ModuleType:
    return _load("reproduce_tt_thesis")


@pytest.fixture(scope="module")
def cp() -> ModuleType:
    return _load("reproduce_cp_paper")


def _independent_count(model: torch.nn.Module) -> int:
    """Count from the layer shapes, not from ``parameters()``: TT cores r·m·n·r', Linear, BN."""
    total = 0
    for m in model.modules():
        if isinstance(m, TTLinear):
            r = m.ranks
            total += sum(r[k] * m.out_modes[k] * m.in_modes[k] * r[k + 1] for k in range(len(m.in_modes)))
            total += m.out_features  # bias
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features + m.out_features
        elif isinstance(m, torch.nn.BatchNorm1d):
            total += 2 * m.num_features  # affine weight and bias; running stats are buffers
    return total


# ------------------------------------------------------------------------------------ TT thesis


@pytest.mark.parametrize(("variant", "expected"), [("TT-TT-TT", 30_574), ("TT-TT-FC", 50_622)])
def test_tt_fc3_variants_match_published_counts(tt: ModuleType, variant: str, expected: int) -> None:
    model = tt.build_tt_fc3(variant)
    assert tt.count_params(model) == expected == tt.PUBLISHED[variant]["params"]
    assert _independent_count(model) == expected


def test_thesis_modes_are_exact_rank4_five_core_factorizations(tt: ModuleType) -> None:
    model = tt.build_tt_fc3("TT-TT-TT")
    for name, (in_modes, out_modes) in tt.THESIS_MODES.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, TTLinear)
        assert layer.in_modes == in_modes and layer.out_modes == out_modes
        assert len(in_modes) == 5
        # no zero padding, and no rank capped: the count equals the thesis code's uncapped count
        assert math.prod(in_modes) == layer.in_features and math.prod(out_modes) == layer.out_features
        assert layer.ranks == (1, 4, 4, 4, 4, 1)


def test_tt_plan_predicts_the_same_layers(tt: ModuleType) -> None:
    """Route (a)'s plan (TT-SVD) decides the same modes/ranks and params as route (b)'s layers."""
    from ttcompress.compression.plan import plan_layers

    dense = build_arch("seed-fc3")
    for variant, names in tt.VARIANTS.items():
        decisions = {d.name: d for d in plan_layers(dense, tt.tt_plan(variant))}
        built = tt.build_tt_fc3(variant)
        for name in ("1", "4", "7"):
            d = decisions[name]
            if name in names:
                layer = built.get_submodule(name)
                assert d.format == "tt"
                assert tuple(d.options["in_modes"]) == layer.in_modes
                assert tuple(d.options["out_modes"]) == layer.out_modes
                assert d.params_after == sum(p.numel() for p in layer.parameters())
            else:
                assert d.format == "dense"


def test_dense_fc3_matches_published_count(tt: ModuleType) -> None:
    model = build_arch("seed-fc3")
    assert tt.count_params(model) == 11_638_814 == tt.PUBLISHED["FC-FC-FC"]["params"]
    assert _independent_count(model) == 11_638_814


def test_seed_tt2_matches_published_count_and_cores(tt: ModuleType) -> None:
    model = build_arch("seed-tt2")
    assert tt.count_params(model) == 791_294 == tt.PUBLISHED["TT_FC-TT_FC"]["params"]
    assert _independent_count(model) == 791_294
    first, second = (m for m in model.modules() if isinstance(m, TTLinear))
    assert [c.numel() for c in first.cores] == [64, 512, 1792, 1024, 224]
    assert [c.numel() for c in second.cores] == [160, 512, 256, 256, 32]


def test_published_counts_helper(tt: ModuleType) -> None:
    ours = tt.published_counts()
    assert ours == {name: pub["params"] for name, pub in tt.PUBLISHED.items()}


# ------------------------------------------------------------------------------------- CP paper


@pytest.mark.parametrize(("rank", "published"), [(3, 7.7), (6, 3.8), (9, 2.6)])
def test_cp_conv_compression_matches_paper(cp: ModuleType, rank: int, published: float) -> None:
    model = build_arch("seed-cnn")
    ratio = cp.conv_compression(model, rank)
    # 990 kernel weights / (17 R + 26 R) CP factors
    assert ratio == pytest.approx(990 / (43 * rank), rel=1e-12)
    assert round(ratio, 1) == published == cp.PUBLISHED[rank]["conv_compression"]


@pytest.mark.parametrize("rank", [3, 6])
def test_decompose_convs_builds_the_predicted_ratio(cp: ModuleType, rank: int) -> None:
    """Both convs are CP, even conv1 at rank 6 where CP has more weights (102 > 90)."""
    torch.manual_seed(0)
    dense = build_arch("seed-cnn")
    model = build_arch("seed-cnn")
    model.load_state_dict(dense.state_dict())
    errors = cp.decompose_convs(model, rank=rank, seed=0)
    assert set(errors) == {"features.0", "features.3"}
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert cp.measured_conv_compression(dense, model) == pytest.approx(cp.conv_compression(dense, rank), rel=1e-12)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_conv_compression_rejects_bad_rank(cp: ModuleType) -> None:
    with pytest.raises(ValueError, match="rank"):
        cp.conv_compression(build_arch("seed-cnn"), 0)
