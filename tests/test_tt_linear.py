"""TTLinear: equivalence with nn.Linear, contraction plans, gradients, config, autocast, compile."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ttcompress.layers.tt_linear as tt_module
from ttcompress.decompose.tt import tt_param_count
from ttcompress.layers._tt_chain import tt_chain
from ttcompress.layers.tt_linear import TTLinear, contraction_plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def _linear(in_f: int, out_f: int, *, bias: bool, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    if bias:  # nn.Linear's bias can be tiny next to W x; make it matter
        nn.init.normal_(lin.bias)
    return lin


def _dense_reference(layer: TTLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 x @ W^T + b with W built from the cores."""
    w = layer.dense_weight().detach().double()
    b = None if layer.bias is None else layer.bias.detach().double()
    return F.linear(x.double(), w, b)


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(("in_f", "out_f"), [(131, 97), (10, 1000), (4096, 10), (1, 5), (64, 48)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 3)])  # 2-D and 3-D inputs
def test_full_rank_from_linear_reproduces_linear(in_f: int, out_f: int, bias: bool, lead) -> None:
    lin = _linear(in_f, out_f, bias=bias)
    layer = TTLinear.from_linear(lin, ranks=10**6)
    x = torch.randn(*lead, in_f)
    y = layer(x).detach()
    assert y.shape == (*lead, out_f) and y.dtype == torch.float32
    assert _rel(y, lin(x).detach()) <= 1e-5
    assert layer.rel_error is not None and layer.rel_error <= 1e-6
    back = layer.to_linear()
    assert isinstance(back, nn.Linear) and (back.bias is None) == (not bias)
    assert _rel(back.weight.detach(), lin.weight.detach()) <= 1e-5


_ALL_GROUPINGS = [((0, 3),), ((0, 1), (1, 3)), ((0, 2), (2, 3)), ((0, 1), (1, 2), (2, 3))]


def _force_plan(monkeypatch, groups, chunk_rows=None) -> None:
    """Make every TTLinear forward use the given core grouping (and row chunk)."""

    def plan(rows, out_modes, in_modes, ranks, *, chunked=False):
        return tt_module.ContractionPlan(groups=groups, dense=len(groups) == 1, flops=0, dense_flops=0,
                                         chunk_rows=chunk_rows or max(rows, 1))

    monkeypatch.setattr(tt_module, "contraction_plan", plan)


def _padded_layer(dtype=torch.float32) -> TTLinear:
    # 60 -> 45 with modes 4*4*4 = 64 and 4*4*3 = 48: both sides zero-padded
    return TTLinear(60, 45, ranks=(1, 3, 5, 1), in_modes=(4, 4, 4), out_modes=(4, 4, 3), dtype=dtype)


@pytest.mark.parametrize("groups", _ALL_GROUPINGS)
@pytest.mark.parametrize(("rows", "chunk_rows"), [(1, None), (7, None), (7, 3)])
def test_every_grouping_matches_dense_reference(groups, rows: int, chunk_rows, monkeypatch) -> None:
    torch.manual_seed(1)
    layer = _padded_layer()
    x = torch.randn(rows, 60)
    _force_plan(monkeypatch, groups, chunk_rows)
    assert _rel(layer(x).detach(), _dense_reference(layer, x)) <= 1e-5


@pytest.mark.parametrize("rows", [1, 5, 64, 1000])
def test_automatic_plan_matches_dense_reference(rows: int) -> None:
    torch.manual_seed(1)
    layer = TTLinear(256, 256, ranks=4, in_modes=(4, 4, 4, 4), out_modes=(4, 4, 4, 4))
    x = torch.randn(rows, 256)
    assert _rel(layer(x).detach(), _dense_reference(layer, x)) <= 1e-5


