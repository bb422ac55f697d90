"""Compression plans: *what* gets compressed and *how*, as plain serializable data.

A :class:`Plan` holds

* settings per registered format (:mod:`ttcompress.formats`): the ``tt`` and ``cp`` fields
  (:class:`TTSettings` for ``nn.Linear`` → TT-matrix, :class:`CPSettings` for ``nn.Conv2d`` → CP,
  the defaults), and ``settings`` for the others (``svd``, ``tucker2``, ``auto``);
* ``formats``: the formats to use, the first one that compresses a layer's type wins;
* ``layers`` / ``exclude``: glob patterns (:func:`fnmatch.fnmatchcase`) on qualified module names
  (``layer1.0.conv1``; ``*`` also matches dots); a pattern that matches no layer is an error;
* ``rules``: per-layer overrides, name pattern → format (a registered name or ``"dense"``) and
  ranks / eps / d / ratio. Every rule whose pattern matches applies, in order; a later rule's
  fields override an earlier one's (like CSS);
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

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from torch import nn

from ttcompress.compression.allocate import Slot, allocate
from ttcompress.decompose.modes import choose_modes
from ttcompress.errors import TTCompressError
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
from ttcompress.formats.base import dense_params
from ttcompress.formats.checks import (
    check_d,
    check_eps,
    check_keys,
    check_modes,
    check_patterns,
    check_ranks,
    check_ratio,
    freeze_options,
)
from ttcompress.formats.cp import DEFAULT_CP_RATIO, CPSettings, cp_params, cp_rank_for
from ttcompress.formats.tt import DEFAULT_TT_RANKS, TTSettings, tt_params

__all__ = [
    "DEFAULT_CP_RATIO",
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
    "plan_layers",
    "suggest_modes",
    "tt_params",
]


class PatternError(TTCompressError, ValueError):
    """A ``layers``/``exclude``/rule glob matches no layer of the model."""


@dataclass(frozen=True)
class Rule:
    """Override for the layers whose qualified name matches ``pattern`` (a glob).

    ``format`` is any registered format name (:func:`ttcompress.formats.format_names`) or
    ``"dense"`` (keep matching layers uncompressed). The other fields are handed to the chosen
    format, which reads those it understands: ``ranks`` is the max TT rank for TT, the rank for
    CP and SVD, the ``(in, out)`` ranks for Tucker-2; ``eps`` a relative error (TT, SVD); ``d``,
    ``in_modes``, ``out_modes`` TT's; ``ratio`` a per-layer compression factor; ``options``
    extra build options (CP-ALS, Tucker-2 HOOI).
    """

    pattern: str
    format: str | None = None
    ranks: int | tuple[int, ...] | None = None
    eps: float | None = None
    d: int | None = None
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    ratio: float | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise ValueError(f"rule pattern must be a non-empty glob, got {self.pattern!r}")
        allowed = (*format_names(), DENSE)
        if self.format is not None and self.format not in allowed:
            raise ValueError(f"rule {self.pattern!r}: format must be one of {', '.join(allowed)}, got {self.format!r}")
        where = f"rule {self.pattern!r}"
        object.__setattr__(self, "ranks", check_ranks(self.ranks, f"{where} ranks"))
        object.__setattr__(self, "eps", check_eps(self.eps, f"{where} eps"))
        object.__setattr__(self, "d", check_d(self.d, f"{where} d"))
        object.__setattr__(self, "in_modes", check_modes(self.in_modes, f"{where} in_modes"))
        object.__setattr__(self, "out_modes", check_modes(self.out_modes, f"{where} out_modes"))
        object.__setattr__(self, "ratio", check_ratio(self.ratio, f"{where} ratio"))
        object.__setattr__(self, "options", freeze_options(self.options, f"{where} options"))
        if self.ranks is not None and self.ratio is not None:
            raise ValueError(f"{where}: ranks and ratio are mutually exclusive")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def override(self) -> dict[str, Any]:
        """The fields a format reads (all but ``pattern`` and ``format``) that are set."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("pattern", "format") and v is not None and v != ()}


_RULE_KEYS = ("pattern", "format", "ranks", "rank", "eps", "d", "in_modes", "out_modes", "ratio", "options")
_PLAN_KEYS = ("layers", "exclude", "rules", "target_ratio", "formats", "min_saving", "max_error", "others")
#: Defaults of :attr:`Plan.min_saving` (fraction of the model's parameters) and :attr:`Plan.max_error`.
DEFAULT_MIN_SAVING = 0.01
DEFAULT_MAX_ERROR = 0.5


