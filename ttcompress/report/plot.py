"""The accuracy/compression trade-off plot: one point per model, written as PNG, PDF or SVG.

What the marks mean (the legend repeats it):

* black star: the baseline (the dense model every ratio is relative to);
* filled circle: a compressed model after fine-tuning, red when it is on the Pareto front
  (no other model is both smaller and more accurate), blue otherwise;
* grey cross and arrow: the same model before fine-tuning, and what fine-tuning gained;
* dashed red line: the Pareto front.

The y axis is top-1 accuracy, or, for a report of ``--metric perplexity`` (a language model), the
perplexity (on a log scale when its largest value is over 4 times its smallest): lower is better
there, and the Pareto front is the models that no other model beats
in both compression and perplexity.

Labels are placed by measuring their rendered extents: each label tries a ring of offsets around
its point (with a leader line when it sits away from the point) and takes the first that stays
inside the axes, overlaps no other label, no point and no fine-tuning arrow, is not crossed by the
Pareto front, and lies nearer its own point than any other model's marks (so that it cannot be
read as a neighbour's). When some label finds no place, the axes get more room right of the
rightmost point (twice); when that is not enough (points clustered closer than their labels), the
names go in one column beside the cluster, in the order of their points' heights, each with a
leader line; when that does not fit either, every point is numbered and the names move into a key
beside the axes; when even the numbers find no place, each point gets its own marker and colour in
the legend. Nothing therefore overlaps, and the Pareto front is drawn above the markers. The
baseline's point is labelled ``baseline (dense)``, not with its file name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ttcompress.errors import UserInputError
from ttcompress.fsutil import atomic_write
from ttcompress.report.compare import ModelRow, Report, lower_is_better, pareto_front

__all__ = ["AXES", "PLOT_SUFFIXES", "plot_tradeoff", "tradeoff_figure"]

XAxis = Literal["params", "flops", "size", "latency"]

#: What ``x`` may be, and the axis label for each (every ratio is baseline / model, log scale).
AXES: dict[str, str] = {
    "params": "compression (parameters, baseline / model)",
    "flops": "FLOP reduction (baseline / model)",
    "size": "file size reduction (baseline / model)",
    "latency": "speed-up (baseline latency / model latency)",
}
#: Output formats, chosen by the file's extension.
PLOT_SUFFIXES: dict[str, str] = {".png": "png", ".pdf": "pdf", ".svg": "svg"}

_DPI = 150
#: What the baseline's point is called (its file name, often ``model``, says nothing).
BASELINE_LABEL = "baseline (dense)"
_NICE = (1, 2, 5)


@dataclass(frozen=True)
class _Point:
    row: ModelRow
    x: float
    y: float
    before: float | None


def _ratio(row: ModelRow, base: ModelRow, x: XAxis) -> float | None:
    """``baseline / row`` for the chosen quantity, or None when either side was not measured."""
    if x == "params":
        return row.compression
    pairs = {
        "flops": (base.flops, row.flops),
        "size": (base.size_bytes, row.size_bytes),
        "latency": (base.latency_ms, row.latency_ms),
    }
    num, den = pairs[x]
    if num is None or den is None or den <= 0 or num <= 0:
        return None
    return float(num) / float(den)


def _points(report: Report, x: XAxis) -> list[_Point]:
    base = report.baseline
    by_metric = lower_is_better(report.metric_name)
    points = []
    for row in report.rows:
        y = row.metric if by_metric else (None if row.accuracy is None else 100 * row.accuracy)
        if y is None:
            continue
        ratio = _ratio(row, base, x)
        if ratio is None:
            continue
        before = None if (by_metric or row.accuracy_before_finetune is None) else 100 * row.accuracy_before_finetune
        points.append(_Point(row, ratio, y, before))
    return points


def front_indices(points: Sequence[_Point], *, lower: bool = False) -> set[int]:
    """The compressed models (not the baseline) on the Pareto front of (compression, y): higher
    compression and higher y are better, or lower y with ``lower`` (perplexity)."""
    ys = [(p.x, -p.y if lower else p.y) for p in points]
    return {i for i in pareto_front(ys) if not points[i].row.is_baseline}


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... (and 0.5, 0.2, ...) that fall in ``[lo, hi]``."""
    ticks = []
    for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in _NICE:
            t = m * 10.0**exp
            if lo <= t <= hi:
                ticks.append(t)
    return ticks


def _tick_label(value: float, _pos: Any = None) -> str:
    return f"{value:g}×"


