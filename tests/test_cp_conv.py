"""CPConv2d (ttcompress.layers.cp_conv): exactness for every Conv2d configuration, counts, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.decompose.cp import cp_reconstruct
from ttcompress.layers.cp_conv import CPConv2d

# every configuration nn.Conv2d allows that the layer must reproduce (issue 3, section 2)
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"kernel_size": 3, "padding": 1},
    "asym-kernel-stride-pad-dil": {
        "kernel_size": (3, 5),
        "stride": (2, 1),
        "padding": (1, 2),
        "dilation": (2, 1),
    },
    "same": {"kernel_size": 3, "padding": "same"},
    "same-even-kernel-dilation": {
        "kernel_size": (2, 4),
        "padding": "same",
        "dilation": (3, 2),
    },
    "same-even-odd-dilation": {"kernel_size": 4, "padding": "same", "dilation": 1},
    "valid": {"kernel_size": 3, "padding": "valid"},
    "no-bias": {"kernel_size": 3, "padding": 1, "bias": False},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "replicate": {
        "kernel_size": (3, 5),
        "padding": (1, 2),
        "padding_mode": "replicate",
    },
    "circular": {"kernel_size": 3, "padding": (2, 1), "padding_mode": "circular"},
    "circular-same-even": {
        "kernel_size": (4, 3),
        "padding": "same",
        "padding_mode": "circular",
    },
    "reflect-stride-dil": {
        "kernel_size": 3,
        "padding": 2,
        "stride": 2,
        "dilation": 2,
        "padding_mode": "reflect",
    },
    "1x1": {"kernel_size": 1},
    "1x1-stride": {"kernel_size": 1, "stride": 2},
    "in-channels-1": {"kernel_size": 3, "padding": 1, "in_channels": 1},
    "groups-2": {"kernel_size": 3, "padding": 1, "groups": 2},
    "kh-only": {"kernel_size": (3, 1), "padding": (1, 0)},
}
STRATEGIES = [(False, False), (True, False), (False, True), (True, True)]


def _build(cfg: dict[str, Any], rank: int = 3, seed: int = 0) -> CPConv2d:
    torch.manual_seed(seed)
    cfg = dict(cfg)
    in_channels = cfg.pop("in_channels", 4)
    return CPConv2d(in_channels, 6, rank=rank, **cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "strategy", STRATEGIES, ids=["seq", "fused", "seq-cl", "fused-cl"]
)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_conv_with_reconstructed_kernel(
    name: str, strategy: tuple[bool, bool]
) -> None:
    layer = _build(CONFIGS[name])
    layer.fuse_spatial, layer.channels_last = strategy
    layer.evaluation = "factorized"
    conv = layer.to_conv()
    x = torch.randn(2, layer.in_channels, 11, 13)
    with torch.no_grad():
        y = layer(x)
        ref32 = conv(x)
        ref64 = conv.double()(x.double())  # float64 dense reference
    assert y.shape == ref32.shape
    assert y.dtype == torch.float32
    assert _rel(y, ref64) <= 1e-5
    assert _rel(y, ref32) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_conv_keeps_every_attribute(name: str) -> None:
    cfg = dict(CONFIGS[name])
    in_channels = cfg.pop("in_channels", 4)
    torch.manual_seed(1)
    conv = nn.Conv2d(in_channels, 6, **cfg)
    layer = CPConv2d.from_conv(conv, rank=2, n_iter_max=5)
    back = layer.to_conv()
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(back, attr) == getattr(conv, attr), attr
    assert (back.bias is None) == (conv.bias is None)
    assert isinstance(layer.rel_error, float) and 0.0 <= layer.rel_error <= 1.0
    assert isinstance(layer.n_iter, int) and layer.n_iter >= 1


@pytest.mark.parametrize(
    ("cin", "cout", "ksize", "groups", "rank"),
    [(5, 7, (3, 5), 1, 4), (1, 6, 3, 1, 3), (6, 4, 1, 1, 4), (4, 6, 3, 2, 2)],
)
def test_from_conv_recovers_a_cp_kernel(
    cin: int, cout: int, ksize: Any, groups: int, rank: int
) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(cin, cout, ksize, padding=1, groups=groups)
    kh, kw = conv.kernel_size
    cpg, opg = cin // groups, cout // groups
    blocks = []
    for _ in range(groups):
        factors = [
            torch.randn(n, rank, dtype=torch.float64) for n in (opg, cpg, kh, kw)
        ]
        blocks.append(cp_reconstruct(factors))
    with torch.no_grad():
        conv.weight.copy_(torch.cat(blocks))
    layer = CPConv2d.from_conv(conv, rank=rank, n_iter_max=2000, tol=1e-13)
    assert layer.rel_error is not None and layer.rel_error <= 1e-4
    x = torch.randn(2, cin, 9, 10)
    with torch.no_grad():
        assert _rel(layer(x), conv(x)) <= 1e-4


def test_parameter_count_and_ratio() -> None:
    layer = CPConv2d(16, 32, (3, 5), rank=7)
    own = sum(p.numel() for p in layer.parameters())
    assert own == 7 * (16 + 3 + 5 + 32) + 32 == layer.num_params
    assert layer.dense_params == 32 * 16 * 3 * 5 + 32
    assert layer.compression_ratio == pytest.approx(layer.dense_params / own)
    no_bias = CPConv2d(16, 32, 3, rank=7, bias=False)
    assert sum(p.numel() for p in no_bias.parameters()) == 7 * (16 + 3 + 3 + 32)
    grouped = CPConv2d(8, 12, 3, rank=2, groups=4)
    assert sum(p.numel() for p in grouped.parameters()) == 4 * 2 * (2 + 3 + 3 + 3) + 12
    text = repr(layer)
    assert f"params={own}" in text and "ratio=" in text and "rank=7" in text


def test_paper_mnist_net_ratios() -> None:
    # Lebedev et al. 2015, MNIST: conv 1->10 and 10->10 (3x3). Ratio = conv WEIGHTS ONLY (biases
    # excluded), both convs together: dense 90 + 900 = 990 against R*(1+3+3+10) + R*(10+3+3+10).
    for rank, expected in ((3, 7.7), (6, 3.8), (9, 2.6)):
        layers = [
            CPConv2d(1, 10, 3, rank=rank, bias=False),
            CPConv2d(10, 10, 3, rank=rank, bias=False),
        ]
        dense = sum(layer.dense_params for layer in layers)
        own = sum(p.numel() for layer in layers for p in layer.parameters())
        assert dense == 990
        assert round(dense / own, 1) == expected


@pytest.mark.parametrize(
    "strategy", STRATEGIES, ids=["seq", "fused", "seq-cl", "fused-cl"]
)
def test_gradients_reach_all_factors(strategy: tuple[bool, bool]) -> None:
    layer = _build({"kernel_size": 3, "padding": 1, "groups": 2}, rank=3)
    layer.fuse_spatial, layer.channels_last = strategy
    layer.evaluation = "factorized"
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert x.grad is not None


def test_gradients_match_dense_conv() -> None:
    layer = _build(
        {"kernel_size": (3, 5), "padding": (1, 2), "stride": (2, 1)}, rank=3
    ).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    layer(x).sum().backward()
    cp_grad = layer.in_factor.grad.clone()
    layer.zero_grad()
    F.conv2d(
        x, layer.kernel(), layer.bias, stride=(2, 1), padding=(1, 2)
    ).sum().backward()
    assert torch.allclose(cp_grad, layer.in_factor.grad, rtol=1e-9, atol=1e-12)


def test_variance_preserving_init() -> None:
    torch.manual_seed(0)
    layer = CPConv2d(128, 128, 3, rank=64)
    dense = nn.Conv2d(128, 128, 3)
    with torch.no_grad():
        ratio = float(layer.kernel().var() / dense.weight.var())
    assert 0.7 < ratio < 1.4
    x = torch.randn(4, 128, 8, 8)
    with torch.no_grad():
        out_ratio = float(layer(x).var() / dense(x).var())
    assert 0.5 < out_ratio < 2.0


def test_config_round_trip() -> None:
    layer = CPConv2d.from_conv(
        nn.Conv2d(
            4,
            6,
            (3, 5),
            stride=(2, 1),
            padding="valid",
            dilation=(2, 1),
            padding_mode="reflect",
        ),
        rank=3,
        n_iter_max=10,
    )
    config = json.loads(json.dumps(layer.config()))
    rebuilt = CPConv2d(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in layer.state_dict().items()
    }
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():  # same weights; eval may pick another exact path by timing: equal to rounding
        torch.testing.assert_close(rebuilt(x), layer(x), rtol=1e-5, atol=1e-6)
    assert rebuilt.rel_error is None and "rel_error" not in rebuilt.state_dict()


def test_from_conv_is_deterministic_for_a_seed() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 8, 3)
    a = CPConv2d.from_conv(conv, rank=4, n_iter_max=20, init="random", seed=5)
    b = CPConv2d.from_conv(conv, rank=4, n_iter_max=20, init="random", seed=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_from_conv_float64_and_dtype_kept() -> None:
    conv = nn.Conv2d(3, 5, 3, dtype=torch.float64)
    layer = CPConv2d.from_conv(conv, rank=2, n_iter_max=5)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.to_conv().weight.dtype == torch.float64


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("rank", [0, -1])
def test_bad_rank(rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        CPConv2d.from_conv(nn.Conv2d(2, 2, 3), rank=rank)
    with pytest.raises(ValueError, match="rank"):
        CPConv2d(2, 2, 3, rank=rank)


@pytest.mark.parametrize(
    "module", [nn.Linear(4, 4), nn.Conv1d(2, 2, 3), nn.Conv3d(2, 2, 3)]
)
def test_not_a_conv2d(module: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"nn\.Conv2d.*layer 'blocks\.0'"):
        CPConv2d.from_conv(module, rank=2, name="blocks.0")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad: float) -> None:
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"layer 'conv2'.*NaN or Inf"):
        CPConv2d.from_conv(conv, rank=2, name="conv2")


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"padding": "full"}, ValueError),
        ({"padding": "same", "stride": 2}, ValueError),
        ({"padding_mode": "mirror"}, ValueError),
        ({"groups": 3}, ValueError),
        ({"kernel_size": 0}, ValueError),
        ({"stride": (1, 2, 3)}, TypeError),
        ({"padding": -1}, ValueError),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], exc: type) -> None:
    base: dict[str, Any] = {"kernel_size": 3, "rank": 2}
    base.update(kwargs)
    with pytest.raises(exc):
        CPConv2d(4, 6, **base)


def test_output_memory_format_follows_the_input() -> None:
    # nn.Conv2d returns NCHW-contiguous output for NCHW input, so `.view(n, -1)` must keep working.
    conv = nn.Conv2d(32, 32, 3, padding=1)
    layer = CPConv2d.from_conv(conv, rank=8)
    x = torch.randn(2, 32, 8, 8)
    assert layer(x).is_contiguous()
    assert layer(x).view(2, -1).shape == (2, 32 * 64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert layer(x_cl).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x_cl), layer(x))


# ---------------------------------------------------------------- evaluation paths and the eval cache


@pytest.mark.parametrize("evaluation", ["factorized", "dense"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradcheck_every_evaluation(name: str, evaluation: str) -> None:
    """Both exact evaluations have autograd-correct gradients (float64, odd shapes)."""
    layer = _build(CONFIGS[name], rank=2).double()
    layer.evaluation = evaluation
    x = torch.randn(1, layer.in_channels, 5, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


def test_dense_and_factorized_paths_agree_in_training() -> None:
    layer = _build({"kernel_size": (3, 5), "padding": (1, 2), "stride": (2, 1)}, rank=3)
    x = torch.randn(3, 4, 9, 10)
    grads = {}
    for evaluation in ("factorized", "dense"):
        layer.evaluation = evaluation
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        grads[evaluation] = (y.detach(), [p.grad.clone() for p in layer.parameters()])
    (y_f, g_f), (y_d, g_d) = grads["factorized"], grads["dense"]
    assert _rel(y_d, y_f) <= 1e-5
    for a, b in zip(g_d, g_f, strict=True):
        assert _rel(a, b) <= 1e-5


def test_training_cost_model_takes_dense_path_for_tiny_layers_only() -> None:
    tiny = CPConv2d(1, 8, 5, rank=4, padding=2)
    assert tiny.uses_dense_kernel(64, 28, 28)
    wide = CPConv2d(256, 256, 3, rank=142, padding=1)  # 8x fewer weights
    assert not wide.uses_dense_kernel(32, 32, 32)
    wide.evaluation = "dense"
    assert wide.uses_dense_kernel(32, 32, 32)


def _eval_reference(layer: CPConv2d, x: torch.Tensor) -> torch.Tensor:
    """Dense float64 conv with a kernel rebuilt from the current factors."""
    conv = layer.to_conv().double()
    with torch.no_grad():
        return conv(x.double())


@pytest.mark.parametrize("evaluation", ["auto", "dense"])
def test_eval_cache_is_invalidated_when_parameters_change(evaluation: str) -> None:
    torch.manual_seed(0)
    layer = _build({"kernel_size": 3, "padding": 1}, rank=3)
    layer.evaluation = evaluation
    x = torch.randn(2, 4, 8, 8)
    layer.eval()
    with torch.no_grad():
        assert _rel(layer(x), _eval_reference(layer, x)) <= 1e-5
    if evaluation == "dense":
        with torch.no_grad():
            layer(x)
        cached = layer._kernel_cache
        with torch.no_grad():
            layer(x)
        assert layer._kernel_cache is cached  # reused while nothing changed
    # an optimizer step changes the factors in place
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        assert _rel(layer(x), _eval_reference(layer, x)) <= 1e-5
        # an in-place update under no_grad, without a train() round trip
        layer.in_factor.mul_(-2.0)
        assert _rel(layer(x), _eval_reference(layer, x)) <= 1e-5
    # load_state_dict copies into the parameters
    other = _build({"kernel_size": 3, "padding": 1}, rank=3, seed=7)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert _rel(layer(x), _eval_reference(other, x)) <= 1e-5
    # .to() gives new storages (and here a new dtype)
    layer.double()
    with torch.no_grad():
        y = layer(x.double())
    assert y.dtype == torch.float64
    assert _rel(y, _eval_reference(layer, x)) <= 1e-12  # a stale float32 kernel would be ~1e-8 off


def test_eval_cache_unused_when_gradients_are_needed() -> None:
    layer = _build({"kernel_size": 3, "padding": 1}, rank=3).eval()
    layer.evaluation = "dense"
    x = torch.randn(2, 4, 8, 8)
    layer(x).sum().backward()  # eval mode but grad enabled: differentiable kernel, no cache
    assert layer._kernel_cache is None
    assert layer.in_factor.grad is not None


@pytest.mark.parametrize("choice", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_path_is_remembered_per_shape_and_memory_format(
    monkeypatch: pytest.MonkeyPatch, choice: bool, channels_last: bool
) -> None:
    """Whichever path the timing picks, eval output equals the dense conv; the key has the strides."""
    monkeypatch.setattr("ttcompress.layers.cp_conv.dense_wins", lambda dense, factorized: choice)
    layer = _build({"kernel_size": 3, "padding": 1, "stride": 2}, rank=3).eval()
    x = torch.randn(2, 4, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert list(layer._eval_choice.values()) == [choice]
    assert (tuple(x.shape), x.dtype, x.device, channels_last) in layer._eval_choice
    reference = _eval_reference(layer, x)
    assert _rel(first, reference) <= 1e-5 and torch.equal(first, second)
    assert first.is_contiguous(memory_format=torch.channels_last) == channels_last
