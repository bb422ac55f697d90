"""The trade-off plot: formats by extension, readable ticks, a legend for every mark, no overlaps."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from matplotlib.text import Text

from ttcompress.report.plot import AXES, BASELINE_LABEL, plot_tradeoff, tradeoff_figure
from ttcompress.report.compare import ModelRow, Report


def _row(name: str, comp: float, acc: float | None, before: float | None = None, *, base: bool = False) -> ModelRow:
    return ModelRow(
        model=name, params=int(60_000 / comp), compression=comp, size_bytes=int(250_000 / comp),
        flops=int(600_000 / comp**0.5), latency_ms=3.0 / comp**0.2, latency_iqr_ms=0.1, accuracy=acc, top5=None,
        accuracy_delta=None if acc is None else acc - 0.95, is_baseline=base, accuracy_before_finetune=before,
    )


def _report(rows: list[ModelRow]) -> Report:
    return Report(rows=tuple(rows), dataset="mnist-5k", device="cpu", batch_size=64, eval_samples=1000)


SPARSE = [_row("baseline", 1, 0.954, base=True), _row("CP r3", 1.01, 0.945, 0.88), _row("TT r8", 19.0, 0.91, 0.36)]
# Crowded: many points at nearly the same place, with long labels, as a demo of settings that
# barely differ would give.
CROWDED = [_row("baseline", 1, 0.954, base=True)] + [
    _row(f"a rather long setting name number {i}", 1.0 + 0.01 * i, 0.95 - 0.001 * i, 0.9 - 0.001 * i) for i in range(12)
] + [_row(f"TT r{r} + CP r{c}", 18.0 + 0.3 * c, 0.91 - 0.001 * c, 0.36) for r in (4, 8) for c in (3, 6, 9)]


def _texts(fig) -> list[Text]:
    """Every text the renderer draws (tick labels outside the view limits exist but are not drawn)."""
    fig.canvas.draw()
    hidden = set()
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo <= tick.get_loc() <= hi:
                    hidden.update({id(tick.label1), id(tick.label2)})
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


@pytest.mark.parametrize("rows", [SPARSE, CROWDED], ids=["sparse", "crowded"])
@pytest.mark.parametrize("x", sorted(AXES))
def test_no_two_text_boxes_overlap(rows: list[ModelRow], x: str) -> None:
    fig = tradeoff_figure(_report(rows), x=x)  # type: ignore[arg-type]
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    page = fig.bbox
    for text, box in boxes:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), f"{ta!r} overlaps {tb!r}"
    # Every model is named somewhere (label at the point, numbered key or legend entry).
    shown = " ".join(t for t, _ in boxes)
    assert all(row.model in shown for row in rows)


def test_ticks_read_as_ratios_and_legend_explains_every_mark() -> None:
    fig = tradeoff_figure(_report(SPARSE))
    texts = [t.get_text() for t in _texts(fig)]
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[:2] == ["1×", "2×"] and "10×" in ticks and "20×" in ticks
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "baseline (dense)" in legend and "Pareto front" in legend
    assert any("before fine-tuning" in t for t in legend)
    assert any("Pareto front" in t and "after" in t for t in legend)
    assert "Accuracy vs compression — mnist-5k" in texts


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_format_follows_the_extension(tmp_path, suffix: str, magic: bytes) -> None:
    path = plot_tradeoff(_report(SPARSE), tmp_path / f"t{suffix}", title="custom title")
    assert path.read_bytes().startswith(magic)
    assert not list(tmp_path.glob(".*tmp"))


def test_png_is_at_least_150_dpi(tmp_path) -> None:
    from PIL import Image

    path = plot_tradeoff(_report(SPARSE), tmp_path / "t.png")
    with Image.open(path) as image:
        width, _ = image.size
        dpi = image.info.get("dpi", (0, 0))[0]
    assert dpi >= 149.5 and width >= 7 * 150


@pytest.mark.parametrize("name", ["t.jpg", "t", "t.png.txt"])
def test_other_extensions_are_refused(tmp_path, name: str) -> None:
    with pytest.raises(ValueError, match=r"\.png, \.pdf, \.svg"):
        plot_tradeoff(_report(SPARSE), tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_needs_accuracy_and_a_known_axis(tmp_path) -> None:
    with pytest.raises(ValueError, match="accuracy"):
        plot_tradeoff(_report([_row("dense", 1, None, base=True)]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="x must be one of"):
        plot_tradeoff(_report(SPARSE), tmp_path / "x.png", x="memory")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# The README demo's curve: close points with long fine-tuning arrows between them.
DEMO = [_row("baseline", 1, 0.954, base=True), _row("target ×4", 4.0, 0.956, 0.95), _row("target ×8", 8.02, 0.949, 0.954),
        _row("target ×16", 16.06, 0.947, 0.939), _row("target ×32", 32.06, 0.944, 0.922),
        _row("target ×48", 48.12, 0.927, 0.892)]


def _box_distance(box, px: float, py: float) -> float:
    return max(box.x0 - px, 0.0, px - box.x1) + max(box.y0 - py, 0.0, py - box.y1)


@pytest.mark.parametrize("rows", [SPARSE, DEMO], ids=["sparse", "demo"])
def test_each_label_is_nearest_its_own_point_and_crosses_no_arrow(rows: list[ModelRow]) -> None:
    """A label must read as its own point's: no other model's marks nearer to it, no arrow through it."""
    from matplotlib.text import Annotation

    fig = tradeoff_figure(_report(rows))
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    base = next(r for r in rows if r.is_baseline)
    marks = {}  # model -> display positions of its marks (after, and before fine-tuning)
    for r in rows:
        ys = [r.accuracy] + ([r.accuracy_before_finetune] if r.accuracy_before_finetune is not None else [])
        marks[r.model] = [tuple(ax.transData.transform((base.params / r.params, 100 * y))) for y in ys]
    marks["baseline (dense)"] = marks.pop(base.model)  # the baseline's point is labelled by its role
    labels = [t for t in fig.findobj(Annotation) if t.get_text() in marks]
    assert {t.get_text() for t in labels} == set(marks)  # every point labelled beside it (no key needed)
    for t in labels:
        box = t.get_window_extent(renderer)
        own = _box_distance(box, *marks[t.get_text()][0])
        for name, points in marks.items():
            if name != t.get_text():
                assert all(_box_distance(box, *p) > own for p in points), f"{t.get_text()!r} nearer {name!r}"
            if len(points) == 2:  # the arrow: a vertical segment from before to after
                (x, y0), (_, y1) = points
                crosses = box.x0 - 1 < x < box.x1 + 1 and min(y0, y1) < box.y1 and box.y0 < max(y0, y1)
                assert not crosses, f"{t.get_text()!r} crosses the arrow of {name!r}"


# A sweep whose points all sit far from the baseline, close together (40-46x on a 1-50x axis).
CLUSTER = [_row("model", 1, 0.954, base=True)] + [
    _row(f"TT r{r} + CP r{c}", 40.0 + 1.1 * i, 0.90 - 0.004 * i + 0.002 * (i % 2), 0.5 + 0.02 * i)
    for i, (r, c) in enumerate(itertools.product((3, 4), (3, 6, 9)))]


@pytest.mark.parametrize("rows", [CLUSTER, [_row("model", 1, 0.95, base=True), _row("svd", 3.13, 0.94)]],
                         ids=["cluster", "3.13x"])
def test_ticks_bracket_every_point_and_the_front_is_drawn_above_the_markers(rows) -> None:
    from matplotlib.text import Annotation

    fig = tradeoff_figure(_report(rows))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.xaxis.get_majorticklocs() if lo <= t <= hi]
    assert min(ticks) <= 1.0 and max(ticks) >= max(r.compression for r in rows)  # a tick beyond every point
    fronts = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    markers = [c.get_zorder() for c in ax.collections]
    if len(rows) > 2:
        assert fronts and all(f.get_zorder() > max(markers) for f in fronts)
    labels = {t.get_text() for t in fig.findobj(Annotation)}
    assert BASELINE_LABEL in labels and "model" not in labels  # the baseline by its role, not its file name
    assert all(r.model in labels for r in rows if not r.is_baseline)  # a cluster is labelled, not keyed


def _ppl_report(ppls: list[float]) -> Report:
    rows = [dataclasses.replace(_row("dense" if i == 0 else f"m{i}", 1 if i == 0 else 2.0 * i, None, base=i == 0),
                                metric=p) for i, p in enumerate(ppls)]
    return Report(rows=tuple(rows), dataset="text:corpus", device="cpu", batch_size=64, eval_samples=875,
                  metric_name="perplexity")


def test_perplexity_spanning_a_decade_is_drawn_on_a_log_axis_with_readable_ticks() -> None:
    fig = tradeoff_figure(_ppl_report([58.5, 60.1, 75.0, 330.0, 1900.0]))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
    lo, hi = ax.get_ylim()
    assert lo < 58.5 and hi > 1900.0
    ticks = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
    assert {"100", "200", "500", "1000"} <= set(ticks)  # 1-2-5 ticks as plain numbers, no minor ones
    assert set(ticks) <= {"50", "100", "200", "500", "1000", "2000"}


def test_perplexity_in_a_narrow_band_stays_on_a_linear_axis() -> None:
    ax = tradeoff_figure(_ppl_report([58.5, 59.0, 61.0, 70.0])).axes[0]
    assert ax.get_yscale() == "linear" and "log" not in ax.get_ylabel()