def _nice_at_or_above(value: float) -> float:
    """The smallest of 1, 2, 5, 10, 20, ... (0.5, 0.2, ...) that is >= ``value``."""
    exp = math.floor(math.log10(value))
    return min(m * 10.0**e for e in (exp, exp + 1) for m in _NICE if m * 10.0**e >= value * (1 - 1e-12))


def _nice_at_or_below(value: float) -> float:
    """The largest of 1, 2, 5, 10, 20, ... (0.5, 0.2, ...) that is <= ``value``."""
    exp = math.floor(math.log10(value))
    return max(m * 10.0**e for e in (exp - 1, exp) for m in _NICE if m * 10.0**e <= value * (1 + 1e-12))


def _x_limits(xs: Sequence[float], right: float = 0.08) -> tuple[float, float]:
    """Log-scale limits: 8 % of the span (in decades) left of the points, ``right`` of it on the right
    (where labels go first), widened so that labelled ticks bracket every point (a 3.13× point gets a
    5× tick beyond it, not only 1× and 2×)."""
    lo, hi = min(min(xs), 1.0), max(max(xs), 1.0)
    span = math.log10(hi / lo)
    lo, hi = lo / 10 ** max(0.08 * span, 0.08), hi * 10 ** max(right * span, 0.08)
    lo = min(lo, _nice_at_or_below(min(min(xs), 1.0)) / 1.04)
    hi = max(hi, _nice_at_or_above(max(max(xs), 1.0)) * 1.04)
    return lo, hi


def _y_limits(points: Sequence[_Point]) -> tuple[float, float]:
    ys = [p.y for p in points] + [p.before for p in points if p.before is not None]
    lo, hi = min(ys), max(ys)
    pad = max(0.12 * (hi - lo), 0.5)
    return max(lo - pad, 0.0), min(hi + pad, 100.0 + pad)


# A lower-is-better metric (perplexity) whose largest value is this many times its smallest is drawn
# on a log axis: a data-free model 30x worse than dense would otherwise flatten every other point.
_LOG_Y_SPREAD = 4.0