def test_plans_choose_tt_or_dense_path_by_cost() -> None:
    layer = TTLinear(4096, 4096, ranks=8, in_modes=(8,) * 4, out_modes=(8,) * 4)
    plan = layer.forward_plan(256)
    assert not plan.dense and plan.flops < 0.3 * plan.dense_flops
    # full-rank 2-core layer: from 64 rows on the TT contraction needs more FLOPs than building W
    # and one matmul -> dense path; for a single row, building W (784^3 MACs) is the dearer part.
    full = TTLinear(784, 784, ranks=10**6, in_modes=(28, 28), out_modes=(28, 28))
    for rows in (64, 1000):
        assert full.forward_plan(rows).dense
        assert full.forward_plan(rows).flops == full.forward_plan(rows).dense_flops
    assert not full.forward_plan(1).dense
    for groups in (layer.forward_plan(1).groups, plan.groups):  # groups partition the cores
        assert groups[0][0] == 0 and groups[-1][1] == 4
        assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    # on CPU the chunk keeps one chunk's largest intermediate near the budget
    assert plan.chunk_rows * 64 * 8 * 64 <= tt_module._CPU_CHUNK_ELEMENTS
    assert contraction_plan(256, (8,) * 4, (8,) * 4, layer.ranks, chunked=False).chunk_rows == 256


@pytest.mark.parametrize("groups", _ALL_GROUPINGS)
def test_gradcheck_float64(groups, monkeypatch) -> None:
    torch.manual_seed(2)
    layer = TTLinear(7, 11, ranks=(1, 2, 3, 1), in_modes=(2, 2, 2), out_modes=(3, 2, 2), dtype=torch.float64)
    _force_plan(monkeypatch, groups, chunk_rows=2)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()), eps=1e-6, atol=1e-6)


def _grads(layer: TTLinear, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad_out)
    grads = [p.grad.clone() for p in layer.parameters()]
    return grads + ([x.grad.clone()] if x.requires_grad else [])


@pytest.mark.parametrize("groups", tt_module._compositions(4)[1:])  # every multi-group plan of 4 cores
@pytest.mark.parametrize("x_grad", [True, False])
def test_chain_gradients_equal_dense_path_every_grouping(groups, x_grad: bool, monkeypatch) -> None:
    """The permute-free contraction (custom backward) gives the dense path's output and gradients."""
    torch.manual_seed(3)
    layer = TTLinear(29, 41, ranks=(1, 2, 3, 2, 1), in_modes=(2, 3, 1, 5), out_modes=(3, 1, 4, 4),
                     dtype=torch.float64)
    x = torch.randn(2, 3, 29, dtype=torch.float64, requires_grad=x_grad)
    grad_out = torch.randn(2, 3, 41, dtype=torch.float64)
    _force_plan(monkeypatch, ((0, 4),))
    y_ref, ref = layer(x).detach(), _grads(layer, x, grad_out)
    _force_plan(monkeypatch, groups, chunk_rows=4)  # 6 rows: one full chunk and one partial
    assert _rel(layer(x).detach(), y_ref) <= 1e-12
    for got, want in zip(_grads(layer, x, grad_out), ref, strict=True):
        assert _rel(got, want) <= 1e-12


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("wanted", ["all", "weights", "input"])
def test_chain_gradcheck_direct(chunk_rows: int, wanted: str) -> None:
    """tt_chain's own backward against finite differences, for the inputs and the group matrices:
    chunks that divide the rows, that leave a shorter last chunk (its per-row weight-gradient
    products add into the first rows of the full chunks' accumulator), one chunk, and only some
    operands requiring grad."""
    torch.manual_seed(5)
    # groups [0,1), [1,3), [3,4) of cores with modes out (2,3,1,2), in (3,1,2,2), ranks (1,2,3,2,1)
    dims = ((1, 3, 1, 2, 2, 6), (3, 2, 2, 3, 2, 2), (6, 2, 2, 2, 1, 1))
    mats = [torch.randn(r_a * m_g, n_g * r_b, dtype=torch.float64, requires_grad=wanted != "input")
            for _, n_g, r_a, m_g, r_b, _ in dims]
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=wanted != "weights")
    y = tt_chain(x, mats, dims, chunk_rows=chunk_rows)
    assert y.is_contiguous() and y.shape == (5, 12)
    assert torch.autograd.gradcheck(lambda inp, *ms: tt_chain(inp, ms, dims, chunk_rows=chunk_rows),
                                    (x, *mats))
    # the bias, added by the chain's last matmul
    bias = torch.randn(12, dtype=torch.float64, requires_grad=wanted != "input")
    torch.testing.assert_close(tt_chain(x, mats, dims, chunk_rows=chunk_rows, bias=bias), y + bias,
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda inp, b, *ms: tt_chain(inp, ms, dims, chunk_rows=chunk_rows, bias=b), (x, bias, *mats))


