"""Render a :class:`ttcompress.report.compare.Report`: rich table, Markdown, CSV or JSON (plots: :mod:`ttcompress.report.plot`).

Rendering never measures anything; it only formats the report's data.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Literal

from ttcompress.compression.dryrun import LARGE_ERROR
from ttcompress.layer_report import LayerReport
from ttcompress.report.measure import KINDS, NOISY_SPREAD
from ttcompress.report.compare import ModelRow, Report, lower_is_better

__all__ = ["BEYOND_ZERO", "FORMATS", "large_error_note", "out_error_cell", "render", "to_csv", "to_json", "to_markdown",
           "to_rich_tables"]

Format = Literal["table", "md", "csv", "json"]
FORMATS: tuple[str, ...] = ("table", "md", "csv", "json")

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


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if value == float("inf") else f"{value:.2f}×"


def _per_sample(row: ModelRow) -> str:
    per = row.latency_per_sample_ms
    if per is None:
        return "–"
    spread = f" ± {row.latency_iqr_ms / 2 / row.batch_size:.3g}" if row.latency_iqr_ms is not None and row.batch_size else ""
    return f"{per:.3g}{spread}{' ~' if row.latency_noisy else ''}"


def _throughput(row: ModelRow) -> str:
    return "–" if row.throughput is None else f"{row.throughput:,.0f}"


def _kinds(report: Report) -> list[str]:
    """Layer kinds the baseline has (their compression gets a column)."""
    base = report.baseline.compression_by_kind
    return [k for k in KINDS if base.get(k) is not None]


def _columns(report: Report) -> list[tuple[str, Any]]:
    has_top5 = any(row.top5 is not None for row in report.rows)
    has_before = any(row.accuracy_before_finetune is not None for row in report.rows)
    has_speed = any(row.latency_ms is not None for row in report.rows)
    cols: list[tuple[str, Any]] = [
        ("model", lambda r: r.model + (" (baseline)" if r.is_baseline and "baseline" not in r.model else "")
         + (" (non-finite outputs!)" if r.non_finite else "")),
        ("params", lambda r: _num(r.params)),
        ("compression", lambda r: _ratio(r.compression)),
    ]
    cols += [(f"{kind} ×", lambda r, k=kind: _ratio(r.compression_by_kind.get(k))) for kind in _kinds(report)]
    cols += [("weights", lambda r: _size(r.size_bytes)), ("FLOPs", lambda r: _flops(r.flops))]
    if has_speed:
        cols += [("ms/sample", _per_sample), ("samples/s", _throughput), ("peak mem", lambda r: _size(r.peak_memory_bytes))]
    if report.metric_name is not None:
        cols.append((report.metric_name, lambda r: "–" if r.metric is None else f"{r.metric:.4g}"))
        if all(row.accuracy is None for row in report.rows):  # the metric instead of top-1 (no class labels)
            return cols
    if has_before:
        cols.append(("top-1 pre-FT", lambda r: _pct(r.accuracy_before_finetune)))
    cols.append(("top-1", lambda r: _pct(r.accuracy)))
    if has_top5:
        cols.append(("top-5", lambda r: _pct(r.top5)))
    cols.append(("Δ top-1", lambda r: _delta(r.accuracy_delta)))
    return cols


def large_error_note(error: float | None) -> str:
    """``large error (> 0.5)`` above :data:`ttcompress.compression.dryrun.LARGE_ERROR`, else empty."""
    return f"large error (> {LARGE_ERROR:g})" if error is not None and error > LARGE_ERROR else ""


def out_error_cell(layer: LayerReport) -> str:
    """``before → after`` relative output error on the calibration data, ``!`` when the after one is
    above :data:`~ttcompress.compression.dryrun.LARGE_ERROR` (``–`` without calibration)."""
    if layer.out_error_before is None or layer.out_error_after is None:
        return "–"
    flag = " !" if layer.out_error_after > LARGE_ERROR else ""
    return f"{layer.out_error_before:.4f} → {layer.out_error_after:.4f}{flag}"


#: A weight error above this is further from the dense weight than an all-zero weight.
BEYOND_ZERO = 1.0


def weight_error_cell(layer: LayerReport) -> str:
    """The weight error, the same in every table: ``!`` above :data:`~ttcompress.compression.dryrun.LARGE_ERROR`
    when it is what the layer is judged by (no calibration), ``^`` above 1 (:data:`BEYOND_ZERO`:
    further from the dense weight than zero; a calibrated layer is fitted to outputs, not weights)."""
    if layer.rel_error is None:
        return "–"
    flag = " !" if layer.out_error_after is None and layer.rel_error > LARGE_ERROR else ""
    beyond = " ^" if layer.rel_error > BEYOND_ZERO else ""
    return f"{layer.rel_error:.4f}{flag}{beyond}"


def _layer_note(layer: LayerReport) -> str:
    large = large_error_note(layer.judged_error) if layer.compressed else ""
    return "; ".join(x for x in (layer.skipped if not layer.compressed else layer.note, large) if x)


_LAYER_COLUMNS: list[tuple[str, Any]] = [
    ("model", None),
    ("layer", lambda l: l.name),
    ("format", lambda l: l.format),
    ("ranks", lambda l: l.structure if l.compressed else "–"),
    ("params", lambda l: f"{l.params_before:,} → {l.params_after:,}" if l.compressed else _num(l.params_before)),
    ("ratio", lambda l: f"{l.ratio:.2f}×" if l.compressed and l.ratio is not None else "–"),
    ("weight error", weight_error_cell),
    ("output error", out_error_cell),
    ("note", _layer_note),
]

#: What the per-layer section's columns mean (printed under it).
LAYER_LEGEND = (f"every Linear/Conv2d/Embedding/MultiheadAttention layer of each compressed model, dense ones with "
                f"the reason; weight error: relative Frobenius error of the decomposed weight; output error: "
                f"relative output error on the calibration data, data-free decomposition → fitted layer; "
                f"! = error above {LARGE_ERROR:g} (the output error when calibrated, else the weight error); "
                f"^ = weight error above {BEYOND_ZERO:g}: further from the dense weight than zero (a calibrated layer "
                f"is fitted to its outputs; judge it by the output error)")


def _layer_table(report: Report) -> list[list[str]]:
    body = []
    for row in report.rows:
        for layer in row.layers:
            body.append([row.model] + [fmt(layer) for _, fmt in _LAYER_COLUMNS[1:]])
    return body


def _caption(report: Report) -> str:
    parts = [f"dataset: {report.dataset or '–'}"]
    if report.data_split is not None:
        parts.append(f"test split: {report.data_split}")
    if report.dataset is not None and report.targets in ("none", "regression"):
        parts.append("no class labels: top-1 not defined")
    if lower_is_better(report.metric_name):
        parts.append(f"metric: {report.metric_name} (token-level, padding and the first position left out; lower is "
                     "better) on the test split")
    elif report.metric_name is not None:
        parts.append(f"metric: {report.metric_name}(outputs, targets) on the test split")
    if report.eval_samples is not None:
        parts.append(
            f"a class-balanced subset of {report.eval_samples:,} test samples"
            if report.eval_subset
            else f"{report.eval_samples:,} test samples"
        )
    bad = [row.model for row in report.rows if row.non_finite]
    if bad:
        parts.append(f"NaN/Inf outputs from {', '.join(bad)}: their accuracy means nothing")
    parts.append(f"device: {report.device}")
    if any(row.latency_ms is not None for row in report.rows):
        parts.append(f"FLOPs per sample; ms/sample: median ± IQR/2 of one forward pass on a batch of "
                     f"{report.batch_size}, divided by {report.batch_size}, the models timed in turn over the same "
                     "rounds; peak mem: weights + activations of that batch")
        noisy = [row.model for row in report.rows if row.latency_noisy]
        if noisy:
            parts.append(f"~ = latency spread over {NOISY_SPREAD:.0%} of the median ({', '.join(noisy)}): the machine "
                         "was busy, compare these timings with care or measure again")
    parts.append("weights: size of the weights alone (safetensors, no metadata)")
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
        lines += ["", "**Layers**", "", f"_{LAYER_LEGEND}_", ""]
        lines += table([h for h, _ in _LAYER_COLUMNS], layers)
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> str:
    """``{"meta": {...}, "rows": [...]}`` with full-precision numbers (accuracy as a fraction 0..1)."""
    return json.dumps(report.to_dict(), indent=2) + "\n"


def _round(value: Any, digits: int = 4) -> Any:
    """Numbers rounded for people: 4 significant digits, integers and None unchanged."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return value
        return float(f"{value:.{digits}g}")
    return value


