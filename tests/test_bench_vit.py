"""``benchmarks/vit.py --quick`` end to end, so that the ViT benchmark cannot rot (issue 11 §7).

The script is loaded from its file (``benchmarks/`` is not a package); the quick mode trains a
tiny ViT for a few batches of ``mnist-5k``, so the accuracies are not checked against any level,
only the structure of what was compressed and measured.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ttcompress.layers.tt_linear import TTLinear
from ttcompress.compression.pipeline import compress_with_report

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vit.py"


@pytest.fixture(scope="module")
def vit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_vit", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vit"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("ra", "rm", "attention", "mlp"), [(2, None, 8, 0), (None, 2, 0, 4), (4, 2, 8, 4)])
def test_plan_compresses_only_the_named_part_at_its_rank(
    vit: ModuleType, ra: int | None, rm: int | None, attention: int, mlp: int
) -> None:
    torch.manual_seed(0)
    model = vit.small_vit(vit.QUICK).eval()
    x = torch.randn(2, 1, 28, 28)
    result = compress_with_report(model, vit.vit_plan(ra, rm), check_input=x)
    ranks = {r.name: max(r.ranks) for r in result.compressed}
    attn = [n for n in ranks if ".self_attention." in n]
    mlps = [n for n in ranks if ".mlp." in n]
    assert (len(attn), len(mlps), len(ranks)) == (attention, mlp, attention + mlp)
    assert all(ranks[n] == ra for n in attn) and all(ranks[n] == rm for n in mlps)
    assert type(model.heads.head) is torch.nn.Linear and type(model.conv_proj) is torch.nn.Conv2d
    assert sum(isinstance(m, TTLinear) for m in result.model.modules()) == attention + mlp
    assert result.model(x).shape == (2, 10)


def test_plan_needs_a_part(vit: ModuleType) -> None:
    with pytest.raises(ValueError, match="both be None"):
        vit.vit_plan(None, None)


def test_quick_mode_runs_end_to_end(vit: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vit.main(["--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    dense = results["dense"]
    rows = {r["label"]: r for r in results["rows"]}
    assert set(rows) == {"attention-r2", "mlp-r2", "both-r2", "mixed-a4-m2"}
    assert rows["both-r2"]["layers"] == rows["attention-r2"]["layers"] + rows["mlp-r2"]["layers"] == 12
    for r in rows.values():
        assert r["params"] < dense["params"] and r["compression"] > 1 and r["part_compression"] > 1
        for key in ("top1_uncalibrated", "top1_calibrated", "top1_finetuned"):
            assert 0.0 <= r[key] <= 1.0
    assert rows["both-r2"]["params"] < min(rows["attention-r2"]["params"], rows["mlp-r2"]["params"])
    for batch in ("64", "1"):
        timing = results["timing"][batch]
        assert set(timing) == {"dense", "dense, attention converted", *rows} and timing["dense"]["ratio"] == 1.0
        assert all(t["median_ms"] > 0 and t["ratio"] > 0 for t in timing.values())
    out = capsys.readouterr().out
    assert out == (tmp_path / "results.md").read_text() + "\n"
    assert "| attention | 2 |" in out and "| encoder block |" in out


def test_timing_only_times_every_configuration(vit: ModuleType, tmp_path: Path) -> None:
    assert vit.main(["--quick", "--timing-only", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert "rows" not in results
    labels = {vit.config_label(*c) for c in vit.configurations(vit.QUICK)}
    assert set(results["timing"]["1"]) == {"dense", "dense, attention converted", *labels}
    assert (tmp_path / "results.md").read_text().startswith("| encoder block |")