# ---------------------------------------------------------------------------- init and sizes
@pytest.mark.parametrize(("in_f", "out_f", "ranks"), [(512, 256, 8), (1024, 1024, 4), (97, 131, 6)])
def test_random_init_has_linear_variance(in_f: int, out_f: int, ranks: int) -> None:
    torch.manual_seed(4)
    variances = [TTLinear(in_f, out_f, ranks=ranks).dense_weight().detach().var().item() for _ in range(8)]
    target = 1.0 / (3 * in_f)  # nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))
    assert sum(variances) / len(variances) == pytest.approx(target, rel=0.25)


@pytest.mark.parametrize("bias", [True, False])
def test_param_count_dense_params_and_ratio(bias: bool) -> None:
    layer = TTLinear(131, 97, ranks=5, d=3, bias=bias)
    count = tt_param_count(layer.in_modes, layer.out_modes, layer.ranks)
    assert count == sum(layer.ranks[k] * layer.out_modes[k] * layer.in_modes[k] * layer.ranks[k + 1]
                        for k in range(3))
    assert sum(c.numel() for c in layer.cores) == count
    assert layer.dense_params == 131 * 97 + (97 if bias else 0)
    assert layer.compression_ratio == pytest.approx(layer.dense_params / (count + (97 if bias else 0)))
    text = repr(layer)
    for part in (f"in_modes={layer.in_modes}", f"ranks={layer.ranks}", "params=", "ratio="):
        assert part in text


def test_config_round_trip() -> None:
    lin = _linear(100, 30, bias=True)
    layer = TTLinear.from_linear(lin, eps=0.3, d=3)
    config = json.loads(json.dumps(layer.config()))
    rebuilt = TTLinear(**config)
    assert rebuilt.config() == layer.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, 100)
    torch.testing.assert_close(rebuilt(x), layer(x))
    assert rebuilt.rel_error is None and "rel_error" not in layer.state_dict()


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_from_linear_eps_bounds_error(eps: float) -> None:
    lin = _linear(96, 80, bias=False)
    layer = TTLinear.from_linear(lin, eps=eps)
    assert layer.rel_error <= eps
    assert _rel(layer.to_linear().weight.detach(), lin.weight.detach()) <= eps + 1e-5


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"ranks": 0}, ValueError, "ranks"),
    ({"ranks": -2}, ValueError, "ranks"),
    ({"ranks": (1, 0, 1), "d": 2}, ValueError, "ranks"),
    ({"ranks": 2, "in_modes": (4, 4), "out_modes": (4, 4)}, ValueError, "in_modes"),
    ({"ranks": 2, "in_modes": (8, 8), "out_modes": (4, 4)}, ValueError, "out_modes"),
    ({"ranks": 2, "in_modes": (8, 8), "out_modes": (4, 4, 2)}, ValueError, "out_modes"),
    ({"ranks": 2, "d": 0}, ValueError, "d"),
    ({"ranks": None}, ValueError, "ranks"),
    ({"ranks": "8"}, TypeError, "ranks"),
])
def test_constructor_bad_input(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        TTLinear(64, 32, **kwargs)


@pytest.mark.parametrize(("in_f", "out_f", "match"), [(0, 4, "in_features"), (4, -1, "out_features")])
def test_constructor_bad_sizes(in_f, out_f, match) -> None:
    with pytest.raises(ValueError, match=match):
        TTLinear(in_f, out_f, ranks=2)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({}, ValueError, "ranks.*eps"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": 1.0}, ValueError, "eps"),
    ({"eps": 2.5}, ValueError, "eps"),
    ({"ranks": 0}, ValueError, "ranks"),
    ({"ranks": 4, "in_modes": (3, 3)}, ValueError, "in_modes"),
])
def test_from_linear_bad_input(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        TTLinear.from_linear(nn.Linear(16, 8), **kwargs)


def test_from_linear_rejects_non_linear_and_non_2d_weight() -> None:
    with pytest.raises(TypeError, match="linear"):
        TTLinear.from_linear(nn.Conv2d(3, 3, 1), ranks=2)
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="weight"):
        TTLinear.from_linear(lin, ranks=2)