def _set_log_y(ax: Any, points: Sequence[_Point]) -> None:
    """A log y axis with plain-number ticks at 1, 2, 5 × 10^k (50, 100, 200, ...) and room around the points."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ys = [p.y for p in points]
    lo, hi = min(ys), max(ys)
    pad = 10 ** (0.06 * math.log10(hi / lo))
    ax.set_yscale("log")
    ax.set_ylim(lo / pad, hi * pad)
    ax.yaxis.set_major_locator(FixedLocator(_nice_ticks(lo / pad, hi * pad)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos=None: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(ax.get_ylabel() + ", log scale")


def _overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


class _Placer:
    """Places text near points so that no two boxes overlap, every box stays in the axes, and each
    label reads as its own point's: no other point's marks lie nearer to it and no fine-tuning arrow
    runs through it."""

    # offsets in points: near ones first, then farther (with a leader line)
    _RING = [(dx, dy) for r in (6, 14, 26, 40) for dx, dy in
             ((r, r * 0.6), (r, -r * 0.6), (-r, r * 0.6), (-r, -r * 0.6), (0, r), (0, -r), (r * 1.3, 0), (-r * 1.3, 0))]

    def __init__(self, fig: Any, ax: Any, obstacles: list[Any],
                 marks: Sequence[tuple[int, float, float]] = (),
                 lines: Sequence[tuple[tuple[float, float], tuple[float, float]]] = ()) -> None:
        self.fig, self.ax = fig, ax
        self.renderer = fig.canvas.get_renderer()
        self.taken = list(obstacles)
        self.marks = list(marks)  # (owner, display x, display y) of every point's marks
        self.lines = list(lines)  # display segments labels must not cross (the Pareto front)

    def _crosses_a_line(self, box: Any) -> bool:
        steps = 64
        return any(box.contains(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)
                   for (x0, y0), (x1, y1) in self.lines for k in range(steps + 1))

    def _reads_as_own(self, box: Any, owner: int) -> bool:
        near = {o: min(_box_distance(box, x, y) for oo, x, y in self.marks if oo == o) for o, _, _ in self.marks}
        return owner not in near or all(d > near[owner] for o, d in near.items() if o != owner)

    def place(self, text: str, xy: tuple[float, float], *, fontsize: float, owner: int = -1) -> Any | None:
        inside = self.ax.get_window_extent(self.renderer)
        for dx, dy in self._RING:
            far = math.hypot(dx, dy) > 10
            ann = self.ax.annotate(
                text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
                va="bottom" if dy > 0 else ("top" if dy < 0 else "center"),
                arrowprops=dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=0, shrinkB=3) if far else None,
                zorder=4,
            )
            box = ann.get_window_extent(self.renderer)
            fits = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1)
            if (fits and not any(_overlaps(box, other) for other in self.taken) and self._reads_as_own(box, owner)
                    and not self._crosses_a_line(box)):
                self.taken.append(box)
                return ann
            ann.remove()
        return None


def _box_distance(box: Any, px: float, py: float) -> float:
    """Distance (display units, taxicab) from a box to a point; 0 inside."""
    return max(box.x0 - px, 0.0, px - box.x1) + max(box.y0 - py, 0.0, py - box.y1)


def _arrow_boxes(ax: Any, points: Sequence[_Point], half: float) -> list[Any]:
    """Thin boxes along the fine-tuning arrows (before -> after), for labels to keep off."""
    from matplotlib.transforms import Bbox

    boxes = []
    for p in points:
        if p.before is not None:
            (x0, y0), (_, y1) = ax.transData.transform([(p.x, p.before), (p.x, p.y)])
            boxes.append(Bbox.from_extents(x0 - half, min(y0, y1), x0 + half, max(y0, y1)))
    return boxes


def _marker_boxes(ax: Any, renderer: Any, xys: Sequence[tuple[float, float]], half: float) -> list[Any]:
    from matplotlib.transforms import Bbox

    boxes = []
    for xy in xys:
        px, py = ax.transData.transform(xy)
        boxes.append(Bbox.from_extents(px - half, py - half, px + half, py + half))
    return boxes


def _draw_marks(ax: Any, points: Sequence[_Point], front: set[int]) -> None:
    for i, p in enumerate(points):
        if p.row.is_baseline:
            ax.scatter([p.x], [p.y], marker="*", s=170, color="black", zorder=3)
            continue
        ax.scatter([p.x], [p.y], marker="o", s=46, color="tab:red" if i in front else "tab:blue", zorder=3)
        if p.before is not None:
            ax.annotate("", xy=(p.x, p.y), xytext=(p.x, p.before),
                        arrowprops=dict(arrowstyle="->", color="0.6", lw=0.8), zorder=2)
            ax.scatter([p.x], [p.before], marker="x", color="0.6", s=26, zorder=2)
    front_xy = sorted((points[i].x, points[i].y) for i in front)
    if len(front_xy) > 1:  # above the markers, so that points close together never hide it
        ax.plot(*zip(*front_xy), color="tab:red", lw=1.1, ls="--", zorder=3.5)


def _legend_handles(points: Sequence[_Point], front: set[int]) -> list[Any]:
    """One legend entry per kind of mark that the plot actually shows."""
    from matplotlib.lines import Line2D

    compressed = [i for i, p in enumerate(points) if not p.row.is_baseline]
    tuned = "after fine-tuning" if any(p.before is not None for p in points) else "compressed"
    handles = []
    if len(compressed) < len(points):
        handles.append(Line2D([], [], ls="", marker="*", ms=11, color="black", label="baseline (dense)"))
    if any(i in front for i in compressed):
        handles.append(Line2D([], [], ls="", marker="o", ms=6.5, color="tab:red", label=f"{tuned}, on the Pareto front"))
    if any(i not in front for i in compressed):
        handles.append(Line2D([], [], ls="", marker="o", ms=6.5, color="tab:blue", label=f"{tuned}, dominated"))
    if any(p.before is not None for p in points):
        handles.append(Line2D([], [], ls="-", marker="x", ms=5, color="0.6", lw=0.8,
                              label="before fine-tuning (arrow: fine-tuning gain)"))
    if len(front) > 1:
        handles.append(Line2D([], [], ls="--", color="tab:red", lw=1.1, label="Pareto front"))
    return handles


def _new_figure(points: Sequence[_Point], x: XAxis, title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 4.8), dpi=_DPI)
    FigureCanvasAgg(fig)  # the canvas whose renderer measures the labels
    ax = fig.add_subplot()
    ax.set_xscale("log")
    _set_x_limits(ax, [p.x for p in points], _MARGINS[0])
    ax.set_xlabel(AXES[x] + ", log scale")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


# Margins right of the rightmost point, tried in turn while the labels find no place.
_MARGINS = (0.08, 0.16, 0.26)


def _set_x_limits(ax: Any, xs: Sequence[float], margin: float) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lo, hi = _x_limits(xs, margin)
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(_nice_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick_label))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _layout(fig: Any, ax: Any, handles: list[Any], key: list[str] | None) -> Any:
    """Legend (and the numbered key) outside the axes, on the right; returns the legend."""
    if key:
        from matplotlib.lines import Line2D

        handles = handles + [Line2D([], [], ls="", label=entry) for entry in key]
    legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7.5,
                       frameon=False, borderaxespad=0.0, handlelength=1.6)
    fig.tight_layout()
    return legend


def _label_points(fig: Any, ax: Any, points: Sequence[_Point], labels: Sequence[str], fontsize: float,
                  front_ids: set[int] = frozenset()) -> bool:
    """Place one label per point; False (and nothing left drawn) when some label finds no place."""
    renderer = fig.canvas.get_renderer()
    xys = [(p.x, p.y) for p in points] + [(p.x, p.before) for p in points if p.before is not None]
    owners = list(range(len(points))) + [i for i, p in enumerate(points) if p.before is not None]
    marks = [(o, *ax.transData.transform(xy)) for o, xy in zip(owners, xys, strict=True)]
    obstacles = _marker_boxes(ax, renderer, xys, half=5.0) + _arrow_boxes(ax, points, half=1.5)
    front = [tuple(ax.transData.transform(xy)) for xy in sorted((points[i].x, points[i].y) for i in front_ids)]
    placer = _Placer(fig, ax, obstacles, marks, lines=list(zip(front, front[1:])))
    placed = []
    order = sorted(range(len(points)), key=lambda i: (points[i].x, -points[i].y))
    for i in order:
        ann = placer.place(labels[i], (points[i].x, points[i].y), fontsize=fontsize, owner=i)
        if ann is None:
            for a in placed:
                a.remove()
            return False
        placed.append(ann)
    return True


def _text_box(ann: Any, renderer: Any) -> Any:
    """The extent of an annotation's text alone (its own extent includes the leader line)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)  # where the text goes is computed at draw time
    return Text.get_window_extent(ann, renderer)


