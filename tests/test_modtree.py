"""ttcompress.modtree: the one way to swap a child module, and the one eval-mode context manager."""

from __future__ import annotations

import pytest
from torch import nn

from ttcompress.modtree import eval_mode, replace_module, set_submodule


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))


def test_eval_mode_restores_every_module_own_flag() -> None:
    model, other = _model(), _model().eval()
    model[1].eval()  # a BatchNorm frozen inside a training model stays frozen
    with eval_mode(model, other):
        assert not any(m.training for m in (*model.modules(), *other.modules()))
    assert model.training and model[0].training and not model[1].training and model[2][0].training
    assert not any(m.training for m in other.modules())


def test_eval_mode_restores_after_an_error() -> None:
    model = _model()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())


def test_replace_module_keeps_a_shared_module_shared() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared)).eval()
    new = nn.Linear(2, 2)
    assert replace_module(model, shared, new) is model
    assert model[0] is new and model[2][0] is new and not new.training  # the flag of the module it replaces


def test_set_submodule_at_the_root_returns_the_new_root() -> None:
    model = nn.Linear(2, 2)
    new = nn.Linear(2, 2)
    assert set_submodule(model, "", new) is new
