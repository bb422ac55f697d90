"""Compression plans: *what* gets compressed and *how*, as plain serializable data.

A :class:`Plan` holds

* ``settings``: each registered format's settings by name (:mod:`ttcompress.formats`; each
  format owns its settings class: :class:`TTSettings` for ``nn.Linear`` → TT-matrix,
  :class:`CPSettings` for ``nn.Conv2d`` → CP, the defaults, ``SVDSettings``, ...);
* ``formats``: the formats to use, the first one that compresses a layer's type wins;
* ``layers`` / ``exclude``: glob patterns (:func:`fnmatch.fnmatchcase`) on qualified module names
  (``layer1.0.conv1``; ``*`` also matches dots); a pattern that matches no layer is an error;
* ``rules``: per-layer overrides, name pattern → format (a registered name or ``"dense"``) and
  settings overrides (ranks / eps / d / ratio, ...) validated by the format's settings class.
  Every rule whose pattern matches applies, in order; a later rule's values override an earlier
  one's (like CSS);
* ``target_ratio``: a whole-model parameter compression to reach; per-layer ranks are then chosen
  by :func:`plan_layers` (see "Rank allocation" there), and layers get the ``auto`` format unless
  ``formats`` says otherwise;
* ``others``: what a layer whose type none of ``formats`` covers gets: ``"default"`` (its type's
  default format, or ``auto`` under ``target_ratio``) or ``"dense"`` (the command-line rule: once
  any per-format option is given, a type whose options are not given stays dense).

Plan files (read and written by :mod:`ttcompress.compression.planfile`, which also maps command-line style
options onto a plan) are YAML or JSON with the same keys as :meth:`Plan.to_dict` (one section per
format)::

    tt: {ranks: 8, d: 3}
    cp: {ratio: 4, options: {n_iter_max: 50}}
    svd: {rank: 16}
    formats: [svd]
    exclude: ["conv1"]
    rules:
      - {pattern: "fc", format: tt, ranks: 4}
      - {pattern: "layer4.*", format: tucker2, ranks: [16, 32]}
      - {pattern: "classifier.*", format: dense}

:func:`plan_layers` turns a plan and a model into one :class:`LayerDecision` per layer a format
compresses (format, build options, predicted parameter counts, or the reason it stays dense); it
never names a format itself but asks the registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ttcompress.compression.allocate import Slot, allocate
from ttcompress.decompose.modes import choose_modes
from ttcompress.errors import InputError, TTCompressError
from ttcompress.modtree import named_with_aliases
from ttcompress.formats import (
    DENSE,
    CompressionFormat,
    LayerDecision,
    compressible,
    default_format,
    format_names,
    get_format,
    layer_classes,
)
from ttcompress.formats.base import SIZE, dense_params, setting_fields
from ttcompress.formats.checks import check_keys, check_patterns, check_ratio, freeze_options
from ttcompress.formats.cp import DEFAULT_CP_RATIO, CPSettings, cp_params, cp_rank_for
from ttcompress.formats.tt import DEFAULT_TT_RANKS, TTSettings, tt_params

__all__ = [
    "DEFAULT_CP_RATIO",
    "FormatSettings",
    "PatternError",
    "DEFAULT_TT_RANKS",
    "CPSettings",
    "LayerDecision",
    "Plan",
    "Rule",
    "TTSettings",
    "DEFAULT_MAX_ERROR",
    "DEFAULT_MIN_SAVING",
    "check_patterns_match",
    "compressible_layers",
    "cp_params",
    "cp_rank_for",
    "allocation_slots",
    "pattern_names",
    "plan_layers",
    "suggest_modes",
    "tt_params",
]


class PatternError(TTCompressError, ValueError):
    """A ``layers``/``exclude``/rule glob matches no layer of the model."""


@dataclass(frozen=True, init=False)
class Rule:
    """Override for the layers whose qualified name matches ``pattern`` (a glob).

    ``format`` is any registered format name (:func:`ttcompress.formats.format_names`) or
    ``"dense"`` (keep matching layers uncompressed). ``overrides`` are settings of the chosen
    format, by the names plan files use (the format's field names or their aliases): ``ranks`` is
    the max TT rank for TT, the rank for CP and SVD, the ``(in, out)`` ranks for Tucker-2; ``eps``
    a relative error (TT, SVD); ``d``, ``in_modes``, ``out_modes`` TT's; ``ratio`` a per-layer
    compression factor; ``options`` extra build options (CP-ALS, Tucker-2 HOOI). They may also be
    given as keywords: ``Rule("fc", format="svd", ranks=16)``.

    With a ``format``, the overrides are validated by that format's settings class (an unknown
    key is an error); without one (or ``auto``, which hands sizes to each layer's default format),
    every key must be a setting of some format and the values must suit one of them; each layer's
    format then reads the keys it has. A rule's value replaces the settings' values of its
    group (a rule's ``ranks`` replaces ``eps`` too: :meth:`CompressionFormat.with_overrides`).
    """

    pattern: str
    format: str | None
    overrides: tuple[tuple[str, Any], ...]

    def __init__(self, pattern: str, format: str | None = None,
                 overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None, **values: Any) -> None:
        if not isinstance(pattern, str) or not pattern.strip():
            raise InputError("rule pattern", f"must be a non-empty glob, got {pattern!r}")
        where = f"rule {pattern!r}"
        allowed = (*format_names(), DENSE)
        if format is not None and format not in allowed:
            raise InputError(where, f": format must be one of {', '.join(allowed)}, got {format!r}")
        given = dict(overrides or {})
        for key, value in values.items():
            if key in given:
                raise InputError(where, f": {key} is given twice")
            given[key] = value
        if "rank" in given:  # the rule vocabulary says ranks (CP's and SVD's rank)
            if "ranks" in given:
                raise InputError(where, ": give rank or ranks, not both")
            given["ranks"] = given.pop("rank")
        frozen = tuple(sorted((str(k), _freeze(v, f"{where} {k}")) for k, v in given.items() if v is not None))
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "overrides", frozen)
        if self.get("ranks") is not None and self.get("ratio") is not None:
            raise InputError(where, ": ranks and ratio are mutually exclusive")
        _check_overrides(format, self.override(), where)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.overrides)
        return f"Rule({self.pattern!r}{'' if self.format is None else f', format={self.format!r}'}{extra})"

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def get(self, key: str) -> Any:
        """The override ``key`` (None when the rule does not set it)."""
        return dict(self.overrides).get(key)

    def override(self) -> dict[str, Any]:
        """The overrides, as a dict."""
        return dict(self.overrides)


def _freeze(value: Any, what: str) -> Any:
    """A rule value in a comparable form: lists as tuples, mappings (keyword options) as sorted pairs."""
    if isinstance(value, Mapping):
        return freeze_options(value, what)
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_overrides(format: str | None, overrides: Mapping[str, Any], where: str) -> None:
    """Validate a rule's overrides by its format's settings class, or (no format) by some format's."""
    if not overrides:
        return
    if format not in (None, DENSE) and get_format(format).layer_class is not None:
        fmt = get_format(format)
        fmt.with_overrides(fmt.settings(), overrides, rule=True, strict=True, where=where)
        return
    usable = [f for f in _formats() if f.layer_class is not None and not f.structural]
    for key in overrides:
        if not any(f.canonical_key(key) is not None for f in usable):
            raise InputError(where, f": unknown key {key!r}; allowed: {', '.join(_override_keys())}")
    first: InputError | None = None
    for fmt in usable:
        if not any(fmt.canonical_key(k) is not None for k in overrides):
            continue
        try:
            fmt.with_overrides(fmt.settings(), overrides, rule=True, strict=False, where=where)
            return
        except InputError as exc:
            first = first or exc
    if first is not None:
        raise first


def _override_keys() -> tuple[str, ...]:
    """Every key a rule may set: the settings fields of the registered formats and their aliases."""
    keys: list[str] = []
    for fmt in _formats():
        for k in (*(f.name for f in dataclasses.fields(fmt.settings)), *fmt.settings_aliases):
            if k not in keys:
                keys.append(k)
    return tuple(keys)


_PLAN_KEYS = ("layers", "exclude", "rules", "target_ratio", "formats", "min_saving", "max_error", "others")
#: Defaults of :attr:`Plan.min_saving` (fraction of the model's parameters) and :attr:`Plan.max_error`.
DEFAULT_MIN_SAVING = 0.01
DEFAULT_MAX_ERROR = 0.5


def _check_fraction(value: Any, name: str, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or (
            upper is not None and not value < upper):
        bound = f"in [0, {upper:g})" if upper is not None else ">= 0"
        raise InputError(name, f"must be a number {bound}, got {value!r}")
    return float(value)


#: Values of :attr:`Plan.others`.
OTHERS = ("default", DENSE)


def _check_formats(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)):
        raise InputError("formats", f"must be a list of format names, got {value!r}")
    names = format_names()
    for v in value:
        if v not in names:
            raise InputError("formats", f": unknown format {v!r}; registered: {', '.join(names)}")
    if len(set(value)) != len(value):
        raise InputError("formats", f"must not repeat a name, got {list(value)}")
    return tuple(value)


class FormatSettings(Mapping[str, Any]):
    """Read-only map: format name -> that format's settings (only those that differ from its defaults).

    Equal to any mapping with the same items; hashable. Built by :class:`Plan` from a mapping or
    pairs whose values are settings instances or plan-file dicts.
    """

    def __init__(self, value: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None) -> None:
        items = dict(value or {}) if isinstance(value, Mapping) else dict(value or ())
        kept: dict[str, Any] = {}
        for name, s in items.items():
            fmt = get_format(name)
            if isinstance(s, Mapping):
                s = fmt.settings_from_dict(s)
            if not isinstance(s, fmt.settings):
                raise TypeError(f"settings[{name!r}] must be {fmt.settings.__name__}, got {type(s).__name__}")
            if s != fmt.settings():
                kept[name] = s
        self._items = {n: kept[n] for n in format_names() if n in kept}

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True, init=False)
class Plan:
    """What to compress and how. Immutable; build variants with :func:`dataclasses.replace`.

    Parameters
    ----------
    settings : mapping of str to settings
        Each registered format's settings, by name (an instance of that format's ``settings``
        class, e.g. ``{"svd": SVDSettings(rank=16)}``, or a dict of its fields); missing ones take
        their defaults. Stored as a :class:`FormatSettings` of the non-default ones.
    **by_format : settings
        A registered format's name as a keyword is a shorthand for its entry of ``settings`` (and
        replaces it: ``dataclasses.replace(plan, svd=SVDSettings(rank=8))``), and reads it back as an
        attribute (``plan.svd`` is ``plan.settings_for("svd")``).
    layers : tuple of str
        Only layers matching one of these globs are compressed (all when empty).
    exclude : tuple of str
        Layers matching one of these globs stay dense.
    rules : tuple of Rule
        Per-layer overrides, applied in order.
    target_ratio : float, optional
        Whole-model parameter compression factor (> 1) to reach by choosing per-layer ranks.
    formats : tuple of str
        Registered format names to use: each layer gets the first one that compresses its type;
        types none of them covers get ``auto`` when ``target_ratio`` is given, else their
        default format (TT for Linear, CP for Conv2d), unless ``others`` is ``"dense"``.
    others : {"default", "dense"}
        What layers of a type that none of ``formats`` covers get: their default format
        (``"default"``) or nothing (``"dense"``).
    min_saving, max_error : float
        A layer stays dense when compressing it saves fewer than ``min_saving`` times the model's
        parameters while its relative error (output error on calibration data after fitting,
        else weight error) exceeds ``max_error`` (default 0.5; e.g. a 128 -> 10 classifier that
        would save 700 params at error 0.66). ``min_saving`` None (the default) means
        :data:`DEFAULT_MIN_SAVING` (1%) when calibration data are given and 0 (off) without:
        a weight error is a poor predictor of the accuracy cost, a measured output error is not.
        ``min_saving=0`` turns the rule off.
    """

    layers: tuple[str, ...]
    exclude: tuple[str, ...]
    rules: tuple[Rule, ...]
    target_ratio: float | None
    formats: tuple[str, ...]
    settings: FormatSettings
    min_saving: float | None
    max_error: float
    others: str

    def __init__(
        self,
        *,
        layers: Sequence[str] | str = (),
        exclude: Sequence[str] | str = (),
        rules: Sequence[Rule] = (),
        target_ratio: float | None = None,
        formats: Sequence[str] | str = (),
        settings: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        min_saving: float | None = None,
        max_error: float = DEFAULT_MAX_ERROR,
        others: str = "default",
        **by_format: Any,
    ) -> None:
        items = dict(settings or {}) if isinstance(settings, Mapping) else dict(settings or ())
        for name, value in by_format.items():
            if name not in format_names():
                raise TypeError(f"Plan() got an unexpected keyword argument {name!r} (not a registered format)")
            if value is not None:  # replaces the entry of settings: replace(plan, cp=...) works
                items[name] = value
        put = functools.partial(object.__setattr__, self)
        put("settings", FormatSettings(items))
        put("min_saving", None if min_saving is None else _check_fraction(min_saving, "min_saving", upper=1.0))
        put("max_error", _check_fraction(max_error, "max_error"))
        put("layers", check_patterns(layers, "layers"))
        put("exclude", check_patterns(exclude, "exclude"))
        rules = tuple(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"rules must hold Rule objects, got {type(r).__name__}")
        put("rules", rules)
        put("target_ratio", check_ratio(target_ratio, "target_ratio"))
        put("formats", _check_formats(formats))
        if others not in OTHERS:
            raise InputError("others", f"must be one of {', '.join(OTHERS)}, got {others!r}")
        put("others", others)
        if self.target_ratio is not None:
            fixed = [f"{name}.{f.name}" for name in format_names() for f in setting_fields(get_format(name).settings)
                     if f.group == SIZE and getattr(self.settings_for(name), f.name) is not None]
            if fixed:
                raise InputError("target_ratio", f"chooses the ranks itself; do not combine it with {', '.join(fixed)}")
            if any(r.get("eps") is not None or r.get("ratio") is not None for r in rules):
                raise InputError("target_ratio", "cannot be combined with plan rules that set eps or ratio")

    def saving_floor(self, calibrated: bool) -> float:
        """The ``min_saving`` in force (see the class docstring)."""
        if self.min_saving is not None:
            return self.min_saving
        return DEFAULT_MIN_SAVING if calibrated else 0.0

    def __getattr__(self, name: str) -> Any:
        """A registered format's name reads its settings (``plan.svd`` is ``plan.settings_for("svd")``)."""
        if name.startswith("_") or name not in format_names():
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.settings_for(name)

    def settings_for(self, name: str) -> Any:
        """The settings of format ``name`` (its entry of ``settings``, or the format's defaults)."""
        fmt = get_format(name)
        return self.settings.get(name) or fmt.settings()

    def format_for(self, module: nn.Module, rule: Rule | None = None) -> str | None:
        """Name of the format ``module`` gets (``"dense"`` by a rule; None when no format applies)."""
        if rule is not None and rule.format is not None:
            return rule.format
        for name in self.formats:
            if get_format(name).applies_to(module):
                return name
        if self.others == DENSE:
            return DENSE
        if self.target_ratio is not None:
            for fmt in _formats():
                if fmt.default_under_target_ratio and fmt.applies_to(module):
                    return fmt.name
        fmt = default_format(module)
        return None if fmt is None else fmt.name

    # ---- (de)serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the plan file format); ``None`` fields are left out."""
        data: dict[str, Any] = {}
        for name in format_names():
            section = get_format(name).settings_to_dict(self.settings_for(name))
            if section:
                data[name] = section
        if self.layers:
            data["layers"] = list(self.layers)
        if self.exclude:
            data["exclude"] = list(self.exclude)
        if self.rules:
            data["rules"] = [_rule_to_dict(r) for r in self.rules]
        if self.target_ratio is not None:
            data["target_ratio"] = self.target_ratio
        if self.formats:
            data["formats"] = list(self.formats)
        if self.min_saving is not None:
            data["min_saving"] = self.min_saving
        if self.max_error != DEFAULT_MAX_ERROR:
            data["max_error"] = self.max_error
        if self.others != "default":
            data["others"] = self.others
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Plan:
        """Inverse of :meth:`to_dict`; unknown keys are a ``ValueError`` naming them."""
        data = dict(data or {})
        check_keys(data, (*format_names(), *_PLAN_KEYS), "plan")
        settings = {name: get_format(name).settings_from_dict(data[name]) for name in format_names() if name in data}
        rules_data = data.get("rules") or []
        if not isinstance(rules_data, list):
            raise InputError("rules", "must be a list of {pattern: ..., ...} entries")
        rules = []
        for i, r in enumerate(rules_data):
            check_keys(r, ("pattern", "format", "rank", *_override_keys()), f"plan rule #{i + 1}")
            r = dict(r)
            if "pattern" not in r:
                raise InputError(f"plan rule #{i + 1}", "has no pattern")
            rules.append(Rule(r.pop("pattern"), r.pop("format", None), r))
        return cls(
            layers=data.get("layers") or (),
            exclude=data.get("exclude") or (),
            rules=tuple(rules),
            target_ratio=data.get("target_ratio"),
            formats=data.get("formats") or (),
            settings=settings,
            min_saving=data.get("min_saving"),
            max_error=data.get("max_error", DEFAULT_MAX_ERROR),
            others=data.get("others") or "default",
        )

    # ---- matching ---------------------------------------------------------------------------------
    def selects(self, name: str) -> str | None:
        """``None`` if layer ``name`` is selected, else the reason it is not."""
        if self.layers and not any(fnmatch.fnmatchcase(name, p) for p in self.layers):
            return "not matched by layers"
        for p in self.exclude:
            if fnmatch.fnmatchcase(name, p):
                return f"excluded by pattern {p!r}"
        return None

    def merged_rule(self, name: str) -> Rule | None:
        """All rules matching ``name`` merged in order (later fields win), or None."""
        matching = [r for r in self.rules if r.matches(name)]
        if not matching:
            return None
        merged: dict[str, Any] = {}
        fmt = None
        for r in matching:
            merged.update(r.overrides)
            fmt = r.format if r.format is not None else fmt
        if "ranks" in merged and "ratio" in merged:  # a later rule's ranks/ratio replaces the other
            last = [r for r in matching if r.get("ranks") is not None or r.get("ratio") is not None][-1]
            merged.pop("ratio" if last.get("ranks") is not None else "ranks")
        return Rule(name, fmt, merged)


def _formats() -> tuple[CompressionFormat, ...]:
    return tuple(get_format(n) for n in format_names())


def _rule_to_dict(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"pattern": rule.pattern}
    if rule.format is not None:
        out["format"] = rule.format
    for k, v in rule.overrides:
        pairs = isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 for x in v)
        out[k] = dict(v) if pairs else list(v) if isinstance(v, tuple) else v
    return out


