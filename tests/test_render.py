"""Rendering of report data: every format, the Pareto front and the PNG plot."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ttcompress.render import render, to_json
from ttcompress.layer_report import LayerReport
from ttcompress.report import ModelRow, Report, pareto_front


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
    rows = json.loads(to_json(report))
    assert len(rows) == 4
    for key in ("model", "params", "compression", "size_bytes", "flops", "latency_ms", "accuracy", "accuracy_delta"):
        assert key in rows[0]
    assert rows[0]["is_baseline"] and not rows[1]["is_baseline"]
    assert rows[1]["accuracy"] == pytest.approx(0.97)
    assert rows[1]["accuracy_delta"] == pytest.approx(-0.01)
    assert rows[1]["compression"] == pytest.approx(4.0)
    assert rows[1]["layers"][0]["ratio"] == pytest.approx(10.0)


def test_csv_parses_back(report: Report) -> None:
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert [r["model"] for r in rows] == ["dense", "tt4", "tt2", "bad"]
    assert int(rows[2]["params"]) == 125
    assert float(rows[2]["accuracy_before_finetune"]) == pytest.approx(0.70)


def test_markdown_has_model_and_layer_tables(report: Report) -> None:
    text = render(report, "md")
    assert "| model | params | compression |" in text
    assert "dense (baseline)" in text
    assert "97.00%" in text and "-1.00 pp" in text
    assert "top-1 pre-FT" in text
    assert "**Decomposed layers**" in text and "1,000 → 100" in text


def test_rich_table_renders_as_text(report: Report) -> None:
    text = render(report, "table")
    assert "ttcompress report" in text and "tt2" in text and "Decomposed layers" in text


def test_unknown_format_is_a_value_error(report: Report) -> None:
    with pytest.raises(ValueError, match="format"):
        render(report, "xml")  # type: ignore[arg-type]
