"""Render a :class:`ttcompress.report.Report`: rich table, Markdown, CSV or JSON (plots: :mod:`ttcompress.plot`).

Rendering never measures anything; it only formats the report's data.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Literal

from ttcompress.layer_report import format_label
from ttcompress.report import ModelRow, Report, pareto_front

__all__ = ["FORMATS", "render", "to_csv", "to_json", "to_markdown", "to_rich_tables"]

Format = Literal["table", "md", "csv", "json"]
FORMATS: tuple[str, ...] = ("table", "md", "csv", "json")

# Columns of the model table: (header, key, formatter).
_JSON_KEYS = (
    "model",
    "params",
    "compression",
    "size_bytes",
    "flops",
    "latency_ms",
    "latency_iqr_ms",
    "accuracy",
    "top5",
    "accuracy_delta",
    "accuracy_before_finetune",
    "setting",
    "path",
)


def _num(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def _flops(value: int) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} FLOP"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _delta(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.2f} pp"


def _latency(row: ModelRow) -> str:
    if row.latency_ms is None:
        return "–"
    return f"{row.latency_ms:.3f} ± {row.latency_iqr_ms / 2:.3f}" if row.latency_iqr_ms is not None else f"{row.latency_ms:.3f}"


def _columns(report: Report) -> list[tuple[str, Any]]:
    has_top5 = any(row.top5 is not None for row in report.rows)
    has_before = any(row.accuracy_before_finetune is not None for row in report.rows)
    cols: list[tuple[str, Any]] = [
        ("model", lambda r: r.model + (" (baseline)" if r.is_baseline and "baseline" not in r.model else "")),
        ("params", lambda r: _num(r.params)),
        ("compression", lambda r: f"{r.compression:.2f}×"),
        ("file size", lambda r: _size(r.size_bytes)),
        ("FLOPs", lambda r: _flops(r.flops)),
        ("latency ms", _latency),
    ]
    if has_before:
        cols.append(("top-1 pre-FT", lambda r: _pct(r.accuracy_before_finetune)))
    cols.append(("top-1", lambda r: _pct(r.accuracy)))
    if has_top5:
        cols.append(("top-5", lambda r: _pct(r.top5)))
    cols.append(("Δ top-1", lambda r: _delta(r.accuracy_delta)))
    return cols


_LAYER_COLUMNS: list[tuple[str, Any]] = [
    ("model", None),
    ("layer", lambda l: l.name),
    ("format", lambda l: format_label(l.format)),
    ("ranks", lambda l: l.structure),
    ("params", lambda l: f"{l.params_before:,} → {l.params_after:,}"),
    ("ratio", lambda l: f"{l.ratio:.2f}×"),
    ("rel. error", lambda l: "–" if l.rel_error is None else f"{l.rel_error:.4f}"),
]


def _layer_table(report: Report) -> list[list[str]]:
    body = []
    for row in report.rows:
        for layer in row.layers:
            body.append([row.model] + [fmt(layer) for _, fmt in _LAYER_COLUMNS[1:]])
    return body


def _caption(report: Report) -> str:
    parts = [f"dataset: {report.dataset or '–'}"]
    if report.eval_samples is not None:
        parts.append(
            f"a class-balanced subset of {report.eval_samples:,} test samples"
            if report.eval_subset
            else f"{report.eval_samples:,} test samples"
        )
    parts.append(f"device: {report.device}")
    if any(row.latency_ms is not None for row in report.rows):
        parts.append(f"FLOPs per sample; latency: median ± IQR/2 of one forward pass on a batch of {report.batch_size}")
    parts.append(f"torch {report.torch_version}")
    return ", ".join(parts)


def to_markdown(report: Report) -> str:
    """GitHub-flavoured Markdown: the model table, then the per-layer table."""

    def table(headers: list[str], body: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
        return lines

    cols = _columns(report)
    lines = [f"_{_caption(report)}_", ""]
    lines += table([h for h, _ in cols], [[fmt(r) for _, fmt in cols] for r in report.rows])
    layers = _layer_table(report)
    if layers:
        lines += ["", "**Decomposed layers**", ""]
        lines += table([h for h, _ in _LAYER_COLUMNS], layers)
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> str:
    """A JSON list with one object per model (raw numbers; accuracy as a fraction 0..1)."""
    rows = []
    for row in report.rows:
        data = row.to_dict()
        item = {key: data[key] for key in _JSON_KEYS}
        item.update(
            is_baseline=row.is_baseline,
            dataset=report.dataset,
            device=report.device,
            batch_size=report.batch_size,
            eval_samples=report.eval_samples,
            eval_subset=report.eval_subset,
            layers=data["layers"],
        )
        rows.append(item)
    return json.dumps(rows, indent=2) + "\n"


def to_csv(report: Report) -> str:
    """One CSV line per model with raw numbers (per-layer details are in JSON/Markdown)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*_JSON_KEYS, "is_baseline"], lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        data = row.to_dict()
        writer.writerow({**{key: data[key] for key in _JSON_KEYS}, "is_baseline": row.is_baseline})
    return buffer.getvalue()


def to_rich_tables(report: Report) -> list[Any]:
    """Rich renderables: the model table and, if any model is decomposed, the layer table."""
    from rich.table import Table

    cols = _columns(report)
    models = Table(title="ttcompress report", caption=_caption(report))
    for i, (header, _) in enumerate(cols):
        models.add_column(header, justify="left" if i == 0 else "right")
    for row in report.rows:
        models.add_row(*(fmt(row) for _, fmt in cols), style="bold" if row.is_baseline else None)
    tables = [models]
    body = _layer_table(report)
    if body:
        layers = Table(title="Decomposed layers")
        for i, (header, _) in enumerate(_LAYER_COLUMNS):
            layers.add_column(header, justify="left" if i < 4 else "right")
        for line in body:
            layers.add_row(*line)
        tables.append(layers)
    return tables


def render(report: Report, fmt: Format) -> str:
    """Text of the report in ``fmt`` (``table`` renders the rich tables to plain text)."""
    if fmt == "md":
        return to_markdown(report)
    if fmt == "csv":
        return to_csv(report)
    if fmt == "json":
        return to_json(report)
    if fmt == "table":
        from rich.console import Console

        console = Console(file=io.StringIO(), width=160, record=True)
        for table in to_rich_tables(report):
            console.print(table)
        return console.export_text()
    raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
