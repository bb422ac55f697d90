"""Compression plans: *what* gets compressed and *how*, as plain serializable data.

A :class:`Plan` holds

* defaults per format: :class:`TTSettings` for ``nn.Linear`` → TT-matrix (``ranks``, ``eps``,
  ``d``, modes) and :class:`CPSettings` for ``nn.Conv2d`` → CP (``rank`` or ``ratio``, extra ALS
  options);
* ``layers`` / ``exclude``: glob patterns (:func:`fnmatch.fnmatchcase`) on qualified module names
  (``layer1.0.conv1``; ``*`` also matches dots);
* ``rules``: per-layer overrides, name pattern → format (``"tt"``, ``"cp"`` or ``"dense"``) and
  ranks / eps / d / ratio. Every rule whose pattern matches applies, in order; a later rule's
  fields override an earlier one's (like CSS);
* ``target_ratio``: a whole-model parameter compression to reach; per-layer ranks are then chosen
  by :func:`plan_layers` (see "Rank allocation" there).

Plan files are YAML or JSON with the same keys as :meth:`Plan.to_dict`::

    tt: {ranks: 8, d: 3}
    cp: {ratio: 4, options: {n_iter_max: 50}}
    exclude: ["conv1"]
    rules:
      - {pattern: "fc", format: tt, ranks: 4}
      - {pattern: "layer4.*", format: cp, ranks: 32}
      - {pattern: "classifier.*", format: dense}

:func:`plan_layers` turns a plan and a model into one :class:`LayerDecision` per Linear/Conv2d
(format, constructor options, predicted parameter counts, or the reason it stays dense).
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ttcompress.decompose.cp import cp_param_count, cp_rank_for_ratio
from ttcompress.decompose.tt import tt_param_count, tt_ranks

__all__ = [
    "DEFAULT_CP_RATIO",
    "DEFAULT_TT_RANKS",
    "CPSettings",
    "LayerDecision",
    "Plan",
    "Rule",
    "TTSettings",
    "load_plan",
    "plan_from_options",
    "plan_layers",
    "save_plan",
    "suggest_modes",
]

Format = Literal["tt", "cp", "dense"]
FORMATS: tuple[str, ...] = ("tt", "cp", "dense")

#: TT max rank used when neither ranks nor eps is given anywhere.
DEFAULT_TT_RANKS = 8
#: CP compression factor per conv used when neither rank nor ratio is given anywhere.
DEFAULT_CP_RATIO = 4.0


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------
def _pos_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return value


def _ranks(value: Any, what: str) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what} must not be empty")
        return tuple(_pos_int(v, what) for v in value)
    return _pos_int(value, what)


def _modes(value: Any, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what} must be a non-empty list of positive integers, got {value!r}")
    return tuple(_pos_int(v, what) for v in value)


def _eps(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{what} must be a relative error in (0, 1), got {value!r}")
    return float(value)


def _ratio(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1.0:
        raise ValueError(f"{what} must be a compression factor > 1, got {value!r}")
    return float(value)


def _d(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{what} must be an integer >= 2 (number of TT cores), got {value!r}")
    return value


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of glob patterns, got {value!r}")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{what} must hold non-empty glob patterns, got {v!r}")
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}")


def _freeze_options(options: Any, what: str) -> tuple[tuple[str, Any], ...]:
    if options is None:
        return ()
    if isinstance(options, Mapping):
        items = list(options.items())
    elif isinstance(options, (list, tuple)):
        items = [tuple(kv) for kv in options]
    else:
        raise ValueError(f"{what} must be a mapping of keyword arguments, got {options!r}")
    for k, v in items:
        if not isinstance(k, str):
            raise ValueError(f"{what}: keys must be strings, got {k!r}")
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{k!r}] must be JSON-serializable, got {v!r}") from None
    return tuple(sorted(items))


# --------------------------------------------------------------------------------------------------
# Plan data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TTSettings:
    """How ``nn.Linear`` layers become :class:`~ttcompress.layers.tt_linear.TTLinear`.

    Parameters
    ----------
    ranks : int or tuple of int, optional
        Max TT rank (int) or the full rank tuple ``(1, r1, ..., 1)``.
    eps : float, optional
        Relative Frobenius error per layer for TT-SVD, in (0, 1). With ``ranks`` too, both apply.
    d : int, optional
        Number of TT cores (>= 2); the layer's default when None.
    in_modes, out_modes : tuple of int, optional
        Explicit factorizations of in/out features (rules only, usually).
    """

    ranks: int | tuple[int, ...] | None = None
    eps: float | None = None
    d: int | None = None
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", _ranks(self.ranks, "tt ranks (--tt-ranks)"))
        object.__setattr__(self, "eps", _eps(self.eps, "tt eps (--tt-eps)"))
        object.__setattr__(self, "d", _d(self.d, "tt d (--tt-d)"))
        object.__setattr__(self, "in_modes", _modes(self.in_modes, "tt in_modes"))
        object.__setattr__(self, "out_modes", _modes(self.out_modes, "tt out_modes"))


@dataclass(frozen=True)
class CPSettings:
    """How ``nn.Conv2d`` layers become :class:`~ttcompress.layers.cp_conv.CPConv2d`.

    Parameters
    ----------
    rank : int, optional
        CP rank. Mutually exclusive with ``ratio``.
    ratio : float, optional
        Choose, per conv, the largest rank that compresses it by at least this factor (> 1).
    options : tuple of (str, value), optional
        Extra keyword arguments for ``CPConv2d.from_conv`` (e.g. ``n_iter_max``); a dict is
        accepted and frozen.
    """

    rank: int | None = None
    ratio: float | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", None if self.rank is None else _pos_int(self.rank, "cp rank (--cp-ranks)"))
        object.__setattr__(self, "ratio", _ratio(self.ratio, "cp ratio (--cp-ratio)"))
        object.__setattr__(self, "options", _freeze_options(self.options, "cp options"))
        if self.rank is not None and self.ratio is not None:
            raise ValueError("cp rank (--cp-ranks) and cp ratio (--cp-ratio) are mutually exclusive; give one")


@dataclass(frozen=True)
class Rule:
    """Override for the layers whose qualified name matches ``pattern`` (a glob).

    ``ranks`` means the max TT rank for a TT layer and the CP rank for a CP layer; ``eps``,
    ``d``, ``in_modes``, ``out_modes`` apply to TT, ``ratio`` and ``options`` to CP.
    ``format="dense"`` keeps matching layers uncompressed.
    """

    pattern: str
    format: Format | None = None
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
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"rule {self.pattern!r}: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        where = f"rule {self.pattern!r}"
        object.__setattr__(self, "ranks", _ranks(self.ranks, f"{where} ranks"))
        object.__setattr__(self, "eps", _eps(self.eps, f"{where} eps"))
        object.__setattr__(self, "d", _d(self.d, f"{where} d"))
        object.__setattr__(self, "in_modes", _modes(self.in_modes, f"{where} in_modes"))
        object.__setattr__(self, "out_modes", _modes(self.out_modes, f"{where} out_modes"))
        object.__setattr__(self, "ratio", _ratio(self.ratio, f"{where} ratio"))
        object.__setattr__(self, "options", _freeze_options(self.options, f"{where} options"))
        if self.ranks is not None and self.ratio is not None:
            raise ValueError(f"{where}: ranks and ratio are mutually exclusive")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


_RULE_KEYS = ("pattern", "format", "ranks", "rank", "eps", "d", "in_modes", "out_modes", "ratio", "options")
_PLAN_KEYS = ("tt", "cp", "layers", "exclude", "rules", "target_ratio")


@dataclass(frozen=True)
class Plan:
    """What to compress and how. Immutable; build variants with :func:`dataclasses.replace`.

    Parameters
    ----------
    tt : TTSettings
        Defaults for Linear layers.
    cp : CPSettings
        Defaults for Conv2d layers.
    layers : tuple of str
        Only layers matching one of these globs are compressed (all when empty).
    exclude : tuple of str
        Layers matching one of these globs stay dense.
    rules : tuple of Rule
        Per-layer overrides, applied in order.
    target_ratio : float, optional
        Whole-model parameter compression factor (> 1) to reach by choosing per-layer ranks.
    """

    tt: TTSettings = field(default_factory=TTSettings)
    cp: CPSettings = field(default_factory=CPSettings)
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    target_ratio: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tt, TTSettings):
            raise TypeError(f"tt must be TTSettings, got {type(self.tt).__name__}")
        if not isinstance(self.cp, CPSettings):
            raise TypeError(f"cp must be CPSettings, got {type(self.cp).__name__}")
        object.__setattr__(self, "layers", _patterns(self.layers, "layers (--layers)"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude (--exclude)"))
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"rules must hold Rule objects, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "target_ratio", _ratio(self.target_ratio, "target ratio (--target-ratio)"))
        if self.target_ratio is not None:
            fixed = [n for n, v in (("--tt-ranks", self.tt.ranks), ("--tt-eps", self.tt.eps),
                                    ("--cp-ranks", self.cp.rank), ("--cp-ratio", self.cp.ratio)) if v is not None]
            if fixed:
                raise ValueError(
                    f"target ratio (--target-ratio) chooses the ranks itself; do not combine it with {', '.join(fixed)}"
                )
            if any(r.eps is not None or r.ratio is not None for r in rules):
                raise ValueError("target ratio (--target-ratio) cannot be combined with plan rules that set eps or ratio")

    # ---- (de)serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the plan file format); ``None`` fields are left out."""

        def clean(d: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for k, v in d.items():
                if v is None or v == ():
                    continue
                if k == "options":
                    v = dict(v)
                elif isinstance(v, tuple):
                    v = list(v)
                out[k] = v
            return out

        data: dict[str, Any] = {}
        if clean(asdict(self.tt)):
            data["tt"] = clean(asdict(self.tt))
        if clean(asdict(self.cp)):
            data["cp"] = clean(asdict(self.cp))
        if self.layers:
            data["layers"] = list(self.layers)
        if self.exclude:
            data["exclude"] = list(self.exclude)
        if self.rules:
            data["rules"] = [clean(asdict(r)) for r in self.rules]
        if self.target_ratio is not None:
            data["target_ratio"] = self.target_ratio
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Plan:
        """Inverse of :meth:`to_dict`; unknown keys are a ``ValueError`` naming them."""
        data = dict(data or {})
        _check_keys(data, _PLAN_KEYS, "plan")
        tt = dict(data.get("tt") or {})
        _check_keys(tt, ("ranks", "eps", "d", "in_modes", "out_modes"), "plan tt")
        cp = dict(data.get("cp") or {})
        _check_keys(cp, ("rank", "ranks", "ratio", "options"), "plan cp")
        if "ranks" in cp:
            if "rank" in cp:
                raise ValueError("plan cp: give rank or ranks, not both")
            cp["rank"] = cp.pop("ranks")
        rules_data = data.get("rules") or []
        if not isinstance(rules_data, list):
            raise ValueError("plan rules must be a list of {pattern: ..., ...} entries")
        rules = []
        for i, r in enumerate(rules_data):
            _check_keys(r, _RULE_KEYS, f"plan rule #{i + 1}")
            r = dict(r)
            if "rank" in r:
                if "ranks" in r:
                    raise ValueError(f"plan rule #{i + 1}: give rank or ranks, not both")
                r["ranks"] = r.pop("rank")
            if "pattern" not in r:
                raise ValueError(f"plan rule #{i + 1} has no pattern")
            rules.append(Rule(**r))
        return cls(
            tt=TTSettings(**tt),
            cp=CPSettings(**cp),
            layers=data.get("layers") or (),
            exclude=data.get("exclude") or (),
            rules=tuple(rules),
            target_ratio=data.get("target_ratio"),
        )

    # ---- matching ---------------------------------------------------------------------------------
    def selects(self, name: str) -> str | None:
        """``None`` if layer ``name`` is selected, else the reason it is not."""
        if self.layers and not any(fnmatch.fnmatchcase(name, p) for p in self.layers):
            return "not matched by --layers"
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


def load_plan(path: str | Path) -> Plan:
    """Read a YAML (``.yaml``/``.yml``) or JSON plan file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        It cannot be parsed, or it describes an invalid plan.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"plan file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _safe_yaml(text)
    except Exception as exc:
        raise ValueError(f"plan file {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                         f"{' '.join(str(exc).split())[:160]}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(f"plan file {p} must hold a mapping at the top level")
    try:
        return Plan.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"plan file {p}: {exc}") from None


#: Most YAML nodes a plan may have, and the deepest nesting (plans are small and flat).
MAX_PLAN_NODES = 100_000
MAX_PLAN_DEPTH = 32


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases (no "billion laughs" expansion) and with bounded size and depth."""
    import yaml

    class Loader(yaml.SafeLoader):
        nodes = 0
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise ValueError("YAML aliases (*name) are not allowed in a plan file")
            Loader.nodes += 1
            if Loader.nodes > MAX_PLAN_NODES:
                raise ValueError(f"more than {MAX_PLAN_NODES:,} YAML nodes")
            Loader.depth += 1
            try:
                if Loader.depth > MAX_PLAN_DEPTH:
                    raise ValueError(f"YAML nested deeper than {MAX_PLAN_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                Loader.depth -= 1

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan`` as YAML (or JSON for a ``.json`` path), atomically."""
    from ttcompress.io import atomic_write

    p = Path(path)
    with atomic_write(p, "w") as f:
        if p.suffix.lower() == ".json":
            json.dump(plan.to_dict(), f, indent=2)
            f.write("\n")
        else:
            import yaml

            yaml.safe_dump(plan.to_dict(), f, sort_keys=False)
    return p


def plan_from_options(
    *,
    plan_file: str | Path | None = None,
    tt_ranks: int | None = None,
    tt_eps: float | None = None,
    tt_d: int | None = None,
    cp_ranks: int | None = None,
    cp_ratio: float | None = None,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    target_ratio: float | None = None,
) -> Plan:
    """Build a plan from command-line style options, on top of an optional plan file.

    Options given here override the file's defaults (``--cp-ranks`` replaces a file's
    ``cp.ratio`` and vice versa); ``layers``/``exclude`` patterns are added to the file's.
    """
    base = load_plan(plan_file) if plan_file is not None else Plan()
    tt = base.tt
    if tt_ranks is not None or tt_eps is not None or tt_d is not None:
        tt = TTSettings(
            ranks=tt_ranks if tt_ranks is not None else tt.ranks,
            eps=tt_eps if tt_eps is not None else tt.eps,
            d=tt_d if tt_d is not None else tt.d,
            in_modes=tt.in_modes,
            out_modes=tt.out_modes,
        )
    cp = base.cp
    if cp_ranks is not None and cp_ratio is not None:
        raise ValueError("--cp-ranks and --cp-ratio are mutually exclusive; give one")
    if cp_ranks is not None:
        cp = CPSettings(rank=cp_ranks, options=cp.options)
    elif cp_ratio is not None:
        cp = CPSettings(ratio=cp_ratio, options=cp.options)
    return Plan(
        tt=tt,
        cp=cp,
        layers=tuple(base.layers) + tuple(_patterns(list(layers), "layers (--layers)")),
        exclude=tuple(base.exclude) + tuple(_patterns(list(exclude), "exclude (--exclude)")),
        rules=base.rules,
        target_ratio=target_ratio if target_ratio is not None else base.target_ratio,
    )


# --------------------------------------------------------------------------------------------------
# Parameter counts and modes (from the decompose package)
# --------------------------------------------------------------------------------------------------
def suggest_modes(
    in_features: int, out_features: int, *, d: int | None = None, ranks: int | Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(in_modes, out_modes)`` a TTLinear of this shape gets with ``d`` cores.

    Delegates to :func:`ttcompress.decompose.modes.choose_modes` (balanced modes, zero-padding
    sizes that factor badly, arranged for the smallest parameter count at ``ranks``; default 8).
    """
    from ttcompress.decompose.modes import choose_modes

    return choose_modes(in_features, out_features, d=d, ranks=ranks if ranks is not None else DEFAULT_TT_RANKS)


def tt_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int]) -> int:
    """Parameters of the TT cores (no bias) for these modes and ranks (int = max-rank cap)."""
    return int(tt_param_count(tuple(in_modes), tuple(out_modes), ranks if isinstance(ranks, int) else tuple(ranks)))