def _spread(targets: Sequence[float], gap: float, lo: float, hi: float) -> list[float] | None:
    """Positions near ``targets`` (sorted ascending) at least ``gap`` apart, within ``[lo, hi]``."""
    n = len(targets)
    if n * gap > hi - lo:
        return None
    pos = [min(max(t, lo + i * gap), hi - (n - 1 - i) * gap) for i, t in enumerate(targets)]
    for i in range(1, n):  # push up past the one below
        pos[i] = max(pos[i], pos[i - 1] + gap)
    for i in range(n - 2, -1, -1):  # and down below the one above, keeping inside
        pos[i] = min(pos[i], pos[i + 1] - gap)
    shift = sum(targets) / n - sum(pos) / n  # centre the column on its points, as far as the bounds allow
    shift = min(max(shift, lo - pos[0]), hi - pos[-1])
    pos = [p + shift for p in pos]
    return pos if pos[0] >= lo - 1e-6 and pos[-1] <= hi + 1e-6 else None


def _column_labels(fig: Any, ax: Any, points: Sequence[_Point], labels: Sequence[str], fontsize: float) -> bool:
    """Labels stacked in a column beside a cluster of points, each with a leader line to its point.

    For points too close together for labels beside each (a sweep whose settings all sit at 40-46x):
    the compressed points' labels go in one column left of the cluster (else right of it), in the
    order of their points' heights, spaced so none overlap; the baseline keeps a label beside it.
    False (nothing left drawn) when the column does not fit in the axes or would cover a mark.
    """
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    idx = [i for i, p in enumerate(points) if not p.row.is_baseline]
    disp = {i: ax.transData.transform((points[i].x, points[i].y)) for i in range(len(points))}
    xys = [(p.x, p.y) for p in points] + [(p.x, p.before) for p in points if p.before is not None]
    marks = _marker_boxes(ax, renderer, xys, half=5.0)
    probe = ax.text(0, 0, "Xg", fontsize=fontsize)
    gap = probe.get_window_extent(renderer).height * 1.25
    probe.remove()
    order = sorted(idx, key=lambda i: disp[i][1])
    pos = _spread([disp[i][1] for i in order], gap, inside.y0 + gap / 2, inside.y1 - gap / 2)
    if pos is None:
        return False
    for side in ("left", "right"):
        edge = (min(disp[i][0] for i in idx) - 28) if side == "left" else (max(disp[i][0] for i in idx) + 28)
        placed, ok = [], True
        for i, y in zip(order, pos):
            xy_text = ax.transData.inverted().transform((edge, y))
            ann = ax.annotate(labels[i], (points[i].x, points[i].y), xytext=xy_text, textcoords="data",
                              fontsize=fontsize, ha="right" if side == "left" else "left", va="center",
                              arrowprops=dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=1, shrinkB=3), zorder=4)
            placed.append(ann)
            box = _text_box(ann, renderer)
            if (box.x0 < inside.x0 or box.x1 > inside.x1 or any(_overlaps(box, m) for m in marks)
                    or any(_overlaps(box, _text_box(a, renderer)) for a in placed[:-1])):
                ok = False
                break
        if ok:
            base = [i for i in range(len(points)) if i not in idx]
            taken = [_text_box(a, renderer) for a in placed] + marks
            placer = _Placer(fig, ax, taken)
            if all(placer.place(labels[i], (points[i].x, points[i].y), fontsize=fontsize) is not None for i in base):
                return True
        for a in placed:
            a.remove()
    return False


