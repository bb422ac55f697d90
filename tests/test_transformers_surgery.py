"""Transformers through surgery: attention projections and embeddings compressed by name, tied
weights kept, the forward check, and checkpoints that rebuild parent-then-children (issue 11 §1-3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import ttcompress
from ttcompress.layers.attention import FactorizedMultiheadAttention
from ttcompress.layers.tt_embedding import TTEmbedding
from ttcompress.layers.tt_linear import TTLinear
from ttcompress.compression.plan import Plan, Rule, TTSettings
from ttcompress.compression.pipeline import compress_with_report


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes the head: make it count
    return model.eval()


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def _densify(model: nn.Module) -> nn.Module:
    """The compressed model with every factorized layer made dense again (exactly low-rank weights)."""
    for name, m in list(model.named_modules()):
        new = None
        if isinstance(m, FactorizedMultiheadAttention):
            new = m.to_mha()
        elif isinstance(m, TTLinear):
            new = m.to_linear()
        elif isinstance(m, TTEmbedding):
            new = m.to_embedding()
        if new is not None:
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent)._modules[child] = new
    return model


def _linear_only(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_vit_compresses_attention_and_mlp_and_runs() -> None:
    model, x = _vit(), torch.randn(2, 3, 28, 28)
    ref = model(x)
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)), filter_fn=_linear_only, check_input=x)
    names = {r.name: r for r in result.records}
    for proj in ("q", "k", "v", "out"):  # the per-layer table lists the projections
        assert names[f"encoder.layers.encoder_layer_0.self_attention.{proj}"].format == "tt"
    assert names["encoder.layers.encoder_layer_1.mlp.0"].format == "tt"
    assert isinstance(model.encoder.layers[0].self_attention, FactorizedMultiheadAttention)
    assert result.params_after < result.params_before
    out = result.model(x)
    assert out.shape == ref.shape and bool(out.isfinite().all())
    assert result.output_error == pytest.approx(_rel(out, ref), rel=1e-4)


def test_vit_exact_at_exact_low_rank() -> None:
    x = torch.randn(2, 3, 28, 28)
    low = _densify(compress_with_report(_vit(), Plan(tt=TTSettings(ranks=2)), filter_fn=_linear_only).model)
    assert all(type(m) is not TTLinear for m in low.modules())
    ref = low(x)
    result = compress_with_report(low, Plan(tt=TTSettings(ranks=2)), filter_fn=_linear_only)
    assert len(result.compressed) == 13 and result.params_after < result.params_before
    assert torch.allclose(result.model(x), ref, atol=1e-4, rtol=0)


def test_rule_keeps_attention_at_its_own_rank() -> None:
    plan = Plan(tt=TTSettings(ranks=2), rules=(Rule("encoder.layers.*.self_attention.*", ranks=4),))
    result = compress_with_report(_vit(), plan, filter_fn=_linear_only)
    ranks = {r.name: max(r.ranks) for r in result.compressed}
    assert ranks["encoder.layers.encoder_layer_0.self_attention.q"] == 4
    assert ranks["encoder.layers.encoder_layer_0.mlp.0"] == 2


def test_attention_without_compressed_projections_is_put_back() -> None:
    model = _vit()
    plan = Plan(tt=TTSettings(ranks=2), exclude=("*self_attention*",))
    result = compress_with_report(model, plan, filter_fn=_linear_only)
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert not any(v["format"] == "mha" for v in result.model.ttcompress_meta["layers"].values())


def test_encoder_with_nested_tensor_runs_after_feed_forward_compression() -> None:
    model = _encoder()
    src = torch.randn(3, 5, 32)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    low = _densify(compress_with_report(copy.deepcopy(model), Plan(tt=TTSettings(ranks=2),
                                                                    layers=("*linear*",))).model)
    low.use_nested_tensor = True
    ref = low(src, src_key_padding_mask=mask)
    result = compress_with_report(low, Plan(tt=TTSettings(ranks=2), layers=("*linear*",)),
                                  check_input=(src, None, mask))
    # linear1/linear2 factorized: the layer's attention is converted so the fast path is skipped
    assert isinstance(low.layers[0].self_attn, FactorizedMultiheadAttention)
    assert low.use_nested_tensor is False
    out = result.model(src, src_key_padding_mask=mask)
    assert torch.allclose(out[~mask], ref[~mask], atol=1e-4, rtol=0)


def test_unsupported_attention_keeps_out_proj_dense_with_reason() -> None:
    model = _encoder()
    model.layers[0].self_attn.register_forward_hook(lambda *a: None)
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)))
    rows = {r.name: r for r in result.records}
    assert rows["layers.0.self_attn.out_proj"].format == "dense"
    assert "hooks" in rows["layers.0.self_attn.out_proj"].skipped
    assert "self_attn cannot be converted" in rows["layers.0.linear1"].skipped
    assert rows["layers.1.self_attn.q"].format == "tt"
    src = torch.randn(2, 4, 32)
    assert result.model(src).shape == src.shape


class _ReadsWeight(nn.Module):
    """A parent that reads its child's weight *parameter* (breaks under any factorized child, whose
    ``weight`` is a property, not a parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(64, 64)
        self.other = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(x @ dict(self.inner.named_parameters())["weight"].T)


