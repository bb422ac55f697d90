"""Per-layer tables shared by ``decompose``, ``inspect`` and ``decompose --dry-run`` (rich tables on stdout).

A relative error above :data:`ttcompress.compression.dryrun.LARGE_ERROR` is flagged (``!``) with a note.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from ttcompress.cli._common import out
from ttcompress.compression.dryrun import LARGE_ERROR, LayerPreview, PlanPreview
from ttcompress.formats import DENSE
from ttcompress.formats.base import ESTIMATE, EXACT, UPPER_BOUND
from ttcompress.layer_report import format_label
from ttcompress.report.render import BEYOND_ZERO, large_error_note, out_error_cell, weight_error_cell
from ttcompress.compression.pipeline import CompressionResult
from ttcompress.compression.summary import ModelSummary

__all__ = ["error_cell", "layer_table", "preview_error_cell", "preview_table", "print_table", "summary_table"]


def error_cell(error: float | None, *, estimate: bool = False) -> str:
    """``0.1234``, ``~0.1234`` for an estimate, with ``!`` above :data:`LARGE_ERROR`; ``–`` for none."""
    if error is None:
        return "–"
    return f"{'~' if estimate else ''}{error:.4f}{' !' if error > LARGE_ERROR else ''}"


def print_table(table: Table) -> None:
    """Print a table on stdout; when stdout is not a terminal, wide enough not to wrap cells."""
    if out.is_terminal:
        out.print(table)
    else:
        Console(width=max(out.width, 220), soft_wrap=True).print(table)


def layer_table(result: CompressionResult) -> Table:
    """The per-layer rich table of a compression run, with a total row."""
    table = Table(title="ttcompress decompose", show_footer=False,
                  caption=f"! = above {LARGE_ERROR:g} (output error when calibrated, else weight error); "
                          f"^ = weight error above {BEYOND_ZERO:g} (further from the dense weight than zero)")
    for col, just in (("layer", "left"), ("type", "left"), ("shape", "left"), ("format", "left"),
                      ("modes / ranks", "left"), ("params", "right"), ("ratio", "right"),
                      ("weight error", "right"), ("output error", "right"), ("time", "right"), ("note", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in result.records:
        params = f"{r.params_before:,}" if not r.compressed else f"{r.params_before:,} → {r.params_after:,}"
        table.add_row(
            r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else ""),
            r.type,
            "x".join(map(str, r.shape)),
            format_label(r.format),
            r.structure,
            params,
            f"{r.ratio:.2f}×" if r.compressed else "–",
            weight_error_cell(r) if r.compressed else "–",
            out_error_cell(r),
            f"{r.seconds:.2f}s" if r.seconds is not None and r.compressed else "–",
            "; ".join(x for x in (r.skipped or r.note or "", large_error_note(r.judged_error if r.compressed else None))
                      if x),
        )
    n = len(result.compressed)
    table.add_section()
    table.add_row(f"total ({n} of {len(result.records)} layers compressed)", "", "", "", "",
                  f"{result.params_before:,} → {result.params_after:,}", f"{result.ratio:.2f}×", "", "", "", "",
                  style="bold")
    return table


def _arch_text(arch: dict | None) -> str:
    """An architecture record in a few words (a Hugging Face config by its model type only)."""
    if not arch:
        return "not recorded (loads with --arch)"
    kwargs = dict(arch.get("kwargs") or {})
    if isinstance(kwargs.get("config"), dict) and str(arch["name"]).startswith("hf:"):
        return f"{arch['name']} ({kwargs['config'].get('model_type')} config)"
    return arch["name"] + (f" {json.dumps(kwargs)}" if kwargs else "")


def summary_table(summary: ModelSummary, *, title: str) -> Table:
    """Render a :class:`ModelSummary` as a rich table."""
    arch = _arch_text(summary.arch)
    caption = f"{summary.kind} · arch {arch} · {summary.total_params:,} params"
    table = Table(title=title, caption=caption)
    cols = ["layer", "type", "shape", "params", "share", "format"]
    cols += ["modes / ranks", "before", "weight error"] if summary.compressed else ["compressible", "suggestion"]
    calibrated = summary.compressed and any(r.out_error_after is not None for r in summary.layers)
    cols += ["output error"] if calibrated else []
    for c in cols:
        table.add_column(c, justify="right" if c in ("params", "share", "before", "weight error", "output error") else "left")
    for r in summary.layers:
        tied = f" = {r.tied_to}" if r.tied_to else ""
        share = "tied" if r.tied_to else f"{100 * r.share:.1f}%"
        row = [r.name, r.type, "x".join(map(str, r.shape)), f"{r.params:,}{tied}", share, format_label(r.format)]
        if summary.compressed:
            row += [r.structure, f"{r.params_before:,}" if r.params_before else "–", weight_error_cell(r)]
            row += [out_error_cell(r)] if calibrated else []
        else:
            row += ["yes" if r.compressible else f"no: {r.skipped}", r.suggestion or "–"]
        table.add_row(*row)
    if summary.other_params:
        table.add_row("(other parameters)", "", "", f"{summary.other_params:,}",
                      f"{100 * summary.other_params / max(summary.total_params, 1):.1f}%", "", *[""] * (len(cols) - 6))
    return table


#: How each kind of dry-run error is marked (:class:`~ttcompress.formats.base.ErrorPreview`).
_KIND_MARK = {EXACT: "", UPPER_BOUND: "≤", ESTIMATE: "~"}


def preview_error_cell(error: float | None, kind: str | None) -> str:
    """``0.1234`` (exact), ``≤0.1234`` (upper bound), ``~0.1234`` (estimate), ``!`` above :data:`LARGE_ERROR`."""
    if error is None:
        return "–"
    return f"{_KIND_MARK.get(kind or ESTIMATE, '~')}{error:.4f}{' !' if error > LARGE_ERROR else ''}"


def _preview_format(lp: LayerPreview) -> str:
    """``CP``, or ``auto → CP`` for the format ``auto`` would pick."""
    d = lp.decision
    if d.format == DENSE or lp.format == d.format:
        return format_label(d.format)
    return f"{d.format} → {format_label(lp.format)}"


def preview_table(preview: PlanPreview, *, title: str) -> Table:
    """A dry run's per-layer plan: format (``auto``'s pick), projected parameters, data-free weight
    error (exact, ``≤`` bound or ``~`` estimate), with a total row."""
    table = Table(title=title, caption=f"weight error without calibration data: exact (decomposed and measured), "
                                       f"≤ upper bound, ~ estimate (no decomposition); ! = above {LARGE_ERROR:g}")
    for col in ("layer", "type", "shape", "format", "params", "ratio", "weight error", "note"):
        table.add_column(col, justify="right" if col in ("params", "ratio", "weight error") else "left")
    for lp in preview.layers:
        d = lp.decision
        compressed = d.format != DENSE
        after = lp.params_after if compressed else None
        table.add_row(
            d.name, d.type, "x".join(map(str, d.shape)), _preview_format(lp),
            f"{d.params_before:,} → {after:,}" if after is not None else f"{d.params_before:,}",
            f"{d.params_before / max(after, 1):.2f}×" if after is not None else "–",
            preview_error_cell(lp.est_error, lp.error_kind),
            "; ".join(x for x in (d.skipped or ("ranks set by the error bound" if compressed and d.params_after is None
                                                else ""),
                                  large_error_note(lp.est_error)) if x),
        )  # fmt: skip
    n = sum(lp.decision.format != DENSE for lp in preview.layers)
    table.add_section()
    table.add_row(f"total ({n} of {len(preview.layers)} layers compressed, projected)", "", "", "",
                  f"{preview.params_before:,} → {preview.params_after:,}", f"{preview.ratio:.2f}×", "", "",
                  style="bold")
    return table
