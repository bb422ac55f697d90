"""Sequential calibration (GPTQ / SVD-LLM order) on small models."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ttcompress.calibration.fit import fit_layer
from ttcompress.calibration.sequential import calibrate_sequentially, forward_order
from ttcompress.calibration.stats import layer_stats

F64 = torch.float64


def _low_rank(dense: nn.Linear, rank: int) -> nn.Sequential:
    """Data-free rank-``rank`` SVD start: ``Sequential(Linear(in, r, bias=False), Linear(r, out))``."""
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    seq = nn.Sequential(nn.Linear(dense.in_features, rank, bias=False),
                        nn.Linear(rank, dense.out_features, bias=dense.bias is not None)).to(dense.weight)
    with torch.no_grad():
        seq[0].weight.copy_(vh[:rank])
        seq[1].weight.copy_(u[:, :rank] * s[:rank])
        if dense.bias is not None:
            seq[1].bias.copy_(dense.bias)
    return seq


def _build(rank: int):
    return lambda name, dense, stats: fit_layer(dense, _low_rank(dense, rank), stats)


def _non_sequential(dense_model: nn.Module, names: list[str], x: torch.Tensor, rank: int) -> nn.Module:
    """Each layer fitted on the dense model's own inputs (no compensation of earlier errors)."""
    model = copy.deepcopy(dense_model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [dense_model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        dense_model(x)
    for h in hooks:
        h.remove()
    for name in names:
        dense = dense_model.get_submodule(name)
        new = fit_layer(dense, _low_rank(dense, rank), layer_stats(dense, inputs[name])).module
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _anisotropic(n: int, shape: tuple[int, ...], dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, shape[-1], generator=gen, dtype=F64)
    z = torch.randn(n, *shape[:-1], dim, generator=gen, dtype=F64)
    return z @ basis + 0.05 * torch.randn(n, *shape, generator=gen, dtype=F64)


def test_three_layer_net_sequential_beats_non_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    x = _anisotropic(256, (20,), 6, seed=1)
    names = ["4", "0", "2"]  # any order: the forward order is found
    model = copy.deepcopy(net)
    report = calibrate_sequentially(net, model, names, _build(4), [x[:100], x[100:]])
    assert list(report) == ["0", "2", "4"]
    for rec in report.values():
        assert rec.reached and rec.method == "whitened-svd" and rec.samples == 256
        assert rec.error_after <= rec.error_before
    with torch.no_grad():
        y = net(x)
        seq_err = _rel(model(x), y)
        non_seq_err = _rel(_non_sequential(net, ["0", "2", "4"], x, 4)(x), y)
    assert isinstance(model[0], nn.Sequential)
    assert seq_err < 0.9 * non_seq_err


class _SeqModel(nn.Module):
    """A tiny sequence model: per-token MLP, token mixing, per-token head (Linear sees 3-D inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(12, 24)
        self.linear2 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 5)
        self.unused = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.linear2(torch.relu(self.linear1(x)))
        h = h + h.mean(dim=1, keepdim=True)
        return self.head(h)


def test_sequence_model_with_3d_inputs_and_an_unreached_layer():
    torch.manual_seed(2)
    net = _SeqModel().double()
    x = _anisotropic(64, (9, 12), 4, seed=3)
    names = ["linear1", "linear2", "head", "unused"]
    model = copy.deepcopy(net)
    seen: list[tuple[str, int, int]] = []
    report = calibrate_sequentially(net, model, names, _build(3), x,
                                    progress=lambda n, i, t: seen.append((n, i, t)))
    assert [s[0] for s in seen] == ["linear1", "linear2", "head"]
    assert report["linear1"].rows == 64 * 9
    assert not report["unused"].reached and isinstance(model.unused, nn.Linear)
    with torch.no_grad():
        y = net(x)
        seq_err = _rel(model(x), y)
        non_seq_err = _rel(_non_sequential(net, ["linear1", "linear2", "head"], x, 3)(x), y)
    assert seq_err < non_seq_err


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(10, 10)
        self.alias = self.block
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.block(torch.tanh(self.block(x)))))


def test_shared_module_is_compressed_once_and_a_bare_module_build_is_accepted():
    torch.manual_seed(4)
    net = _Shared().double()
    x = _anisotropic(80, (10,), 3, seed=5)
    model = copy.deepcopy(net)
    report = calibrate_sequentially(net, model, ["block", "alias", "out"],
                                    lambda n, d, s: _low_rank(d, 3), x)
    assert report["alias"].alias_of == "block"
    assert report["block"].rows == 160  # two calls per batch, paired in order
    assert report["block"].error_before is None and report["block"].error_after > 0
    assert model.block is model.alias and isinstance(model.block, nn.Sequential)
    assert torch.isfinite(model(x)).all()


def test_forward_order():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    assert forward_order(net, ["2", "0"], torch.randn(1, 3)) == ["0", "2"]