def _distinct_marks(ax: Any, points: Sequence[_Point], names: Sequence[str]) -> list[Any]:
    """Last resort: one marker/colour per point, named in the legend."""
    from matplotlib.lines import Line2D

    markers = "osD^v<>PXhp*"
    colors = [f"C{i}" for i in range(10)]
    handles = []
    for i, p in enumerate(points):
        if p.row.is_baseline:  # already the black star of the legend
            continue
        style = dict(marker=markers[i % len(markers)], color=colors[(i // len(markers) + i) % len(colors)])
        ax.scatter([p.x], [p.y], s=40, zorder=5, edgecolors="white", linewidths=0.5, **style)
        handles.append(Line2D([], [], ls="", ms=6, label=names[i], **style))
    return handles


def tradeoff_figure(report: Report, *, x: XAxis = "params", title: str | None = None) -> Any:
    """The trade-off plot as a matplotlib ``Figure`` (see :func:`plot_tradeoff`)."""
    if x not in AXES:
        raise UserInputError(f"x must be one of {', '.join(AXES)}; got {x!r}")
    points = _points(report, x)
    lower = lower_is_better(report.metric_name)
    quantity = report.metric_name if lower else "accuracy"
    if not points:
        what = f"{quantity} (run it with data)" if x == "params" else f"{quantity} and a measured {x}"
        raise UserInputError(f"the report has no model with {what} to plot")
    front = front_indices(points, lower=lower)

    ylabel = f"{quantity} (lower is better)" if lower else "top-1 accuracy (%)"
    fig, ax = _new_figure(points, x, title or f"{quantity.capitalize()} vs compression — {report.dataset or 'model'}",
                          ylabel)  # fmt: skip
    if lower and max(p.y for p in points) > _LOG_Y_SPREAD * min(p.y for p in points) > 0:
        _set_log_y(ax, points)
    _draw_marks(ax, points, front)
    handles = _legend_handles(points, front)
    names = [BASELINE_LABEL if p.row.is_baseline else p.row.model for p in points]
    numbers = [str(i + 1) for i in range(len(points))]
    named = False
    for margin in _MARGINS:  # names at the points; with more room beside the outer points if need be
        _set_x_limits(ax, [p.x for p in points], margin)
        _layout(fig, ax, handles, None)
        named = _label_points(fig, ax, points, names, fontsize=8, front_ids=front)
        if named:
            break
    if not named:  # a cluster: the names in a column beside it, with leader lines
        _set_x_limits(ax, [p.x for p in points], _MARGINS[0])
        _layout(fig, ax, handles, None)
        named = _column_labels(fig, ax, points, names, fontsize=7.5)
    if not named:
        _layout(fig, ax, handles, [f"{n}  {name}" for n, name in zip(numbers, names)])
        if not _label_points(fig, ax, points, numbers, fontsize=7.5, front_ids=front):
            ax.get_legend().remove()
            _layout(fig, ax, handles + _distinct_marks(ax, points, names), None)
    return fig


def plot_tradeoff(
    report: Report,
    path: str | os.PathLike[str],
    *,
    x: XAxis = "params",
    title: str | None = None,
) -> Path:
    """Draw accuracy against a compression ratio and write it atomically.

    Parameters
    ----------
    report : Report
        The measured models; rows without accuracy (or without the chosen ``x`` measured) are left
        out.
    path : str or PathLike
        Output file; its extension picks the format: ``.png`` (150 dpi), ``.pdf`` or ``.svg``.
    x : {"params", "flops", "size", "latency"}
        The horizontal axis, as baseline / model: parameter compression, FLOP reduction, file size
        reduction or speed-up (log scale, ticks at 1×, 2×, 5×, 10×, ...).
    title : str, optional
        Figure title (default: "Accuracy vs compression — DATASET").

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    dest = Path(path)
    fmt = PLOT_SUFFIXES.get(dest.suffix.lower())
    if fmt is None:
        raise UserInputError(f"path must end in one of {', '.join(PLOT_SUFFIXES)}; got {dest.name!r}")
    fig = tradeoff_figure(report, x=x, title=title)
    with atomic_write(dest, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=_DPI)
    return dest
