"""Built-in architectures: exact parameter counts, shapes, metadata and the name resolver."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttcompress.checkpoint.models import build_arch, list_archs
from ttcompress.errors import UserInputError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("seed-cnn", 65_148),
        ("lenet5", 61_706),
        ("seed-fc3", 11_638_814),  # TT thesis: 784-4096-2048-10 with BatchNorm1d after each layer
    ],
)
def test_builtin_param_counts(name: str, expected: int) -> None:
    model = build_arch(name)
    assert n_params(model) == expected
    assert model.ttcompress_meta["arch"] == {"name": name, "kwargs": {}}


def test_seed_fc3_count_by_hand() -> None:
    linear = (784 * 4096 + 4096) + (4096 * 2048 + 2048) + (2048 * 10 + 10)
    batchnorm = 2 * (4096 + 2048 + 10)
    assert linear + batchnorm == 11_638_814
    bns = [m for m in build_arch("seed-fc3").modules() if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in bns] == [4096, 2048, 10]


def test_seed_tt2_exact_thesis_count() -> None:
    pytest.importorskip("ttcompress.layers.tt_linear")
    model = build_arch("seed-tt2")
    assert n_params(model) == 791_294
    tt = [m for m in model.modules() if type(m).__name__ == "TTLinear"]
    assert [p.numel() for p in tt[0].cores] == [64, 512, 1792, 1024, 224]
    assert [p.numel() for p in tt[1].cores] == [160, 512, 256, 256, 32]
    assert tt[0].in_modes == (2, 2, 7, 4, 7) and tt[0].out_modes == (8, 16, 16, 16, 8)
    assert tt[1].out_modes == (5, 2, 1, 1, 1) and tt[0].ranks == (1, 4, 4, 4, 4, 1)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("seed-cnn", {}, (1, 28, 28)),
        ("seed-cnn", {"in_channels": 3, "input_size": 32, "num_classes": 7}, (3, 32, 32)),
        ("lenet5", {}, (1, 28, 28)),
        ("lenet5", {"in_channels": 3, "input_size": 32}, (3, 32, 32)),
        ("seed-fc3", {"hidden": [16, 8], "num_classes": 4}, (1, 28, 28)),
    ],
)
def test_forward_shapes(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    model = build_arch(name, kwargs=kwargs).eval()
    with torch.no_grad():
        y = model(torch.randn(3, *shape))
    assert y.shape == (3, kwargs.get("num_classes", 10))
    assert model.ttcompress_meta["arch"]["kwargs"] == kwargs


def test_torchvision_and_import_path() -> None:
    model = build_arch("torchvision:resnet18", kwargs={"num_classes": 3})
    assert model.fc.out_features == 3
    assert model.ttcompress_meta["arch"]["name"] == "torchvision:resnet18"
    lin = build_arch("torch.nn:Linear", kwargs={"in_features": 4, "out_features": 2})
    assert isinstance(lin, nn.Linear) and lin.ttcompress_meta["arch"]["kwargs"] == {"in_features": 4, "out_features": 2}


@pytest.mark.parametrize(
    ("name", "kwargs", "param", "match"),
    [
        ("resnet9000", None, "arch", "arch 'resnet9000' is unknown; choose from seed-cnn"),
        ("torchvision:nosuchnet", None, "arch", "unknown torchvision model"),
        ("no_such_pkg.mod:fn", None, None, "cannot import"),
        ("torch.nn:NoSuch", None, None, "no attribute"),
        ("collections:OrderedDict", None, "arch", "not an nn.Module"),
        ("seed-cnn", {"bogus": 1}, "arch_kwargs", "do not fit arch 'seed-cnn'.*unexpected keyword argument 'bogus'"),
        ("seed-cnn", {"input_size": 30}, "arch_kwargs", "input_size"),
        ("seed-cnn", {"x": object()}, "arch_kwargs", "JSON"),
        ("torchvision:resnet18", {"weights": "nope"}, "arch_kwargs", "do not fit arch"),  # torchvision's KeyError
        ("", None, "arch", "non-empty"),
    ],
)
def test_bad_arch(name: str, kwargs: dict | None, param: str | None, match: str) -> None:
    """A bad name or kwargs is a user error (a ValueError) naming the parameter, whatever the builder raised."""
    with pytest.raises(UserInputError, match=match) as info:
        build_arch(name, kwargs=kwargs)
    assert isinstance(info.value, ValueError)
    assert getattr(info.value, "param", None) == param


def test_list_archs() -> None:
    names = list_archs()
    assert {"seed-cnn", "seed-fc3", "seed-tt2", "lenet5", "torchvision:NAME"} <= set(names)
    assert "11,638,814" in names["seed-fc3"] and "791,294" in names["seed-tt2"]