def _check_fraction(value: Any, name: str, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or (
            upper is not None and not value < upper):
        bound = f"in [0, {upper:g})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)
#: Values of :attr:`Plan.others`.
OTHERS = ("default", DENSE)
#: Settings fields of a format (when set, the rank allocator of ``target_ratio`` cannot choose ranks).
_RANK_FIELDS = ("rank", "ranks", "eps", "ratio")


def _check_formats(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"formats must be a list of format names, got {value!r}")
    names = format_names()
    for v in value:
        if v not in names:
            raise ValueError(f"formats: unknown format {v!r}; registered: {', '.join(names)}")
    if len(set(value)) != len(value):
        raise ValueError(f"formats must not repeat a name, got {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class Plan:
    """What to compress and how. Immutable; build variants with :func:`dataclasses.replace`.

    Parameters
    ----------
    tt : TTSettings
        Settings of the ``tt`` format (Linear layers by default).
    cp : CPSettings
        Settings of the ``cp`` format (Conv2d layers by default).
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
    settings : dict or tuple of (name, settings)
        Settings of the other registered formats, by name (each an instance of that format's
        ``settings`` class, or a dict of its fields); missing ones take their defaults.
    min_saving, max_error : float
        A layer stays dense when compressing it saves fewer than ``min_saving`` times the model's
        parameters while its relative error (output error on calibration data after fitting,
        else weight error) exceeds ``max_error`` (default 0.5; e.g. a 128 -> 10 classifier that
        would save 700 params at error 0.66). ``min_saving`` None (the default) means
        :data:`DEFAULT_MIN_SAVING` (1%) when calibration data are given and 0 (off) without:
        a weight error is a poor predictor of the accuracy cost, a measured output error is not.
        ``min_saving=0`` turns the rule off.
    """

    def saving_floor(self, calibrated: bool) -> float:
        """The ``min_saving`` in force (see the class docstring)."""
        if self.min_saving is not None:
            return self.min_saving
        return DEFAULT_MIN_SAVING if calibrated else 0.0

    tt: TTSettings = field(default_factory=TTSettings)
    cp: CPSettings = field(default_factory=CPSettings)
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    target_ratio: float | None = None
    formats: tuple[str, ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()
    min_saving: float | None = None
    max_error: float = DEFAULT_MAX_ERROR
    others: str = "default"

    def __post_init__(self) -> None:
        if self.min_saving is not None:
            object.__setattr__(self, "min_saving",
                               _check_fraction(self.min_saving, "min_saving", upper=1.0))
        object.__setattr__(self, "max_error", _check_fraction(self.max_error, "max_error"))
        for name in _field_formats():
            fmt_settings = get_format(name).settings
            if not isinstance(getattr(self, name), fmt_settings):
                raise TypeError(f"{name} must be {fmt_settings.__name__}, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "layers", check_patterns(self.layers, "layers"))
        object.__setattr__(self, "exclude", check_patterns(self.exclude, "exclude"))
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"rules must hold Rule objects, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "target_ratio", check_ratio(self.target_ratio, "target_ratio"))
        object.__setattr__(self, "formats", _check_formats(self.formats))
        object.__setattr__(self, "settings", _check_settings(self.settings))
        if self.others not in OTHERS:
            raise ValueError(f"others must be one of {', '.join(OTHERS)}, got {self.others!r}")
        if self.target_ratio is not None:
            fixed = [f"{name}.{k}" for name in format_names() for k in _RANK_FIELDS
                     if getattr(self.settings_for(name), k, None) is not None]
            if fixed:
                raise ValueError(
                    f"target_ratio chooses the ranks itself; do not combine it with {', '.join(fixed)}"
                )
            if any(r.eps is not None or r.ratio is not None for r in rules):
                raise ValueError("target_ratio cannot be combined with plan rules that set eps or ratio")

    def settings_for(self, name: str) -> Any:
        """The settings of format ``name`` (a field of the plan, an entry of ``settings``, or the defaults)."""
        fmt = get_format(name)
        if name in _field_formats():
            return getattr(self, name)
        return dict(self.settings).get(name) or fmt.settings()

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
        own = _field_formats()
        kwargs: dict[str, Any] = {}
        others: dict[str, Any] = {}
        for name in format_names():
            if name in data:
                settings = get_format(name).settings_from_dict(data[name])
                (kwargs if name in own else others)[name] = settings
        rules_data = data.get("rules") or []
        if not isinstance(rules_data, list):
            raise ValueError("plan rules must be a list of {pattern: ..., ...} entries")
        rules = []
        for i, r in enumerate(rules_data):
            check_keys(r, _RULE_KEYS, f"plan rule #{i + 1}")
            r = dict(r)
            if "rank" in r:
                if "ranks" in r:
                    raise ValueError(f"plan rule #{i + 1}: give rank or ranks, not both")
                r["ranks"] = r.pop("rank")
            if "pattern" not in r:
                raise ValueError(f"plan rule #{i + 1} has no pattern")
            rules.append(Rule(**r))
        return cls(
            **kwargs,
            layers=data.get("layers") or (),
            exclude=data.get("exclude") or (),
            rules=tuple(rules),
            target_ratio=data.get("target_ratio"),
            formats=data.get("formats") or (),
            settings=others,
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
        merged: dict[str, Any] | None = None
        for r in self.rules:
            if r.matches(name):
                fields = {k: v for k, v in asdict(r).items() if v is not None and v != ()}
                merged = {**(merged or {}), **fields}
        if merged is None:
            return None
        merged["pattern"] = name
        if "ranks" in merged and "ratio" in merged:  # a later rule's ranks/ratio replaces the other
            last = [r for r in self.rules if r.matches(name) and (r.ranks is not None or r.ratio is not None)][-1]
            merged.pop("ratio" if last.ranks is not None else "ranks")
        return Rule(**merged)


def _formats() -> tuple[CompressionFormat, ...]:
    return tuple(get_format(n) for n in format_names())


def _field_formats() -> tuple[str, ...]:
    """Registered formats whose settings are a field of :class:`Plan` (the others go in ``settings``)."""
    own = {f.name for f in fields(Plan)}
    return tuple(n for n in format_names() if n in own)


def _check_settings(value: Any) -> tuple[tuple[str, Any], ...]:
    items = dict(value or {}) if isinstance(value, Mapping) else dict(value or ())
    out = []
    for name, s in items.items():
        fmt = get_format(name)
        if name in _field_formats():
            raise ValueError(f"settings: give the {name} settings as the plan's {name} field")
        if isinstance(s, Mapping):
            s = fmt.settings_from_dict(s)
        if not isinstance(s, fmt.settings):
            raise TypeError(f"settings[{name!r}] must be {fmt.settings.__name__}, got {type(s).__name__}")
        if s != fmt.settings():
            out.append((name, s))
    return tuple(sorted(out))


def _rule_to_dict(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in asdict(rule).items():
        if v is None or v == ():
            continue
        out[k] = dict(v) if k == "options" else list(v) if isinstance(v, tuple) else v
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


def plan_layers(model: nn.Module, plan: Plan, *, sensitivity: Mapping[str, Any] | None = None,
                keep_dense: Mapping[str, str] | None = None) -> list[LayerDecision]:
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
    cands = compressible_layers(model)
    done = layer_classes()
    inner = _inside_factorized(model)
    names = [n for n, m in model.named_modules(remove_duplicate=False)
             if id(m) not in inner and (compressible(m) or isinstance(m, done))]
    check_patterns_match(plan, names)
    guards = dict(keep_dense or {})
    if plan.target_ratio is None:
        return [_decide(n, m, a, plan, guard=guards.get(n)) for n, m, a in cands]
    return _allocate(model, cands, plan, sensitivity, guards)


def _allocate(model: nn.Module, cands: list[Candidate], plan: Plan,
              sensitivity: Mapping[str, Any] | None, guards: Mapping[str, str]) -> list[LayerDecision]:
    """The decisions of :func:`ttcompress.compression.allocate.allocate` for ``plan.target_ratio``."""
    # types the plan's formats do not cover get the target-ratio default (auto)
    extra = () if plan.others == DENSE else tuple(
        f.name for f in _formats() if f.default_under_target_ratio and f.name not in plan.formats)
    base = replace(plan, target_ratio=None, formats=plan.formats + extra)
    slots = []
    for name, module, aliases in cands:
        rule = plan.merged_rule(name)
        fixed = rule is not None and rule.ranks is not None
        slots.append(Slot(module, _decide(name, module, aliases, base, lowest=not fixed, guard=guards.get(name)), fixed))
    total = sum(p.numel() for p in model.parameters())
    return allocate(slots, total=total, target_ratio=float(plan.target_ratio),  # type: ignore[arg-type]
                    sensitivity=sensitivity, min_saving=plan.saving_floor(sensitivity is not None),
                    max_error=plan.max_error)
