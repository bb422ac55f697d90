"""A float16/bfloat16 compressed checkpoint loads in one dtype, as saved, and every command runs it.

Issue 20, defect 11: dense layers came back float32 beside float16 factorized ones, the model ran
on neither input, and every command blamed the data ("does not fit mnist-5k").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ttcompress import compress
from ttcompress.cli import app
from ttcompress.checkpoint.dtypes import model_dtype
from ttcompress.checkpoint.io import load, save
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import Plan, TTSettings

runner = CliRunner()
FAST = ["--epochs", "1", "--max-batches", "2", "--device", "cpu"]


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object):  # noqa: ANN201
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def half(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.dtype]:
    torch.manual_seed(0)
    model = compress(build_arch("seed-cnn"), Plan(tt=TTSettings(ranks=4)))  # features.0 stays dense
    path = tmp_path_factory.mktemp("half") / "cnn.tt.pt"
    save(model.to(request.param), path)
    return path, request.param


def test_loads_in_one_dtype_as_saved_and_runs_on_float32_inputs(half: tuple[Path, torch.dtype]) -> None:
    path, dtype = half
    model = load(path)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {dtype}
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.dtype == dtype and out.shape == (2, 10)
    plain = build_arch("seed-cnn")
    save(compress(plain, Plan(tt=TTSettings(ranks=4))), path.with_name("f32.tt.pt"))
    assert len(load(path.with_name("f32.tt.pt"))._forward_pre_hooks) == 0  # float32: no hook


def test_every_command_runs_a_half_checkpoint(half: tuple[Path, torch.dtype], tmp_path: Path) -> None:
    path, _dtype = half
    ok("report", path, path, "--eval-limit", "20", "--min-run-time", "0.01")
    ok("decompose", path, "--cp-ranks", "2", "--data", "mnist-5k", "--calib-samples", "16", "-o", tmp_path / "d.tt.pt")
    ok("finetune", path, "-o", tmp_path / "ft.pt", "--no-distill", *FAST)
    # fine-tuned with float32 master weights (float16 updates reach NaN within steps), saved float32
    assert model_dtype(load(tmp_path / "ft.pt")) == torch.float32


def test_a_mixed_dtype_model_is_a_dtype_error_not_a_data_error(tmp_path: Path) -> None:
    model = build_arch("seed-cnn")
    model.features[0].half()
    path = tmp_path / "mixed.pt"
    torch.save(model, path)
    result = invoke("report", path, path, "--trust-pickle", "--no-latency", "--eval-limit", "10")
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "has a dtype problem, not a data problem: its parameters are float16, float32" in line
    assert "does not fit" not in line and "Traceback" not in result.stderr