def cp_params(out_channels: int, in_per_group: int, kh: int, kw: int, rank: int, groups: int = 1) -> int:
    """Parameters of the CP factors (no bias) of a conv kernel at ``rank``."""
    return int(cp_param_count(out_channels, in_per_group, kh, kw, rank, groups=groups))


def _bias_params(module: nn.Module) -> int:
    b = getattr(module, "bias", None)
    return int(b.numel()) if isinstance(b, torch.Tensor) else 0


def _dense_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cp_rank_for(conv: nn.Conv2d, ratio: float) -> int:
    """Largest CP rank whose layer (bias included) is at least ``ratio`` times smaller than ``conv``.

    Returns 0 when even rank 1 does not reach ``ratio``.
    """
    out_c, in_g, kh, kw = conv.weight.shape
    has_bias = conv.bias is not None
    return int(cp_rank_for_ratio(out_c, in_g, kh, kw, ratio, conv.groups, bias=has_bias))


# --------------------------------------------------------------------------------------------------
# Layer decisions
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDecision:
    """What the plan says for one Linear/Conv2d layer.

    Attributes
    ----------
    name : str
        Qualified module name (the first one, for a module shared under several names).
    type : str
        ``"Linear"`` or ``"Conv2d"``.
    shape : tuple of int
        Weight shape.
    format : {"tt", "cp", "dense"}
        ``"dense"`` when the layer is skipped.
    options : dict
        Keyword arguments for ``TTLinear.from_linear`` / ``CPConv2d.from_conv``.
    params_before : int
        Parameters of the dense layer (weight + bias).
    params_after : int or None
        Predicted parameters after compression (None when only ``eps`` fixes the ranks).
    skipped : str or None
        Why the layer stays dense.
    aliases : tuple of str
        Other names under which the same module object is reachable.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    format: Format
    options: dict[str, Any]
    params_before: int
    params_after: int | None
    skipped: str | None = None
    aliases: tuple[str, ...] = ()


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    names: dict[int, list[str]] = {}
    mods: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            names.setdefault(id(m), []).append(name)
            mods[id(m)] = m
    return [(ns[0], mods[i], tuple(ns[1:])) for i, ns in names.items()]


def _decide(
    name: str, module: nn.Module, aliases: tuple[str, ...], plan: Plan, score_ranks: int | None = None
) -> LayerDecision:
    kind = "Linear" if isinstance(module, nn.Linear) else "Conv2d"
    shape = tuple(module.weight.shape)
    before = _dense_params(module)

    def dense(reason: str) -> LayerDecision:
        return LayerDecision(name, kind, shape, "dense", {}, before, before, reason, aliases)

    reason = plan.selects(name)
    if reason is not None:
        return dense(reason)
    rule = plan.merged_rule(name)
    default_fmt = "tt" if kind == "Linear" else "cp"
    fmt = (rule.format if rule is not None and rule.format is not None else default_fmt)
    if fmt == "dense":
        return dense("plan rule: dense")
    if fmt != default_fmt:
        return dense(f"format {fmt} does not apply to {kind} (use {default_fmt})")
    bias = _bias_params(module)

    if fmt == "tt":
        s = plan.tt
        ranks = s.ranks
        eps = s.eps
        d = s.d
        in_modes, out_modes = s.in_modes, s.out_modes
        if rule is not None:
            if rule.ranks is not None or rule.eps is not None:  # a rule's ranks/eps replace both defaults
                ranks, eps = rule.ranks, rule.eps
            d = rule.d if rule.d is not None else d
            in_modes = rule.in_modes if rule.in_modes is not None else in_modes
            out_modes = rule.out_modes if rule.out_modes is not None else out_modes
        if ranks is None and eps is None:
            ranks = DEFAULT_TT_RANKS
        out_f, in_f = shape
        if in_modes is None or out_modes is None:
            d_eff = d if d is not None else (len(in_modes or out_modes or ()) or None)
            sug_in, sug_out = suggest_modes(in_f, out_f, d=d_eff, ranks=score_ranks or ranks)
            in_modes = in_modes or sug_in
            out_modes = out_modes or sug_out
        from ttcompress.decompose.modes import validate_modes

        try:
            in_modes = validate_modes(in_modes, in_f, name="in_modes")
            out_modes = validate_modes(out_modes, out_f, name="out_modes", d=len(in_modes))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"layer {name!r} ({in_f} -> {out_f}): {exc}") from None
        options: dict[str, Any] = {"ranks": list(ranks) if isinstance(ranks, tuple) else ranks, "eps": eps,
                                   "in_modes": list(in_modes), "out_modes": list(out_modes)}
        if len(in_modes) < 2:
            return dense(f"{in_f}x{out_f} cannot be split into TT cores")
        after = None if ranks is None else tt_params(in_modes, out_modes, ranks) + bias
        if after is not None and after >= before:
            return LayerDecision(name, kind, shape, "dense", options, before, after,
                                 f"would not shrink at TT ranks {ranks} ({after} >= {before} params)", aliases)
        return LayerDecision(name, kind, shape, "tt", options, before, after, None, aliases)

    # fmt == "cp"
    conv: nn.Conv2d = module  # type: ignore[assignment]
    if conv.groups > 1:
        if conv.groups == conv.in_channels:
            return dense("depthwise conv")
        return dense(f"grouped conv (groups={conv.groups}) unsupported")
    s = plan.cp
    rank, ratio = s.rank, s.ratio
    options = dict(s.options)
    if rule is not None:
        if rule.ranks is not None or rule.ratio is not None:
            if isinstance(rule.ranks, tuple):
                raise ValueError(f"rule {rule.pattern!r}: a CP layer takes one integer rank, got {list(rule.ranks)}")
            rank, ratio = rule.ranks, rule.ratio  # type: ignore[assignment]
        options.update(dict(rule.options))
    if rank is None and ratio is None:
        ratio = DEFAULT_CP_RATIO
    if rank is None:
        rank = cp_rank_for(conv, ratio)  # type: ignore[arg-type]
        if rank < 1:
            return dense(f"would not shrink {ratio:g}x even at CP rank 1")
    out_c, in_g, kh, kw = shape
    after = cp_params(out_c, in_g, kh, kw, rank, conv.groups) + bias
    options = {"rank": rank, **options}
    if after >= before:
        return LayerDecision(name, kind, shape, "dense", options, before, after,
                             f"would not shrink at CP rank {rank} ({after} >= {before} params)", aliases)
    return LayerDecision(name, kind, shape, "cp", options, before, after, None, aliases)


def plan_layers(model: nn.Module, plan: Plan) -> list[LayerDecision]:
    """Decide, for every ``nn.Linear`` and ``nn.Conv2d`` of ``model``, what the plan does with it.

    Parameters
    ----------
    model : nn.Module
        The dense (or partly compressed) model; it is not modified.
    plan : Plan
        What to do.

    Returns
    -------
    list of LayerDecision
        In module order. Layers that stay dense carry the reason in ``skipped``.

    Notes
    -----
    **Rank allocation for** ``target_ratio``. The budget is ``total params / target_ratio``.
    Every selected layer starts at rank 1; then ranks are raised one step at a time, always on the
    layer whose next step buys the largest decrease of the estimated squared relative error per
    added parameter (a greedy marginal-gain allocation, as in rank-selection methods for low-rank
    compression), as long as the step fits the budget. A layer never grows to a rank at which it
    would not shrink. The errors are estimated from singular values, without decomposing:

    * TT (uniform max rank ``r``): TT-SVD's bound ``||W - W_r||^2 <= sum_k tail_k(r)^2``, where
      ``tail_k(r)`` is the error of the best rank-``r`` approximation of the ``k``-th unfolding of
      the reshaped weight [Oseledets 2011, Thm. 2.2];
    * CP (rank ``R``): a CP tensor of rank ``R`` has multilinear ranks ``<= R``, so
      ``max_n tail_n(R)^2`` over the out/in/spatial unfoldings is a lower bound of the best rank-R
      CP error [Kolda & Bader 2009]; it serves as a cheap proxy.

    Layers fixed by a rule (explicit ``ranks``) keep their ranks and count as fixed parameters.
    If rank 1 everywhere still exceeds the budget, a ``ValueError`` gives the best ratio reachable.

    References
    ----------
    I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
    T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    cands = _candidates(model)
    if plan.target_ratio is None:
        return [_decide(n, m, a, plan) for n, m, a in cands]
    return _allocate(model, cands, plan)