def test_forward_rejects_wrong_input_size() -> None:
    with pytest.raises(ValueError, match="in_features"):
        TTLinear(16, 8, ranks=2)(torch.randn(3, 15))


# ---------------------------------------------------------------------------- runtimes
@pytest.mark.parametrize("rows", [4, 500])  # TT path and dense path
def test_autocast_bf16_cpu(rows: int) -> None:
    torch.manual_seed(5)
    layer = TTLinear(64, 48, ranks=4, in_modes=(4, 4, 4), out_modes=(4, 4, 3))
    x = torch.randn(rows, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.detach().float(), layer(x).detach()) <= 3e-2
    y.float().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend: str) -> None:
    torch.manual_seed(6)
    torch._dynamo.reset()
    layer = TTLinear(30, 20, ranks=3, in_modes=(2, 3, 5), out_modes=(2, 2, 5))
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(3, 30, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert x.grad is not None and layer.cores[0].grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    lin = _linear(131, 97, bias=True)
    layer = TTLinear.from_linear(lin, ranks=6, d=3)
    x = torch.randn(8, 131)
    gpu = TTLinear.from_linear(lin.cuda(), ranks=6, d=3)
    assert gpu.cores[0].is_cuda
    torch.testing.assert_close(gpu(x.cuda()).cpu(), layer(x), rtol=1e-4, atol=1e-4)


def test_weight_grad_accumulator_takes_a_shorter_chunk_in_place() -> None:
    """Per-row products of a full chunk, then a shorter one: added into the first rows, then summed.

    The accumulator holds the transposed gradient (state first, the layout MKL reads fastest).
    """
    from ttcompress.layers._tt_chain import _accumulate_weight_grad, _finish_weight_grad

    torch.manual_seed(7)
    g1, s1 = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    g2, s2 = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    acc = _accumulate_weight_grad(None, g1, s1)
    assert acc is not None and acc.shape == (4, 5, 3)
    same = _accumulate_weight_grad(acc, g2, s2)
    assert same is acc  # still the per-row accumulator, no early fold
    want = torch.einsum("prq,pkq->rk", torch.cat([g1, g2]), torch.cat([s1, s2]))
    torch.testing.assert_close(_finish_weight_grad(acc), want, rtol=1e-12, atol=1e-12)


def test_chain_bias_when_the_first_group_is_a_plain_matmul() -> None:
    """Output modes (4, 1): the first group's state is 2-D, so the bias goes through ``addmm``."""
    torch.manual_seed(8)
    dims = ((1, 2, 1, 4, 2, 1), (2, 3, 2, 1, 1, 1))
    mats = [torch.randn(4, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, dtype=torch.float64, requires_grad=True)]
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = tt_chain(x, mats, dims, chunk_rows=2, bias=bias)
    torch.testing.assert_close(y, tt_chain(x, mats, dims, chunk_rows=2) + bias, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda inp, b, *ms: tt_chain(inp, ms, dims, chunk_rows=2, bias=b),
                                   (x, bias, *mats))


def test_per_sample_gradients_with_torch_func() -> None:
    """Under torch.func transforms the layer uses plain ops (its autograd function does not support
    them): vmap(grad(...)) runs and equals one backward per sample."""
    from test_pointwise import assert_per_sample_gradients  # tests/ is on sys.path under pytest

    torch.manual_seed(9)
    layer = TTLinear(30, 20, ranks=3, in_modes=(2, 3, 5), out_modes=(2, 2, 5))
    assert_per_sample_gradients(layer, torch.randn(4, 30))


@pytest.mark.parametrize("chunk_rows", [2, 5])
def test_chain_gradgradcheck(chunk_rows: int) -> None:
    """Double backward (create_graph=True) goes through a differentiable recomputation: exact."""
    torch.manual_seed(10)
    dims = ((1, 3, 1, 2, 2, 6), (3, 2, 2, 3, 2, 2), (6, 2, 2, 2, 1, 1))
    mats = [torch.randn(r_a * m_g, n_g * r_b, dtype=torch.float64, requires_grad=True)
            for _, n_g, r_a, m_g, r_b, _ in dims]
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda inp, b, *ms: tt_chain(inp, ms, dims, chunk_rows=chunk_rows, bias=b), (x, bias, *mats))