def suggest_modes(
    in_features: int, out_features: int, *, d: int | None = None, ranks: int | Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(in_modes, out_modes)`` a TT-matrix layer of this shape gets with ``d`` cores.

    Delegates to :func:`ttcompress.decompose.modes.choose_modes` (balanced modes, zero-padding
    sizes that factor badly, arranged for the smallest parameter count at ``ranks``; default 8).
    """
    return choose_modes(in_features, out_features, d=d, ranks=ranks if ranks is not None else DEFAULT_TT_RANKS)


# --------------------------------------------------------------------------------------------------
# Layer decisions
# --------------------------------------------------------------------------------------------------
Candidate = tuple[str, nn.Module, tuple[str, ...]]


def _inside_factorized(model: nn.Module) -> set[int]:
    """ids of the modules inside factorized layers (e.g. the convs of a Tucker-2 layer): not layers of their own."""
    done = layer_classes()
    return {id(sub) for m in model.modules() if isinstance(m, done) for sub in m.modules() if sub is not m}


def compressible_layers(model: nn.Module) -> list[Candidate]:
    """``(name, module, aliases)`` of every module some registered format compresses."""
    inner = _inside_factorized(model)
    return named_with_aliases(model, lambda m: compressible(m) and id(m) not in inner)


def _kind(module: nn.Module) -> str:
    """The dense type a format targets (``Linear`` for a Linear subclass too)."""
    for fmt in _formats():
        for t in fmt.targets:
            if isinstance(module, t):
                return t.__name__
    return type(module).__name__


def _decide(name: str, module: nn.Module, aliases: tuple[str, ...], plan: Plan, *, lowest: bool = False,
            guard: str | None = None) -> LayerDecision:
    """The plan's decision for one layer; a layer the plan selects but ``guard`` names a reason for stays dense."""
    before = dense_params(module)

    def dense(reason: str) -> LayerDecision:
        return LayerDecision(name, _kind(module), tuple(module.weight.shape), DENSE, {}, before, before, reason, aliases)

    reason = plan.selects(name)
    if reason is not None:
        return dense(reason)
    rule = plan.merged_rule(name)
    fmt_name = plan.format_for(module, rule)
    if fmt_name == DENSE:
        if rule is None or rule.format != DENSE:
            return dense(f"{_kind(module)} not selected: no format given for it")
        return dense("plan rule: dense")
    if fmt_name is None:
        return dense(f"no registered format compresses {type(module).__name__}")
    fmt = get_format(fmt_name)
    if not fmt.applies_to(module):
        usable = ", ".join(f.name for f in _formats() if f.applies_to(module))
        return dense(f"format {fmt_name} does not apply to {_kind(module)} (use {usable})")
    override = rule.override() if rule is not None else {}
    decision = fmt.decide(module, name, plan.settings_for(fmt_name), override=override, aliases=aliases,
                          lowest=lowest, settings_of=plan.settings_for)
    if guard is not None and decision.skipped is None:
        d = decision
        return LayerDecision(name, _kind(module), d.shape, DENSE, {}, d.params_before, d.params_before, guard, aliases)
    return replace(decision, type=_kind(module))


def check_patterns_match(plan: Plan, names: Sequence[str]) -> None:
    """Raise :class:`PatternError` if a ``layers``/``exclude``/rule glob of ``plan`` matches none of ``names``.

    The message names the pattern and the closest layer names (:func:`difflib.get_close_matches`).
    """
    groups = (("layers", plan.layers), ("exclude", plan.exclude), ("rule", tuple(r.pattern for r in plan.rules)))
    for what, patterns in groups:
        for p in patterns:
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                continue
            close = difflib.get_close_matches(p, list(names), n=3, cutoff=0.5)
            hint = (f"closest: {', '.join(close)}" if close else
                    f"layers are: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else
                    "the model has no compressible layer")
            raise PatternError(f"{what} pattern {p!r} matches no layer; {hint}")


def pattern_names(model: nn.Module) -> list[str]:
    """The names a plan's patterns are matched against (:func:`check_patterns_match`): every layer some
    format compresses and every compressed layer, aliases included."""
    done = layer_classes()
    inner = _inside_factorized(model)
    return [n for n, m in model.named_modules(remove_duplicate=False)
            if id(m) not in inner and (compressible(m) or isinstance(m, done))]


def plan_layers(model: nn.Module, plan: Plan, *, sensitivity: Mapping[str, Any] | None = None,
                keep_dense: Mapping[str, str] | None = None, patterns_checked: bool = False) -> list[LayerDecision]:
    """Decide, for every layer of ``model`` a registered format compresses, what the plan does with it.

    Parameters
    ----------
    model : nn.Module
        The dense (or partly compressed) model; it is not modified.
    plan : Plan
        What to do.
    sensitivity : mapping of str to torch.Tensor, optional
        Input Gram matrices by layer name (:func:`ttcompress.compression.allocate.input_grams`): under
        ``target_ratio`` the allocator then measures each rank's output error instead of the
        weight error.
    keep_dense : mapping of str to str, optional
        Layers that must stay dense whatever the plan says (a replacement would break the model,
        :func:`ttcompress.compression.surgery_checks.guard_reasons`), with the reason. A selected one keeps the
        reason as its ``skipped``; under ``target_ratio`` it holds its dense parameters, so the budget goes to
        the layers that can take it.
    patterns_checked : bool, default False
        The caller checked that every pattern of the plan matches a layer (:func:`check_patterns_match`)
        of the larger model that ``model`` is a part of (one transformer block,
        :mod:`ttcompress.compression.blockwise`): they are not checked against ``model``.

    Returns
    -------
    list of LayerDecision
        In module order. Layers that stay dense carry the reason in ``skipped``.

    Raises
    ------
    PatternError
        A ``layers``, ``exclude`` or rule pattern matches no layer (dense or already compressed).

    Notes
    -----
    **Rank allocation for** ``target_ratio``: every selected layer starts at its lowest rank and
    :func:`ttcompress.compression.allocate.allocate` raises ranks greedily where the estimated error drops most
    per added parameter, within the budget ``total params / target_ratio``. Layers fixed by a rule
    (explicit ``ranks``) keep their ranks and count as fixed parameters. If the lowest rank
    everywhere still exceeds the budget, a ``ValueError`` gives the best ratio reachable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    if not patterns_checked:
        check_patterns_match(plan, pattern_names(model))
    guards = dict(keep_dense or {})
    if plan.target_ratio is None:
        return [_decide(n, m, a, plan, guard=guards.get(n)) for n, m, a in compressible_layers(model)]
    return _allocate(model, plan, sensitivity, guards)


def allocation_slots(model: nn.Module, plan: Plan, keep_dense: Mapping[str, str] | None = None) -> list[Slot]:
    """What :func:`ttcompress.compression.allocate.allocate` is offered for ``plan.target_ratio``: one
    :class:`~ttcompress.compression.allocate.Slot` per compressible layer of ``model``, at its lowest
    rank unless a rule fixes its ranks (``keep_dense`` as for :func:`plan_layers`; patterns unchecked)."""
    # types the plan's formats do not cover get the target-ratio default (auto)
    extra = () if plan.others == DENSE else tuple(
        f.name for f in _formats() if f.default_under_target_ratio and f.name not in plan.formats)
    base = replace(plan, target_ratio=None, formats=plan.formats + extra)
    guards = dict(keep_dense or {})
    slots = []
    for name, module, aliases in compressible_layers(model):
        rule = plan.merged_rule(name)
        fixed = rule is not None and rule.get("ranks") is not None
        slots.append(Slot(module, _decide(name, module, aliases, base, lowest=not fixed, guard=guards.get(name)), fixed))
    return slots


def _allocate(model: nn.Module, plan: Plan, sensitivity: Mapping[str, Any] | None,
              guards: Mapping[str, str]) -> list[LayerDecision]:
    """The decisions of :func:`ttcompress.compression.allocate.allocate` for ``plan.target_ratio``."""
    slots = allocation_slots(model, plan, guards)
    total = sum(p.numel() for p in model.parameters())
    return allocate(slots, total=total, target_ratio=float(plan.target_ratio),  # type: ignore[arg-type]
                    sensitivity=sensitivity, min_saving=plan.saving_floor(sensitivity is not None),
                    max_error=plan.max_error)