# ---- target-ratio allocation -------------------------------------------------------------------
def _tails(mat: torch.Tensor) -> torch.Tensor:
    """tail[r] = sum_{j >= r} s_j^2 (squared error of the best rank-r approximation), r = 0..len."""
    a = mat.to(torch.float64)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a  # squared singular values = its eigenvalues
    s2 = torch.linalg.eigvalsh(gram).clamp_min(0.0).flip(0)  # descending
    sq = s2.flip(0).cumsum(0).flip(0)
    return torch.cat([sq, sq.new_zeros(1)])


def _tt_error_curve(weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int], rmax: int) -> list[float]:
    d = len(in_modes)
    w = weight.detach().to(torch.float64)
    pad_out, pad_in = math.prod(out_modes) - w.shape[0], math.prod(in_modes) - w.shape[1]
    if pad_out or pad_in:  # modes may zero-pad the layer's sizes
        w = torch.nn.functional.pad(w, (0, pad_in, 0, pad_out))
    w = w.reshape(*out_modes, *in_modes)
    perm = [x for k in range(d) for x in (k, d + k)]
    t = w.permute(*perm).reshape([out_modes[k] * in_modes[k] for k in range(d)])
    norm2 = float(t.square().sum()) or 1.0
    sizes = list(t.shape)
    tails = []
    for k in range(1, d):
        tails.append(_tails(t.reshape(math.prod(sizes[:k]), -1)))
    out = []
    for r in range(1, rmax + 1):
        e2 = sum(float(tl[min(r, len(tl) - 1)]) for tl in tails)
        out.append(e2 / norm2)
    return out