def to_csv(report: Report) -> str:
    """One CSV line per model, numbers rounded for people (full precision: JSON)."""
    kinds = _kinds(report)
    columns: list[tuple[str, Any]] = [
        ("model", lambda r: r.model), ("is_baseline", lambda r: r.is_baseline), ("params", lambda r: r.params),
        ("compression", lambda r: r.compression),
        *[(f"compression_{k}", lambda r, k=k: r.compression_by_kind.get(k)) for k in kinds],
        ("weights_bytes", lambda r: r.size_bytes), ("flops", lambda r: r.flops),
        ("batch_size", lambda r: r.batch_size), ("latency_per_sample_ms", lambda r: r.latency_per_sample_ms),
        ("throughput_per_s", lambda r: r.throughput), ("peak_memory_bytes", lambda r: r.peak_memory_bytes),
        ("top1_pre_ft_pct", lambda r: None if r.accuracy_before_finetune is None else 100 * r.accuracy_before_finetune),
        ("top1_pct", lambda r: None if r.accuracy is None else 100 * r.accuracy),
        ("top5_pct", lambda r: None if r.top5 is None else 100 * r.top5),
        ("delta_top1_pp", lambda r: None if r.accuracy_delta is None else 100 * r.accuracy_delta),
        *([("metric", lambda r: r.metric)] if report.metric_name is not None else []),
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in columns])
    for row in report.rows:
        writer.writerow(["" if (v := _round(get(row))) is None else v for _, get in columns])
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
        layers = Table(title="Layers", caption=LAYER_LEGEND)
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
