"""`ttcompress demo`: a curve of at least 5 compressed points spanning at least 8x, in the quick mode's shape."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.demo import DemoSettings
from ttcompress.training.config import FinetuneConfig

#: Keys of report.json that docs/cli.md documents (``report``) and the demo's readers rely on.
ROW_KEYS = {"model", "params", "compression", "compression_conv", "compression_linear", "accuracy",
            "accuracy_before_finetune", "accuracy_delta", "size_bytes", "flops", "layers"}  # fmt: skip
META_KEYS = {"dataset", "eval_samples", "device", "batch_size", "torch_version", "ttcompress_version"}


def _curve_ok(ratios: list[float]) -> None:
    assert len(ratios) >= 5, f"a curve needs >= 5 compressed points, got {ratios}"
    assert max(ratios) / min(ratios) >= 8, f"the points must span >= 8x, got {ratios}"


def test_quick_mode_has_the_full_demos_shape() -> None:
    full, quick = DemoSettings(), DemoSettings.quick()
    assert quick.target_ratios == full.target_ratios and quick.formats == full.formats
    _curve_ok(list(full.target_ratios))
    assert max(full.target_ratios) >= 10


def test_the_demo_fine_tunes_with_the_library_defaults() -> None:
    config = DemoSettings().finetune_config()
    free = {"seed", "max_batches"}  # the demo's own, recorded in DemoSettings
    default = FinetuneConfig()
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in free} == \
        {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.name not in free}
    assert DemoSettings(finetune_epochs=1).finetune_config().epochs == 1


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


def test_demo_quick_writes_the_curve(quick_demo) -> None:
    out, result = quick_demo
    data = json.loads((out / "report.json").read_text())
    assert META_KEYS <= set(data["meta"])
    rows = data["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert rows[0]["is_baseline"] and rows[0]["compression"] == 1.0
    compressed = rows[1:]
    _curve_ok([row["compression"] for row in compressed])
    assert all(row["accuracy_before_finetune"] is not None and 0 <= row["accuracy"] <= 1 for row in compressed)
    assert all(row["layers"] for row in compressed)
    md = (out / "report.md").read_text()
    assert md.count("| target ×") >= 5 and "| model | params |" in md
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert "report.json" in result.stderr and "Layers" in result.stdout


def test_demo_runs_on_its_thread_count_and_restores_torch_s() -> None:
    import torch

    from ttcompress.demo import DemoSettings, _intra_op_threads

    assert DemoSettings().threads == 1
    before = torch.get_num_threads()
    with _intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with _intra_op_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"), _intra_op_threads(0):
        pass