def _cp_error_curve(weight: torch.Tensor, rmax: int) -> list[float]:
    w = weight.detach().to(torch.float64)
    o, i, kh, kw = w.shape
    norm2 = float(w.square().sum()) or 1.0
    unfold = [w.reshape(o, -1), w.permute(1, 0, 2, 3).reshape(i, -1), w.permute(2, 3, 0, 1).reshape(kh * kw, -1)]
    tails = [_tails(u) for u in unfold]
    return [max(float(tl[min(r, len(tl) - 1)]) for tl in tails) / norm2 for r in range(1, rmax + 1)]


def _allocate(model: nn.Module, cands: list[tuple[str, nn.Module, tuple[str, ...]]], plan: Plan) -> list[LayerDecision]:
    target = float(plan.target_ratio)  # type: ignore[arg-type]
    total = sum(p.numel() for p in model.parameters())
    budget = total / target
    # First pass with rank 1 everywhere (rules with explicit ranks keep theirs).
    base_plan = replace(plan, target_ratio=None, tt=replace(plan.tt, ranks=1), cp=CPSettings(rank=1, options=plan.cp.options))
    decisions = [_decide(n, m, a, base_plan, score_ranks=DEFAULT_TT_RANKS) for n, m, a in cands]
    free: list[int] = []
    for idx, (dec, (name, _m, _a)) in enumerate(zip(decisions, cands)):
        rule = plan.merged_rule(name)
        fixed = rule is not None and rule.ranks is not None
        if fixed:
            decisions[idx] = _decide(name, _m, _a, replace(plan, target_ratio=None))
        elif dec.skipped is None:
            free.append(idx)
    fixed_params = total - sum(d.params_before for d in decisions) + sum(
        (d.params_after if d.skipped is None and d.params_after is not None else d.params_before) for d in decisions
    )
    if fixed_params > budget:
        raise ValueError(
            f"target ratio (--target-ratio) {target:g} is out of reach: rank 1 in every compressible layer gives "
            f"{total / fixed_params:.2f}x ({fixed_params} of {total} params)"
        )
    # Ladders: params(r) and estimated squared relative error(r), r = 1..rmax.
    ladders: dict[int, tuple[list[int], list[float]]] = {}
    for idx in free:
        dec = decisions[idx]
        module = cands[idx][1]
        bias = _bias_params(module)
        params: list[int] = []
        if dec.format == "tt":
            in_m, out_m = dec.options["in_modes"], dec.options["out_modes"]
            full = max(tt_ranks(in_m, out_m, 10**9))
            for r in range(1, full + 1):
                p = tt_params(in_m, out_m, r) + bias
                if p >= dec.params_before:
                    break
                params.append(p)
            errs = _tt_error_curve(module.weight, in_m, out_m, len(params))
        else:
            o, i, kh, kw = dec.shape
            r = 1
            while True:
                p = cp_params(o, i, kh, kw, r, 1) + bias
                if p >= dec.params_before:
                    break
                params.append(p)
                r += 1
            errs = _cp_error_curve(module.weight, len(params))
        ladders[idx] = (params, errs)
    level = {idx: 0 for idx in free}  # index into the ladder (rank = level + 1)
    spent = fixed_params
    heap: list[tuple[float, int, int]] = []

    def push(idx: int) -> None:
        params, errs = ladders[idx]
        k = level[idx]
        if k + 1 < len(params):
            cost = params[k + 1] - params[k]
            gain = errs[k] - errs[k + 1]
            heapq.heappush(heap, (-(gain / max(cost, 1)), idx, k))

    for idx in free:
        push(idx)
    while heap:
        _neg, idx, k = heapq.heappop(heap)
        if level[idx] != k:
            continue
        params, _ = ladders[idx]
        cost = params[k + 1] - params[k]
        if spent + cost > budget:
            continue  # this layer cannot grow further; others may
        spent += cost
        level[idx] = k + 1
        push(idx)
    for idx in free:
        dec = decisions[idx]
        rank = level[idx] + 1
        params, _ = ladders[idx]
        opts = dict(dec.options)
        if dec.format == "tt":
            opts["ranks"] = rank
            opts["eps"] = None
        else:
            opts["rank"] = rank
        decisions[idx] = replace(dec, options=opts, params_after=params[level[idx]])
    return decisions
