"""One typed record per layer: what a compression run did to it, or what a model holds there.

:class:`LayerReport` is the one per-layer record of ttcompress. A compression run
(:func:`ttcompress.compression.pipeline.compress_with_report`) makes one per dense candidate layer (the rows of
the ``decompose`` table), :func:`ttcompress.compression.summary.summarize` one per compressible or compressed
layer (the ``inspect`` table), :func:`ttcompress.report.compare.layer_rows` one per compressed layer (the
report's layer table), and the model metadata (:class:`ttcompress.checkpoint.meta.ModelMeta`) keeps one per
replaced layer, of which :data:`META_FIELDS` go into a checkpoint's header.

Adding a field: add it to :class:`LayerReport` with a default; if it belongs in checkpoints,
append its name to :data:`META_FIELDS` (a ``None`` value is not written).

This module also holds the small helpers every table needs: :func:`count_params` (the one
parameter counter), :func:`ranks_text` (the one way ranks are written as text) and
:func:`format_label` (a format name in a table).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["DENSE_FORMAT", "KEPT_DENSE_INFO", "META_FIELDS", "LayerReport", "count_params", "format_label",
           "kept_dense", "ranks_text"]

#: The ``format`` of a layer that stays (or is) dense.
DENSE_FORMAT = "dense"

#: Fields of a :class:`LayerReport` kept in ``model.ttcompress_meta["layers"]`` and checkpoint headers.
META_FIELDS: tuple[str, ...] = ("format", "config", "rel_error", "seconds", "params_before", "params_after", "note",
                                 "out_error_before", "out_error_after", "fit_method")

#: Key of ``model.ttcompress_meta["info"]`` (and a checkpoint's info) under which a compression run
#: records why each candidate layer stayed dense: ``{qualified name: reason}`` (:func:`kept_dense`).
KEPT_DENSE_INFO = "kept_dense"

_TUPLE_FIELDS = ("shape", "in_modes", "out_modes", "ranks", "aliases")


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters counted once; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def ranks_text(ranks: Sequence[int] | int | None) -> str:
    """Ranks as a table cell: ``(1, 4, 4, 1)`` -> ``"(1,4,4,1)"``, ``12`` -> ``"12"``, None -> ``"–"``."""
    if ranks is None:
        return "–"
    if isinstance(ranks, (list, tuple)):
        return "(" + ",".join(str(int(r)) for r in ranks) + ")"
    return str(ranks)


def format_label(fmt: str) -> str:
    """A format name as tables show it: upper-case (``TT``, ``SVD``); ``dense`` stays lower-case."""
    return fmt if fmt == DENSE_FORMAT else fmt.upper()


def _tuple(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


@dataclass(frozen=True)
class LayerReport:
    """One layer: its dense facts, what was (or would be) done with it, and the measured result.

    Attributes
    ----------
    name : str
        Qualified module name (the first one, for a module reachable under several names).
    format : str
        Lower-case registered format name, or ``"dense"`` (then ``skipped`` says why).
    type : str
        Class name of the dense layer (compression run) or of the layer now there (inspect).
    shape : tuple of int
        Weight shape (of the equivalent dense weight for a factorized layer).
    params_before, params_after : int or None
        Parameters of the dense layer and of its replacement (equal when it stays dense).
    in_modes, out_modes, ranks : tuple of int or None
        Structure of a factorized layer, from its format's ``describe`` (TT: the full rank tuple;
        CP/SVD: ``(rank,)``); ``in_modes``/``out_modes`` also for a planned TT layer.
    rel_error : float or None
        Relative Frobenius reconstruction error of the weight.
    out_error_before, out_error_after : float or None
        Relative output error on the calibration data before and after the layer was fitted to it
        (None without calibration data).
    fit_method : str or None
        How the layer was fitted to the calibration data (whitened SVD, ALS, L-BFGS, ...).
    seconds : float or None
        Decomposition wall time.
    skipped : str or None
        Why the layer stays dense.
    aliases : tuple of str
        Other names of the same module object.
    detail : str or None
        The format's own one-cell description of the structure (modes and ranks).
    note : str or None
        Why the format was chosen (``auto``).
    config : dict or None
        The factorized layer's ``config()`` (rebuilds its structure from a checkpoint).
    params, share : int, float or None
        Parameters of the layer now in the model and their share of the model (inspect).
    compressible : bool
        A dense layer the plan would compress (inspect).
    suggestion : str or None
        What the plan's format would build there (inspect).
    tied_to : str or None
        The earlier layer whose parameters this one shares (tied weights, e.g. a language model's
        output layer and its embedding): counted there, so ``share`` is 0 here (inspect).
    extra : dict
        Metadata entries this version does not know (kept, and written back, as they are).
    """

    name: str
    format: str
    type: str = ""
    shape: tuple[int, ...] = ()
    params_before: int | None = None
    params_after: int | None = None
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    rel_error: float | None = None
    out_error_before: float | None = None
    out_error_after: float | None = None
    fit_method: str | None = None
    seconds: float | None = None
    skipped: str | None = None
    aliases: tuple[str, ...] = ()
    detail: str | None = None
    note: str | None = None
    config: dict[str, Any] | None = None
    params: int | None = None
    share: float | None = None
    compressible: bool = False
    suggestion: str | None = None
    tied_to: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.format, str):
            raise TypeError(f"format must be a str, got {type(self.format).__name__}")
        object.__setattr__(self, "format", self.format.lower())
        for k in ("shape", "in_modes", "out_modes", "ranks"):
            object.__setattr__(self, k, _tuple(getattr(self, k)))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def ratio(self) -> float | None:
        """``params_before / params_after`` (inf for an empty replacement, None when unknown)."""
        if self.params_before is None or self.params_after is None:
            return None
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def compressed(self) -> bool:
        return self.format != DENSE_FORMAT

    @property
    def judged_error(self) -> float | None:
        """The error a layer is judged (and flagged) by: its output error on the calibration data after
        fitting when there is one (a fitted layer's weight may move far from the dense one on
        purpose), else its weight error."""
        return self.out_error_after if self.out_error_after is not None else self.rel_error

    @property
    def structure(self) -> str:
        """Modes and ranks as one table cell (the format's text, else the ranks)."""
        return self.detail or ranks_text(self.ranks)

    # ---- dict forms ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples as lists) plus ``ratio``; ``extra`` merged in."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in _TUPLE_FIELDS:
            if d[k] is not None:
                d[k] = list(d[k])
        d["ratio"] = self.ratio
        return {**copy.deepcopy(self.extra), **d}

    def to_meta(self) -> dict[str, Any]:
        """The metadata / checkpoint-header record: :data:`META_FIELDS` that are set, plus ``extra``."""
        record = copy.deepcopy(self.extra)
        for k in META_FIELDS:
            value = getattr(self, k)
            if value is not None:
                record[k] = copy.deepcopy(value)
        return record

    @classmethod
    def from_meta(cls, name: str, record: Mapping[str, Any]) -> LayerReport:
        """Inverse of :meth:`to_meta` (unknown keys go to ``extra``)."""
        if not isinstance(record, Mapping):
            raise TypeError(f"layer record {name!r} must be a mapping, got {type(record).__name__}")
        data = copy.deepcopy(dict(record))
        known = {k: data.pop(k) for k in META_FIELDS if k in data}
        known.setdefault("format", DENSE_FORMAT)
        return cls(name=str(name), extra=data, **known)


def kept_dense(records: Sequence[LayerReport]) -> dict[str, str]:
    """``{name: reason}`` for the records of a compression run that stayed dense (what
    :data:`KEPT_DENSE_INFO` holds)."""
    return {r.name: r.skipped or "kept dense" for r in records if not r.compressed}
