"""ttcompress.compression.surgery: swapping layers, compress(), records, and compressed-checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ttcompress.checkpoint.io import build_model, get_meta, load, save
from ttcompress.compression.plan import CPSettings, Plan, Rule, TTSettings
from ttcompress.modtree import get_submodule, set_submodule
from ttcompress.compression.pipeline import compress, compress_with_report

CP_FAST = {"n_iter_max": 30}


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("seed-cnn").eval()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_set_submodule_nested_root_and_flags():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    model.train()
    new = nn.Linear(4, 2).eval()
    assert set_submodule(model, "1.1", new) is model
    assert get_submodule(model, "1.1") is new and new.training  # flag copied from the old module
    root = nn.Linear(3, 3)
    assert set_submodule(root, "", new) is new
    with pytest.raises(AttributeError):
        get_submodule(model, "1.7")


def test_near_full_ranks_match_original():
    model = _cnn()
    x = _x(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    # TT at full rank is exact; the convs' CP at a generous rank is close.
    result = compress_with_report(
        model, Plan(tt=TTSettings(ranks=10_000), cp=CPSettings(rank=9, options=CP_FAST), layers=("classifier.*",))
    )
    with torch.no_grad():
        out = result.model(x)
    assert _rel(out, ref) < 1e-5
    for r in result.compressed:
        assert r.rel_error < 1e-5


def test_cp_on_exact_low_rank_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    with torch.no_grad():
        a, b, c, d = torch.randn(8, 2), torch.randn(6, 2), torch.randn(3, 2), torch.randn(3, 2)
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d))
    model = nn.Sequential(conv)
    x = _x(2, 6, 8, 8)
    with torch.no_grad():
        ref = model(x)
    compress(model, Plan(cp=CPSettings(rank=2, options={"n_iter_max": 200})))
    with torch.no_grad():
        assert _rel(model(x), ref) < 1e-3


def test_records_meta_and_prediction():
    model = _cnn()
    before = sum(p.numel() for p in model.parameters())
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=3), cp=CPSettings(rank=2, options=CP_FAST),
                                              exclude=("classifier.3",)))
    recs = {r.name: r for r in result.records}
    assert set(recs) == {"features.0", "features.3", "classifier.1", "classifier.3"}
    assert recs["classifier.3"].format == "dense" and "excluded" in recs["classifier.3"].skipped
    assert result.params_before == before
    assert result.params_after == sum(p.numel() for p in model.parameters())
    meta = get_meta(model)["layers"]
    assert set(meta) == {r.name for r in result.compressed}
    for r in result.compressed:
        layer = get_submodule(model, r.name)
        assert r.params_after == sum(p.numel() for p in layer.parameters()) == meta[r.name]["params_after"]
        assert meta[r.name]["config"] == json.loads(json.dumps(layer.config()))
        assert r.seconds is not None and r.rel_error is not None
    assert recs["classifier.1"].format == "tt" and max(recs["classifier.1"].ranks) <= 3
    assert recs["features.3"].format == "cp" and recs["features.3"].ranks == (2,)
    assert result.to_dict()["layers"][0]["name"] == "features.0"


def test_predicted_params_equal_built():
    from ttcompress.compression.plan import plan_layers

    model = _cnn()
    plan = Plan(tt=TTSettings(ranks=5), cp=CPSettings(ratio=2.0, options=CP_FAST))
    predicted = {d.name: d.params_after for d in plan_layers(model, plan) if d.skipped is None}
    result = compress_with_report(model, plan)
    assert {r.name: r.params_after for r in result.compressed} == predicted


@pytest.mark.parametrize("eps", [0.5, 0.2])
def test_tt_eps_bound(eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    with torch.no_grad():  # give the layers some structure so that eps actually compresses
        for lin in (model[0], model[2]):
            lin.weight.mul_(torch.logspace(0, -3, lin.weight.shape[1]))
    result = compress_with_report(model, Plan(tt=TTSettings(eps=eps)))
    assert result.compressed
    for r in result.records:
        if r.rel_error is not None:
            assert r.rel_error <= eps + 1e-9


def test_filter_fn_and_root_linear():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)), filter_fn=lambda m, name: name == "1")
    assert [r.format for r in result.records] == ["dense", "tt"]
    assert result.records[0].skipped == "filtered out by filter_fn"
    root = compress(nn.Linear(64, 64), Plan(tt=TTSettings(ranks=2)))
    assert type(root).__name__ == "TTLinear" and "" in get_meta(root)["layers"]


class SharedNet(nn.Module):
    """The same Linear used twice (reachable as ``a`` and ``b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))))


def test_shared_module_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(f"{__name__}:SharedNet").eval()
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=4), rules=(Rule("head", format="dense"),)))
    assert model.a is model.b and type(model.a).__name__ == "TTLinear"
    assert result.records[0].aliases == ("b",)
    path = save(model, tmp_path / "shared.tt.pt")
    loaded = load(path, trust_code=True)  # the header names a test-local factory
    assert loaded.a is loaded.b
    x = _x(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_compressed_checkpoint_round_trip(tmp_path):
    model = _cnn()
    compress(model, Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=3, options=CP_FAST)))
    path = save(model, tmp_path / "cnn.tt.pt")
    loaded = load(path)
    assert get_meta(loaded)["layers"] == get_meta(model)["layers"]
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    x = _x(3, 1, 28, 28)
    saved = model.state_dict()  # bit for bit; outputs to rounding (eval picks an exact path by timing)
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert get_submodule(loaded, "classifier.1").rel_error == get_submodule(model, "classifier.1").rel_error


def test_failed_decomposition_leaves_model_unchanged(monkeypatch):
    import ttcompress.compression.surgery as surgery

    model = _cnn()
    calls = []

    def boom(module, decision, **kwargs):
        calls.append(decision.name)
        if len(calls) == 2:
            raise ValueError("boom")
        return real(module, decision, **kwargs)

    real = surgery.build_replacement
    monkeypatch.setattr(surgery, "build_replacement", boom)
    with pytest.raises(ValueError, match="boom"):
        compress(model, Plan(tt=TTSettings(ranks=2), cp=CPSettings(rank=2, options=CP_FAST)))
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in (get_submodule(model, n) for n in
               ("features.0", "features.3", "classifier.1", "classifier.3")))
    assert get_meta(model)["layers"] == {}
