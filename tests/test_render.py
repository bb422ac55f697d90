"""Rendering of report data: every format, the Pareto front and the PNG plot."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest

from ttcompress.report.render import render, to_json
from ttcompress.layer_report import LayerReport
from ttcompress.report.compare import ModelRow, Report, pareto_front


def _row(name: str, params: int, acc: float | None, *, base: bool = False, before: float | None = None) -> ModelRow:
    layers = () if base else (LayerReport("fc1", "tt", ranks=(1, 4, 4, 1), params_before=1000, params_after=100, rel_error=0.125),)
    return ModelRow(
        model=name,
        params=params,
        compression=1000 / params,
        size_bytes=4 * params + 100,
        flops=2 * params,
        latency_ms=1.5,
        latency_iqr_ms=0.1,
        accuracy=acc,
        top5=None,
        accuracy_delta=None if acc is None else acc - 0.98,
        is_baseline=base,
        accuracy_before_finetune=before,
        layers=layers,
        params_by_kind={"conv": 0, "linear": params - 10, "embedding": 0, "attention": 0, "other": 10},
        compression_by_kind={"conv": None, "linear": 990 / (params - 10), "embedding": None, "attention": None},
        batch_size=64,
        peak_memory_bytes=8 * params,
    )


@pytest.fixture
def report() -> Report:
    rows = (
        _row("dense", 1000, 0.98, base=True),
        _row("tt4", 250, 0.97, before=0.90),
        _row("tt2", 125, 0.95, before=0.70),
        _row("bad", 500, 0.90, before=0.85),  # dominated by tt4: less compression, lower accuracy
    )
    return Report(rows=rows, dataset="mnist-5k", device="cpu", batch_size=64, eval_samples=1000)


def test_pareto_front_marks_non_dominated_points() -> None:
    points = [(1.0, 98.0), (4.0, 97.0), (8.0, 95.0), (2.0, 90.0), (4.0, 96.0)]
    assert pareto_front(points) == [0, 1, 2]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # ties dominate nobody


def test_json_has_the_documented_keys_and_raw_numbers(report: Report) -> None:
    data = json.loads(to_json(report))
    meta, rows = data["meta"], data["rows"]
    assert meta["eval_samples"] == 1000 and meta["device"] == "cpu" and meta["batch_size"] == 64
    assert meta["torch_version"] and meta["ttcompress_version"]
    assert len(rows) == 4
    for key in ("model", "params", "compression", "size_bytes", "flops", "latency_ms", "accuracy", "accuracy_delta",
                "compression_conv", "compression_linear", "latency_per_sample_ms", "throughput", "peak_memory_bytes"):
        assert key in rows[0]
    assert rows[1]["compression_conv"] is None  # no conv layer in the model
    assert rows[1]["compression_linear"] == pytest.approx(990 / 240)  # full precision
    assert rows[1]["latency_per_sample_ms"] == pytest.approx(1.5 / 64)
    assert rows[1]["throughput"] == pytest.approx(64 / 1.5e-3)
    assert rows[0]["is_baseline"] and not rows[1]["is_baseline"]
    assert rows[1]["accuracy"] == pytest.approx(0.97)
    assert rows[1]["accuracy_delta"] == pytest.approx(-0.01)
    assert rows[1]["compression"] == pytest.approx(4.0)
    assert rows[1]["layers"][0]["ratio"] == pytest.approx(10.0)


def test_csv_parses_back_rounded_for_people(report: Report) -> None:
    text = render(report, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["model"] for r in rows] == ["dense", "tt4", "tt2", "bad"]
    assert int(rows[2]["params"]) == 125
    assert float(rows[2]["top1_pre_ft_pct"]) == pytest.approx(70.0)
    assert rows[1]["compression_linear"] == "4.125"  # 990/240 to 4 significant digits
    assert rows[1]["delta_top1_pp"] == "-1.0"  # not -1.0000000000000009
    assert "00000000" not in text and "9999999" not in text


def test_markdown_has_model_and_layer_tables(report: Report) -> None:
    text = render(report, "md")
    assert "| model | params | compression |" in text
    assert "dense (baseline)" in text
    assert "97.00%" in text and "-1.00 pp" in text
    assert "top-1 pre-FT" in text
    assert "**Layers**" in text and "1,000 → 100" in text


def test_rich_table_renders_as_text(report: Report) -> None:
    text = render(report, "table")
    assert "ttcompress report" in text and "tt2" in text and "Layers" in text


def test_unknown_format_is_a_value_error(report: Report) -> None:
    with pytest.raises(ValueError, match="format"):
        render(report, "xml")  # type: ignore[arg-type]


def test_layer_section_lists_dense_layers_flags_large_errors_and_shows_output_errors(report: Report) -> None:
    from ttcompress.compression.dryrun import LARGE_ERROR

    layers = (
        LayerReport("conv", "cp", ranks=(3,), params_before=900, params_after=90, rel_error=0.9),  # data-free: flagged
        LayerReport("fc1", "tt", ranks=(1, 4, 1), params_before=1000, params_after=100, rel_error=0.8,
                    out_error_before=0.7, out_error_after=0.05),  # calibrated: judged by the output error
        LayerReport("fc2", "dense", params_before=50, params_after=50, skipped="excluded by --exclude"),
    )
    row = dataclasses.replace(report.rows[1], layers=layers)
    text = render(dataclasses.replace(report, rows=(report.rows[0], row)), "md")
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| tt4 |")}
    assert "0.9000 !" in lines["conv"] and f"large error (> {LARGE_ERROR:g})" in lines["conv"]
    assert "0.7000 → 0.0500" in lines["fc1"] and "!" not in lines["fc1"] and "0.8000" in lines["fc1"]
    assert "| dense |" in lines["fc2"] and "excluded by --exclude" in lines["fc2"] and "| 50 |" in lines["fc2"]
    assert f"! = error above {LARGE_ERROR:g}" in text  # the threshold is documented under the table


def test_a_noisy_latency_is_marked_and_explained(report: Report) -> None:
    noisy = dataclasses.replace(report.rows[1], latency_iqr_ms=0.5)  # 33 % of the 1.5 ms median
    rep = dataclasses.replace(report, rows=(report.rows[0], noisy, *report.rows[2:]))
    md = render(rep, "md")
    assert "± 0.00391 ~" in md and "~ = latency spread over 10% of the median (tt4)" in md
    assert "~" not in render(report, "md")
    assert json.loads(to_json(rep))["rows"][1]["latency_noisy"] is True
