"""Tucker2Conv2d in eval mode: the measured path (three convs or the cached dense kernel) is exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ttcompress.layers.tucker2_conv import Tucker2Conv2d

CONFIGS: dict[str, dict[str, Any]] = {
    "asym-stride-pad-dil": {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)},
    "same-even-dilated": {"kernel_size": (2, 4), "padding": "same", "dilation": (3, 2)},
    "no-bias": {"kernel_size": 3, "padding": 1, "bias": False},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "circular-same-even": {"kernel_size": (4, 3), "padding": "same", "padding_mode": "circular"},
    "1x1-stride": {"kernel_size": 1, "stride": 2},
    "groups-2": {"kernel_size": 3, "padding": 1, "groups": 2},
}


def _layer(config: str) -> Tucker2Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **CONFIGS[config]).double()
    return Tucker2Conv2d.from_conv(conv, in_rank=2, out_rank=2).eval()


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_eval_output_equals_the_reconstructed_conv(monkeypatch: pytest.MonkeyPatch, config: str, dense: bool) -> None:
    monkeypatch.setattr("ttcompress.layers.tucker2_conv.dense_wins", lambda d, f: dense)
    layer = _layer(config)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        want = layer.to_conv()(x)
    assert list(layer._eval_choice.values()) == [dense]
    assert (layer._kernel_cache is not None) == dense
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_eval_kernel_follows_weight_changes_and_grad_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ttcompress.layers.tucker2_conv.dense_wins", lambda d, f: True)
    layer = _layer("groups-2")
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.core.weight.mul_(-3.0)  # in place, no train() round trip
        torch.testing.assert_close(layer(x), layer.to_conv()(x), rtol=1e-10, atol=1e-10)
    out = layer(x)  # gradients wanted: the three convs, differentiable
    out.sum().backward()
    assert layer.first.weight.grad is not None and layer.core.weight.grad is not None
    layer.float()  # new storages and dtype: the cache and the timed choices are dropped
    assert layer._kernel_cache is None and layer._eval_choice == {}
    with torch.no_grad():
        assert layer(x.float()).dtype == torch.float32