def test_forward_check_reverts_the_layer_its_parent_reads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_ReadsWeight(), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(3, 64)
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)), check_input=x)
    rows = {r.name: r for r in result.records}
    assert rows["0.inner"].format == "dense" and "forward check failed in '0'" in rows["0.inner"].skipped
    assert rows["0.other"].format == "dense"  # inside the failing parent too
    assert rows["2"].format == "tt"
    assert "0.inner" not in result.model.ttcompress_meta["layers"]
    assert result.model(x).shape == (3, 64)
    assert result.output_error is not None and result.output_error > 0


def test_check_input_that_the_dense_model_rejects_is_a_value_error() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="check_input does not run through the dense model"):
        compress_with_report(model, Plan(), check_input=torch.randn(3, 5))
    assert type(model[0]) is nn.Linear


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(120, 32, padding_idx=0)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 120, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.emb(ids))))


def test_tied_weights_stay_dense_and_tied() -> None:
    torch.manual_seed(0)
    model = _TinyLM()
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)))
    rows = {r.name: r for r in result.records}
    assert rows["emb"].format == "dense" and rows["emb"].skipped.startswith("tied to head.weight")
    assert rows["head"].format == "dense" and rows["head"].skipped.startswith("tied to emb.weight")
    assert rows["body"].format == "tt"
    assert model.head.weight is model.emb.weight


def test_embedding_through_surgery_with_padding_idx() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(120, 32, padding_idx=3), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight[3] = 0
    ids = torch.tensor([[3, 5, 119, 0], [3, 3, 7, 64]])
    result = compress_with_report(model, Plan(layers=("0",), rules=(Rule("0", ranks=3),)))
    rows = {r.name: r for r in result.records}
    assert rows["0"].format == "tt_embedding" and rows["0"].type == "Embedding"
    assert rows["0"].params_after < rows["0"].params_before
    emb = result.model[0]
    assert isinstance(emb, TTEmbedding) and emb.padding_idx == 3
    out = emb(ids)
    assert bool((out[ids == 3] == 0).all())
    assert torch.allclose(out, emb.to_embedding()(ids), atol=1e-5)


def test_embedding_with_max_norm_stays_dense_with_reason() -> None:
    model = nn.Sequential(nn.Embedding(120, 32, max_norm=1.0))
    result = compress_with_report(model, Plan())
    assert result.records[0].format == "dense" and "max_norm" in result.records[0].skipped


VIT_ARCH = "torchvision.models:VisionTransformer"
VIT_KWARGS = {"image_size": 28, "patch_size": 7, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64,
              "num_classes": 10}


def test_checkpoint_rebuilds_attention_then_projections(tmp_path) -> None:
    model = ttcompress.checkpoint.models.build_arch(VIT_ARCH, kwargs=VIT_KWARGS).eval()
    nn.init.normal_(model.heads.head.weight)
    x = torch.randn(2, 3, 28, 28)
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)), filter_fn=_linear_only)
    layers = result.model.ttcompress_meta["layers"]
    names = list(layers)
    parent = "encoder.layers.encoder_layer_0.self_attention"
    assert layers[parent]["format"] == "mha"
    assert names.index(parent) < names.index(parent + ".q")
    path = ttcompress.save(result.model, tmp_path / "vit.tt.pt")
    loaded = ttcompress.load(path, arch=VIT_ARCH)
    assert isinstance(loaded.encoder.layers[1].self_attention, FactorizedMultiheadAttention)
    assert isinstance(loaded.encoder.layers[1].self_attention.v, TTLinear)
    assert torch.equal(loaded(x), result.model(x))


def test_rebuild_does_not_confuse_modules_whose_ids_collide(tmp_path, monkeypatch) -> None:
    # A replaced module is freed, and CPython may give a later module its id(): rebuilding must not
    # take that later module for the replaced one (it did, now and then, under random weights).
    import ttcompress.checkpoint.rebuild as rebuild

    torch.manual_seed(0)
    model = ttcompress.checkpoint.models.build_arch(VIT_ARCH, kwargs=VIT_KWARGS).eval()
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)), filter_fn=_linear_only)
    path = ttcompress.save(result.model, tmp_path / "vit.tt.pt")
    real_id = id
    # every module's id collides (tensors keep theirs)
    monkeypatch.setattr(rebuild, "id", lambda obj: 0 if isinstance(obj, nn.Module) else real_id(obj), raising=False)
    loaded = ttcompress.load(path, arch=VIT_ARCH)
    attention = loaded.encoder.layers[1].self_attention
    assert isinstance(attention, FactorizedMultiheadAttention)
    assert all(isinstance(getattr(attention, n), TTLinear) for n in "qkv")
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(loaded(x), result.model(x))
