"""Commands that take a model file default --data to the built-in dataset the file records, and refuse a
default dataset the model cannot take in one line before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ttcompress
from ttcompress.cli import app
from ttcompress.cli.recorded import check_default_data
from ttcompress.errors import UserInputError


def _saved(tmp_path, info):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    path = tmp_path / "m.pt"
    ttcompress.save(model, path, info=info)
    return path


@pytest.mark.parametrize("command", [["finetune", "-o", "OUT"], ["report", "MODEL"]])
def test_a_default_dataset_the_model_cannot_take_is_one_line_before_any_work(tmp_path, command) -> None:
    path = _saved(tmp_path, {"input_shape": [3, 224, 224], "source_path": str(tmp_path / "missing.pt")})
    args = [str(path) if a == "MODEL" else str(tmp_path / "o.pt") if a == "OUT" else a for a in command]
    result = CliRunner().invoke(app, [command[0], str(path), *args[1:]])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "takes inputs of shape [3, 224, 224]" in lines[0] and "pass --data" in lines[0]
    assert not (tmp_path / "o.pt").exists()


def test_the_recorded_builtin_dataset_is_the_default(tmp_path) -> None:
    assert check_default_data(_saved(tmp_path, {"dataset": "cifar10", "input_shape": [3, 32, 32]}), None) == "cifar10"
    assert check_default_data(_saved(tmp_path, {"dataset": "tensors:/etc/x"}), None) == "mnist-5k"  # never a path
    assert check_default_data(_saved(tmp_path, {"input_shape": [3, 224, 224]}), "imagefolder:x") == "imagefolder:x"
    with pytest.raises(UserInputError, match=r"default dataset cifar10 has \[3, 32, 32\]"):
        check_default_data(_saved(tmp_path, {"dataset": "cifar10", "input_shape": [1, 28, 28]}), None)


def test_the_default_reads_the_header_once(tmp_path, monkeypatch) -> None:
    import ttcompress.cli.recorded as recorded

    path = _saved(tmp_path, {"dataset": "cifar10", "input_shape": [3, 32, 32]})
    calls = []
    read = recorded.read_header
    monkeypatch.setattr(recorded, "read_header", lambda p: calls.append(p) or read(p))
    assert check_default_data(path, None) == "cifar10"
    assert len(calls) == 1
