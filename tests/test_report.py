"""Report data: params, ratio, FLOPs and accuracy checked against independent counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.data import DatasetBundle
from ttcompress.io import save
from ttcompress.plan import Plan, TTSettings
from ttcompress.layer_report import count_params
from ttcompress.report import ModelEntry, build_report, count_flops
from ttcompress.surgery import compress


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))


@pytest.fixture
def bundle() -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    ds = TensorDataset(x, y)
    return DatasetBundle(name="toy", train=ds, test=ds, num_classes=4, input_shape=(1, 8, 8), classes=tuple("abcd"))


def test_count_params_matches_a_hand_count() -> None:
    assert count_params(_mlp()) == 64 * 128 + 128 + 128 * 4 + 4


def test_flops_of_a_dense_mlp_are_two_per_multiply_add() -> None:
    assert count_flops(_mlp(), (1, 8, 8)) == 2 * (64 * 128 + 128 * 4)


def test_report_values_match_independent_counts(bundle: DatasetBundle, tmp_path) -> None:
    dense = _mlp()
    small = compress(_mlp(), Plan(tt=TTSettings(ranks=2)))
    path = save(small, tmp_path / "small.pt")
    report = build_report(
        baseline=ModelEntry("dense", dense),
        models=[ModelEntry("small", small, path=path)],
        data=bundle,
        min_run_time=0.01,
    )
    base, row = report.rows
    assert base.is_baseline and base.compression == 1.0 and base.accuracy_delta == 0.0
    n_small = sum(p.numel() for p in small.parameters())
    assert row.params == n_small
    assert row.compression == pytest.approx(base.params / n_small)
    assert row.size_bytes == path.stat().st_size
    # accuracy: an independent pass over the test set
    with torch.no_grad():
        x, y = bundle.test.tensors
        expected = (small.eval()(x).argmax(1) == y).float().mean().item()
    assert row.accuracy == pytest.approx(expected)
    assert row.accuracy_delta == pytest.approx(row.accuracy - base.accuracy)
    assert row.top5 is None  # 4 classes: no top-5
    assert row.latency_ms > 0 and row.latency_iqr_ms >= 0
    assert 0 < row.flops < base.flops
    names = [layer.name for layer in row.layers]
    assert names and all(layer.format == "tt" for layer in row.layers)
    assert sum(layer.params_before - layer.params_after for layer in row.layers) == base.params - row.params


def test_report_cli_formats_and_plot(tmp_path) -> None:
    from ttcompress.models import build_arch

    torch.manual_seed(0)
    dense = build_arch("seed-cnn")
    base_path = save(dense, tmp_path / "base.pt")
    small = compress(build_arch("seed-cnn"), Plan(tt=TTSettings(ranks=2)))
    small.load_state_dict(small.state_dict())
    small_path = save(small, tmp_path / "small.pt")
    runner = CliRunner()
    common = [str(base_path), str(small_path), "--eval-limit", "50", "--min-run-time", "0.01"]
    result = runner.invoke(app, ["report", *common, "--format", "json", "--plot", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == ["base", "small"]
    for key in ("model", "params", "compression", "size_bytes", "flops", "latency_ms", "accuracy", "accuracy_delta"):
        assert key in rows[1]
    assert 0.0 <= rows[1]["accuracy"] <= 1.0
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    result = runner.invoke(app, ["report", *common, "--no-latency", "--format", "md", "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    assert "| model | params |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "xml"], "--format"),
        (["--plot", "out.jpg"], "--plot"),
        (["--data", "nope"], "nope"),
    ],
)
def test_report_cli_bad_input_exits_2_without_output(tmp_path, args, message) -> None:
    from ttcompress.models import build_arch

    base = save(build_arch("seed-cnn"), tmp_path / "base.pt")
    result = CliRunner().invoke(app, ["report", str(base), str(base), "-o", str(tmp_path / "r.md"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.md").exists()


def test_report_cli_missing_model_exits_2(tmp_path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing.pt"), str(tmp_path / "also.pt")])
    assert result.exit_code == 2 and "missing.pt" in result.stderr
