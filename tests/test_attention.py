"""FactorizedMultiheadAttention: exactness against nn.MultiheadAttention over its option grid,
parents that read attention attributes, and projections swapped by name for TTLinear."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torchvision
from torch import nn

from ttcompress.layers.attention import (
    FactorizedMultiheadAttention,
    disable_nested_fast_path,
    unsupported_reason,
)
from ttcompress.layers.tt_linear import TTLinear

E, H, L, S, N = 8, 2, 3, 5, 2  # embed dim, heads, target / source length, batch
KDIM, VDIM = 5, 7


def _mha(*, dtype=torch.float64, seed: int = 0, **options) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dtype=dtype, **options)
    with torch.no_grad():  # MHA zero-initializes its biases: make them matter
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha.eval()


def _inputs(mha: nn.MultiheadAttention, *, batched: bool, tgt_len: int = L, src_len: int = S,
            dtype=torch.float64):
    def make(seq: int, dim: int) -> torch.Tensor:
        if not batched:
            return torch.randn(seq, dim, dtype=dtype)
        return torch.randn(N, seq, dim, dtype=dtype) if mha.batch_first else torch.randn(seq, N, dim, dtype=dtype)

    return make(tgt_len, E), make(src_len, mha.kdim), make(src_len, mha.vdim)


def _masks(kind: str, padding: bool, attn: str, *, batched: bool, dtype=torch.float64):
    """Masks that never mask a whole row (which would give NaN in both modules)."""
    kpm = attn_mask = None
    if padding:
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1, -2:] = True  # the second sequence is padded
        if not batched:
            kpm = kpm[1]
    if attn != "none":
        shape = (L, S) if attn == "2d" else ((N * H) if batched else H, L, S)
        attn_mask = torch.rand(shape) < 0.4
        attn_mask[..., 0] = False
    if kind == "float":
        kpm = None if kpm is None else torch.where(kpm, -1e4, torch.randn(kpm.shape)).to(dtype)
        attn_mask = None if attn_mask is None else torch.where(attn_mask, -1e4, torch.randn(attn_mask.shape)).to(dtype)
    return kpm, attn_mask


def _assert_close(a, b, *, atol: float) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


_MODULE_OPTIONS = [
    dict(batch_first=bf, kdim=kv[0], vdim=kv[1], bias=bias, add_bias_kv=bkv, add_zero_attn=zero)
    for bf, kv, bias, bkv, zero in itertools.product(
        [False, True], [(None, None), (KDIM, VDIM)], [True, False], [False, True], [False, True])
]
_CALLS = list(itertools.product(["bool", "float"], [False, True], ["none", "2d", "3d"],
                                [(False, True), (True, True), (True, False)], [True, False]))


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("options", _MODULE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_exact_over_option_grid_float64(options) -> None:
    mha = _mha(**options)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    for kind, padding, attn, (need_weights, average), batched in _CALLS:
        torch.manual_seed(1)
        q, k, v = _inputs(mha, batched=batched)
        kpm, attn_mask = _masks(kind, padding, attn, batched=batched)
        kwargs = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
                      average_attn_weights=average)
        want, want_w = mha(q, k, v, **kwargs)
        got, got_w = layer(q, k, v, **kwargs)
        _assert_close(got, want, atol=1e-10)
        if need_weights:
            _assert_close(got_w, want_w, atol=1e-12)
        else:
            assert got_w is None and want_w is None


@pytest.mark.parametrize("options", _MODULE_OPTIONS[::3], ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_is_causal_matches(options, need_weights: bool, padding: bool) -> None:
    mha = _mha(**options)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    q, k, v = _inputs(mha, batched=True, tgt_len=S, src_len=S)
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
    kpm = None
    if padding:
        kpm = torch.zeros(N, S, dtype=torch.float64)
        kpm[1, -1] = float("-inf")
    kwargs = dict(attn_mask=causal, is_causal=True, key_padding_mask=kpm, need_weights=need_weights)
    want, want_w = mha(q, k, v, **kwargs)
    got, got_w = layer(q, k, v, **kwargs)
    _assert_close(got, want, atol=1e-10)
    if need_weights:
        _assert_close(got_w, want_w, atol=1e-12)


def test_is_causal_without_mask_raises_like_torch() -> None:
    layer = FactorizedMultiheadAttention(E, H)
    x = torch.randn(S, N, E)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        layer(x, x, x, is_causal=True)


@pytest.mark.parametrize("options", [_MODULE_OPTIONS[0], _MODULE_OPTIONS[-1]], ids=["plain", "all"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_float32_within_1e5(options, need_weights: bool) -> None:
    mha = _mha(dtype=torch.float32, **options)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    q, k, v = _inputs(mha, batched=True, dtype=torch.float32)
    kpm, attn_mask = _masks("bool", True, "3d", batched=True)
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights)
    _assert_close(layer(q, k, v, **kwargs)[0], mha(q, k, v, **kwargs)[0], atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_training_dropout_and_gradients_match(need_weights: bool) -> None:
    """Train mode with attention dropout: same random stream, same outputs and input gradients."""
    mha = _mha(dropout=0.5, add_bias_kv=True).train()
    layer = FactorizedMultiheadAttention.from_mha(mha)
    assert layer.training
    results = []
    for module in (mha, layer):
        x = torch.randn(L, N, E, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
        torch.manual_seed(7)
        out, _ = module(x, x, x, need_weights=need_weights)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    (want, want_grad), (got, got_grad) = results
    _assert_close(got, want, atol=1e-10)
    _assert_close(got_grad, want_grad, atol=1e-10)
    assert layer.q.weight.grad is not None and layer.out.weight.grad is not None


def test_eval_mode_disables_dropout() -> None:
    mha = _mha(dropout=0.9)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    q, k, v = _inputs(mha, batched=True)
    _assert_close(layer(q, k, v)[0], mha(q, k, v)[0], atol=1e-10)


# ---------------------------------------------------------------------------- construction
@pytest.mark.parametrize("options", _MODULE_OPTIONS[::5], ids=str)
def test_to_mha_is_exact_inverse(options) -> None:
    mha = _mha(**options)
    back = FactorizedMultiheadAttention.from_mha(mha).to_mha()
    assert type(back) is nn.MultiheadAttention
    want = mha.state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert (back.batch_first, back.dropout, back.add_zero_attn) == (mha.batch_first, mha.dropout, mha.add_zero_attn)


def test_from_mha_keeps_device_dtype_mode_and_frozen_parameters() -> None:
    mha = _mha(dtype=torch.float64).train()
    mha.in_proj_weight.requires_grad_(False)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    assert layer.training
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert not layer.q.weight.requires_grad and not layer.v.weight.requires_grad
    assert layer.q.bias.requires_grad and layer.out.weight.requires_grad


def test_config_is_json_and_rebuilds_structure() -> None:
    mha = _mha(kdim=KDIM, vdim=VDIM, bias=False, add_bias_kv=True, add_zero_attn=True, batch_first=True,
               dropout=0.25)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    config = json.loads(json.dumps(layer.config()))
    rebuilt = FactorizedMultiheadAttention(**config, dtype=torch.float64)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    rebuilt.eval()
    q, k, v = _inputs(mha, batched=True)
    _assert_close(rebuilt(q, k, v)[0], mha(q, k, v)[0], atol=1e-10)


def test_parameter_names_are_per_projection() -> None:
    layer = FactorizedMultiheadAttention(E, H, add_bias_kv=True)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {f"{p}.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")} | {"bias_k", "bias_v"}
    assert layer.out_proj is layer.out
    assert layer.in_proj_weight is None and layer.in_proj_bias is None and not layer._qkv_same_embed_dim


class _SubclassMHA(nn.MultiheadAttention):
    pass


def test_unsupported_reasons() -> None:
    assert unsupported_reason(_mha()) is None
    assert unsupported_reason(_mha(kdim=KDIM, vdim=VDIM, add_bias_kv=True)) is None
    assert "subclass" in unsupported_reason(_SubclassMHA(E, H))
    hooked = _mha()
    hooked.register_forward_hook(lambda *args: None)
    assert "hooks" in unsupported_reason(hooked)
    replaced = _mha()
    replaced.out_proj = TTLinear(E, E, ranks=2)
    assert "out_proj" in unsupported_reason(replaced)
    assert "not torch.nn.MultiheadAttention" in unsupported_reason(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="hooks"):
        FactorizedMultiheadAttention.from_mha(hooked)
    with pytest.raises(TypeError, match="mha"):
        FactorizedMultiheadAttention.from_mha(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(embed_dim=6, num_heads=4), ValueError, "divide"),
        (dict(embed_dim=0, num_heads=1), ValueError, "embed_dim"),
        (dict(embed_dim=8, num_heads=2.0), TypeError, "num_heads"),
        (dict(embed_dim=8, num_heads=2, kdim=-1), ValueError, "kdim"),
        (dict(embed_dim=8, num_heads=2, dropout=1.5), ValueError, "dropout"),
    ],
)
def test_constructor_validates(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        FactorizedMultiheadAttention(**kwargs)


def test_forward_validates_shapes() -> None:
    layer = FactorizedMultiheadAttention(E, H, kdim=KDIM)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="key's last dimension must be 5"):
        layer(x, x, x)
    with pytest.raises(ValueError, match="2-D"):
        layer(x[None], x[None], x[None])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 3\)"):
        FactorizedMultiheadAttention(E, H)(x, x, x, key_padding_mask=torch.zeros(L, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(3,\)"):
        FactorizedMultiheadAttention(E, H)(x[:, 0], x[:, 0], x[:, 0], key_padding_mask=torch.zeros(1, L))
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        layer(x, torch.randn(S, N, KDIM), x[:1].expand(S, N, E), attn_mask=torch.zeros(L, L))


# ---------------------------------------------------------------------------- projections by name
def test_tt_projections_by_name() -> None:
    mha = _mha(add_bias_kv=True)
    layer = FactorizedMultiheadAttention.from_mha(mha)
    layer.q = TTLinear.from_linear(layer.q, ranks=10**6)
    layer.out = TTLinear.from_linear(layer.out, ranks=10**6)
    q, k, v = _inputs(mha, batched=True)
    for need_weights in (False, True):
        _assert_close(layer(q, k, v, need_weights=need_weights)[0],
                      mha(q, k, v, need_weights=need_weights)[0], atol=1e-10)
    # The round trip through to_mha densifies the TT children.
    _assert_close(layer.to_mha()(q, k, v)[0], mha(q, k, v)[0], atol=1e-10)

    low = FactorizedMultiheadAttention.from_mha(mha)
    for name in ("q", "k", "v", "out"):
        setattr(low, name, TTLinear.from_linear(getattr(low, name), ranks=1, d=2))
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in mha.parameters())
    out, weights = low(q, k, v)
    assert out.shape == (L, N, E) and weights.shape == (N, L, S + 1)
    _assert_close(low.to_mha()(q, k, v)[0], out, atol=1e-10)


# ---------------------------------------------------------------------------- parents
def _replace_all(model: nn.Module) -> int:
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, FactorizedMultiheadAttention.from_mha(module))
    return len(targets)


def _randomize_biases(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_layer(batch_first: bool, norm_first: bool, train: bool, grad: bool) -> None:
    torch.manual_seed(0)
    dense = _randomize_biases(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first,
                                                         norm_first=norm_first)).train(train)
    ours = _copy_with_replacement(dense, expected=1)
    x = torch.randn(N, S, 16) if batch_first else torch.randn(S, N, 16)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    with torch.set_grad_enabled(grad):
        for kwargs in (dict(), dict(src_key_padding_mask=kpm), dict(src_mask=causal, is_causal=True)):
            _assert_close(ours(x, **kwargs), dense(x, **kwargs), atol=1e-5)


def _copy_with_replacement(model: nn.Module, *, expected: int) -> nn.Module:
    ours = copy.deepcopy(model)
    assert _replace_all(ours) == expected
    return ours


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_with_nested_tensor_fast_path(train: bool, grad: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    dense = _randomize_biases(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)).train(train)
    assert dense.use_nested_tensor
    ours = _copy_with_replacement(dense, expected=2)
    assert disable_nested_fast_path(ours) == [""]
    assert disable_nested_fast_path(ours) == []  # already off
    x = torch.randn(N, S, 16)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True  # left-aligned padding: the encoder's nested path applies to the dense model
    with torch.set_grad_enabled(grad):
        want = dense(x, src_key_padding_mask=kpm)
        got = ours(x, src_key_padding_mask=kpm)
        # The nested path leaves padded positions at zero; the regular path computes them.
        keep = ~kpm
        _assert_close(got[keep], want[keep], atol=1e-5)
        _assert_close(ours(x), dense(x), atol=1e-5)


def test_transformer_encoder_nested_input_is_a_clear_error() -> None:
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1,
                                  enable_nested_tensor=True).eval()
    ours = _copy_with_replacement(dense, expected=1)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -1] = True
    with torch.no_grad(), pytest.raises(ValueError, match="use_nested_tensor"):
        ours(torch.randn(N, S, 16), src_key_padding_mask=kpm)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_transformer_decoder_layer(batch_first: bool, train: bool) -> None:
    torch.manual_seed(0)
    dense = _randomize_biases(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)).train(train)
    ours = _copy_with_replacement(dense, expected=2)
    shape = (lambda seq: (N, seq, 16)) if batch_first else (lambda seq: (seq, N, 16))
    tgt, memory = torch.randn(shape(L)), torch.randn(shape(S))
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    mkpm = torch.zeros(N, S, dtype=torch.bool)
    mkpm[0, -1] = True
    kwargs = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mkpm)
    _assert_close(ours(tgt, memory, **kwargs), dense(tgt, memory, **kwargs), atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_torchvision_vision_transformer(train: bool) -> None:
    torch.manual_seed(0)
    dense = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10, dropout=0.0)
    dense = _randomize_biases(dense).train(train)
    ours = _copy_with_replacement(dense, expected=2)
    assert isinstance(ours.get_submodule("encoder.layers.encoder_layer_0.self_attention.q"), nn.Linear)
    x = torch.randn(2, 3, 28, 28)
    _assert_close(ours(x), dense(x), atol=1e-5)


def test_full_nn_transformer() -> None:
    torch.manual_seed(0)
    dense = _randomize_biases(nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                             dropout=0.0, batch_first=True)).eval()
    ours = _copy_with_replacement(dense, expected=3)
    assert disable_nested_fast_path(ours) == ["encoder"]
    src, tgt = torch.randn(N, S, 16), torch.randn(N, L, 16)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -1] = True
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(L), tgt_is_causal=True,
                  memory_key_padding_mask=kpm)
    with torch.no_grad():
        _assert_close(ours(src, tgt, **kwargs), dense(src, tgt, **kwargs), atol=1e-5)


def test_factorized_feed_forward_in_encoder_layers() -> None:
    """TT feed-forward layers: the encoder runs once attention is replaced and the nested path is off."""
    torch.manual_seed(0)
    dense = _randomize_biases(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=True)).eval()
    ours = copy.deepcopy(dense)
    for layer in ours.layers:
        layer.linear1 = TTLinear.from_linear(layer.linear1, ranks=10**6)
    x = torch.randn(N, S, 16)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():  # the layer's own fast path reads linear1.weight: the TT layer's dense weight
        _assert_close(ours.layers[0](x), dense.layers[0](x), atol=1e-5)
    assert disable_nested_fast_path(ours) == [""]
    assert _replace_all(ours) == 2
    with torch.no_grad():
        _assert_close(ours(x), dense(x), atol=1e-5)
        keep = ~kpm
        _assert_close(ours(x, src_key_padding_mask=kpm)[keep], dense(x, src_key_padding_mask=kpm)[keep], atol=1e-5)
