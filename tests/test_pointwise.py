"""Layout-changing 1x1 convolutions (ttcompress.layers._pointwise) and the CP and Tucker-2 paths using them.

References: ``F.conv2d`` with the 1x1 kernel in float64; gradients by ``gradcheck`` (float64).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ttcompress.layers._pointwise as pointwise_module
import ttcompress.layers.cp_conv as cp_conv_module
from ttcompress.layers._pointwise import nchw_only, pointwise_to_channels_last, pointwise_to_nchw
from ttcompress.layers.cp_conv import CPConv2d
from ttcompress.layers.tucker2_conv import Tucker2Conv2d

CL = torch.channels_last
REAL_SWITCH_MIN_POSITIONS = pointwise_module.SWITCH_MIN_POSITIONS


@pytest.fixture(autouse=True)
def _switch_on_small_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' maps are small (fast gradchecks): let the layout switch take them all."""
    monkeypatch.setattr(pointwise_module, "SWITCH_MIN_POSITIONS", 1)


def test_nchw_only() -> None:
    assert nchw_only(torch.randn(2, 3, 4, 5))
    assert not nchw_only(torch.randn(2, 3, 4, 5).contiguous(memory_format=CL))
    assert not nchw_only(torch.randn(2, 1, 4, 5))  # both layouts at once: nothing to change
    assert not nchw_only(torch.randn(3, 4, 5))
    assert not nchw_only(torch.randn(2, 3, 4, 10)[..., ::2])


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 7, 1, 9), (3, 2, 6, 1)])
def test_to_channels_last_equals_conv(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(4, shape[1], dtype=torch.float64)
    z = pointwise_to_channels_last(x, w)
    torch.testing.assert_close(z, F.conv2d(x, w[:, :, None, None]), rtol=1e-12, atol=1e-12)
    assert z.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_to_nchw_equals_conv(bias: bool, layout: str) -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    if layout == "channels_last":
        z = z.contiguous(memory_format=CL)
    w = torch.randn(6, 4, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    y = pointwise_to_nchw(z, w, b)
    torch.testing.assert_close(y, F.conv2d(z, w[:, :, None, None], b), rtol=1e-12, atol=1e-12)
    assert y.is_contiguous()


def _chain_operands() -> tuple[torch.Tensor, ...]:
    """x (2, 3, 4, 5), w_in (4, 3), w_out (6, 4), b (6,): float64, requiring grad."""
    torch.manual_seed(0)
    return tuple(torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                 for shape in ((2, 3, 4, 5), (4, 3), (6, 4), (6,)))


def _chain(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return pointwise_to_nchw(pointwise_to_channels_last(x, w_in).tanh(), w_out, b)


def test_gradcheck_both_directions() -> None:
    x, w_in, w_out, b = _chain_operands()
    assert torch.autograd.gradcheck(_chain, (x, w_in, w_out, b))
    assert torch.autograd.gradcheck(lambda z, w: pointwise_to_nchw(z, w), (x, w_in))


def test_gradients_come_back_in_the_tensors_layout() -> None:
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w_in = torch.randn(4, 3, requires_grad=True)
    z = pointwise_to_channels_last(x, w_in)
    seen: list[torch.Tensor] = []
    z.register_hook(seen.append)  # the gradient as it flows (retain_grad would store a copy)
    y = pointwise_to_nchw(z, torch.randn(6, 4), torch.randn(6))
    y.backward(torch.randn_like(y))
    assert x.grad is not None and x.grad.is_contiguous()  # NCHW, as the caller's input
    assert seen[0].is_contiguous(memory_format=CL)


def test_only_the_needed_gradients_are_computed() -> None:
    x = torch.randn(2, 3, 4, 5)
    w = torch.randn(4, 3, requires_grad=True)
    pointwise_to_channels_last(x, w).sum().backward()
    assert w.grad is not None and x.grad is None
    z = torch.randn(2, 4, 4, 5, requires_grad=True)
    pointwise_to_nchw(z, torch.randn(6, 4), None).sum().backward()
    assert z.grad is not None


def test_autocast_runs_in_the_autocast_dtype() -> None:
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w_in = torch.randn(4, 3, requires_grad=True)
    w_out = torch.randn(6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pointwise_to_nchw(pointwise_to_channels_last(x, w_in), w_out, torch.zeros(6))
        ref = F.conv2d(F.conv2d(x, w_in[:, :, None, None]), w_out[:, :, None, None])
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and w_in.grad is not None


# ---------------------------------------------------------------- CPConv2d on NCHW input


def _layer(**cfg: Any) -> CPConv2d:
    torch.manual_seed(0)
    layer = CPConv2d(cfg.pop("in_channels", 5), 6, rank=3, **cfg)
    layer.evaluation = "factorized"
    layer.channels_last = True
    return layer


CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"kernel_size": 3, "padding": 1},
    "stride-dil-asym": {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)},
    "same-even": {"kernel_size": (2, 4), "padding": "same", "dilation": (3, 2)},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "no-bias": {"kernel_size": 3, "padding": 1, "bias": False},
    "1x1-stride": {"kernel_size": 1, "stride": 2},
}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "seq"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cp_nchw_path_equals_the_copying_path(name: str, fuse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and every gradient equal those of the old path (convert to channels_last and back)."""
    layer = _layer(**CONFIGS[name])
    layer.fuse_spatial = fuse
    x = torch.randn(3, layer.in_channels, 9, 11)
    results = []
    for switch in (True, False):
        if not switch:
            monkeypatch.setattr(cp_conv_module, "nchw_only", lambda t: False)
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append((y, xi.grad, *(p.grad for p in layer.parameters())))
        assert y.is_contiguous() and xi.grad is not None and xi.grad.is_contiguous()
    for new, old in zip(*results, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cp_nchw_path_gradcheck(name: str) -> None:
    layer = _layer(**CONFIGS[name]).double()
    x = torch.randn(2, layer.in_channels, 6, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))
    ref = layer.to_conv()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-10, atol=1e-10)


def test_cp_nchw_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = cp_conv_module.pointwise_to_channels_last
    monkeypatch.setattr(cp_conv_module, "pointwise_to_channels_last",
                        lambda x, w: calls.append(x.shape) or real(x, w))
    layer = _layer(kernel_size=3, padding=1)
    layer(torch.randn(2, 5, 4, 4))
    layer(torch.randn(2, 5, 4, 4).contiguous(memory_format=CL))  # already channels_last: plain convs
    layer.channels_last = False
    layer(torch.randn(2, 5, 4, 4))
    assert calls == [torch.Size([2, 5, 4, 4])]


# ---------------------------------------------------------------- Tucker2Conv2d on NCHW input


def _tucker(**cfg: Any) -> Tucker2Conv2d:
    torch.manual_seed(0)
    return Tucker2Conv2d(5, 6, in_rank=3, out_rank=4, **cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tucker_nchw_path_equals_the_module_path(name: str) -> None:
    layer = _tucker(**CONFIGS[name])
    x = torch.randn(3, 5, 9, 11)
    results = []
    for hooked in (False, True):
        handle = layer.first.register_forward_hook(lambda *_: None) if hooked else None
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer._factorized_forward(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append((y, xi.grad, *(p.grad for p in layer.parameters())))
        assert y.is_contiguous() and xi.grad is not None and xi.grad.is_contiguous()
        if handle is not None:
            handle.remove()
    for new, old in zip(*results, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tucker_nchw_path_gradcheck(name: str) -> None:
    layer = _tucker(**CONFIGS[name]).double()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_conv()(x), rtol=1e-10, atol=1e-10)


def test_tucker_hooks_on_the_stages_still_run() -> None:
    layer = _tucker(kernel_size=3, padding=1)
    seen = []
    layer.first.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    layer(torch.randn(2, 5, 4, 4))
    assert seen == [torch.Size([2, 3, 4, 4])]


@pytest.mark.parametrize("make", [lambda: _layer(kernel_size=3, padding=1), lambda: _tucker(kernel_size=3, padding=1)],
                         ids=["cp", "tucker2"])
def test_torch_compile_fullgraph(make: Any) -> None:
    layer = make()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 6, 6, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    grads = [x.grad, *(p.grad for p in layer.parameters())]
    x2 = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    ref = layer(x2)
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, [x2.grad, *(p.grad for p in layer.parameters())], strict=True):
        torch.testing.assert_close(got, want)


def assert_per_sample_gradients(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """vmap(grad(...)) (per-sample gradients) over ``layer`` runs and equals one backward per sample."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, p, (xi[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        layer.zero_grad(set_to_none=True)
        layer(x[i:i + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: _layer(kernel_size=3, padding=1), lambda: _tucker(kernel_size=3, padding=1)],
                         ids=["cp", "tucker2"])
def test_per_sample_gradients_with_torch_func(make: Any) -> None:
    assert_per_sample_gradients(make(), torch.randn(3, 5, 6, 6))


@pytest.mark.parametrize("make", [lambda: _layer(kernel_size=3, padding=1), lambda: _tucker(kernel_size=3, padding=1)],
                         ids=["cp", "tucker2"])
def test_in_place_ops_on_the_output(make: Any) -> None:
    """A ReLU(inplace=True) right after the layer (SqueezeNet, VGG) trains, with the same gradients."""
    layer = make()
    x = torch.randn(2, 5, 6, 6)
    grads = []
    for inplace in (True, False):
        layer.zero_grad(set_to_none=True)
        torch.nn.Sequential(layer, torch.nn.ReLU(inplace=inplace))(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_gradgradcheck_both_directions() -> None:
    """Double backward (Hessian-vector products, gradient penalties) through both products."""
    assert torch.autograd.gradgradcheck(_chain, _chain_operands())


@pytest.mark.parametrize("make", [lambda: _layer(kernel_size=3, padding=1), lambda: _tucker(kernel_size=3, padding=1)],
                         ids=["cp", "tucker2"])
def test_forward_mode_ad(make: Any) -> None:
    """forward_ad (jvp) runs, on the plain ops, and equals the directional derivative."""
    import torch.autograd.forward_ad as fwad

    layer = make().double()
    x, t = torch.randn(2, 5, 6, 6, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(layer(fwad.make_dual(x, t))).tangent
    with torch.no_grad():
        want = (layer(x + 1e-6 * t) - layer(x - 1e-6 * t)) / 2e-6
    torch.testing.assert_close(tangent, want, rtol=1e-6, atol=1e-6)


def test_tucker_one_by_one_core_keeps_the_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import ttcompress.layers.tucker2_conv as tucker_module

    calls = []
    monkeypatch.setattr(tucker_module, "pointwise_to_channels_last", lambda *a: calls.append(a))
    Tucker2Conv2d(9, 9, 1, in_rank=7, out_rank=5, stride=2)(torch.randn(2, 9, 8, 8))
    assert calls == []


def test_factorized_layers_expose_their_dense_weight() -> None:
    """``layer.weight`` (read-only) is the equivalent dense layer's weight, as model code expects."""
    from ttcompress.layers.svd_linear import SVDLinear
    from ttcompress.layers.tt_linear import TTLinear

    torch.manual_seed(2)
    for layer in (_layer(kernel_size=3, padding=1), _tucker(kernel_size=3), TTLinear(12, 10, ranks=2),
                  SVDLinear.from_linear(torch.nn.Linear(12, 10), rank=3)):
        ref = layer.to_conv() if hasattr(layer, "to_conv") else layer.to_linear()
        torch.testing.assert_close(layer.weight, ref.weight)
        assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
        with pytest.raises((AttributeError, KeyError)):  # read-only: nothing can be registered over it
            layer.weight = torch.nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("make", [lambda: _layer(kernel_size=3, padding=1), lambda: _tucker(kernel_size=3, padding=1)],
                         ids=["cp", "tucker2"])
def test_small_maps_run_in_nchw_without_copies(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below SWITCH_MIN_POSITIONS positions the chain runs NCHW as it comes (no switch, no copies)."""
    monkeypatch.setattr(pointwise_module, "SWITCH_MIN_POSITIONS", REAL_SWITCH_MIN_POSITIONS)
    layer = make()
    small, large = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 12, 12)  # 64 and 144 positions
    assert not pointwise_module.switches_layout(small) and pointwise_module.switches_layout(large)
    converted: list[torch.Tensor] = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **k: converted.append(t) or real_contiguous(t, *a, **k))
    y = layer(small)
    assert converted == [] and y.is_contiguous()
    monkeypatch.undo()
    torch.testing.assert_close(y, layer.to_conv()(small), rtol=1e-5, atol=1e-5)
