"""The compression-format abstraction: one :class:`CompressionFormat` per way of factorizing a layer.

A format owns everything that differs between, say, TT-matrix Linear layers and CP convolutions:

* ``settings``: a frozen dataclass of its plan options (``TTSettings``, ``CPSettings``, ...) whose
  fields are declared with :func:`setting`: its metadata say which fields a plan rule replaces
  together (``group``), which a command-line value clears (``excludes``), and which get a
  command-line flag (``help``; the CLI generates ``--FORMAT-FIELD`` from it);
* :meth:`~CompressionFormat.with_overrides`: those settings with a plan rule's or the command
  line's values applied, validated by the settings class (done once, here, for every format);
* :meth:`~CompressionFormat.decide`: what a dense layer would become under the settings and a
  rule's overrides (a :class:`LayerDecision` with the predicted parameter count), or why it stays
  dense; formats implement :meth:`~CompressionFormat.choose` on the merged settings;
* :meth:`~CompressionFormat.build`: the factorized layer, decomposed from the dense one, as a
  :class:`BuildResult` (the layer, its weight error, the calibration fit and a note);
* :meth:`~CompressionFormat.rebuild`: the same structure from a recorded ``config()`` (no
  decomposition, no unpickling);
* :meth:`~CompressionFormat.describe`: ranks and modes of a factorized layer, as typed data;
* optionally :meth:`~CompressionFormat.ladder` (parameter / error steps for the target-ratio rank
  allocator) and :meth:`~CompressionFormat.fit_budget` (the largest structure within a parameter
  budget, used by the ``auto`` format).

Formats are registered by name (:func:`ttcompress.formats.registry.register_format`); the plan,
surgery, checkpoint, inspect and report code loop over the registry and never name a format.
This follows torchao's "one config class per transform and a registry from config to handler".
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ttcompress.errors import InputError
from ttcompress.formats.checks import check_keys
from ttcompress.layer_report import count_params

__all__ = [
    "BuildResult",
    "CompressionFormat",
    "SettingField",
    "ESTIMATE",
    "EXACT",
    "ErrorPreview",
    "UPPER_BOUND",
    "FormatDescription",
    "Ladder",
    "LayerDecision",
    "SIZE",
    "bias_params",
    "dense_params",
    "join",
    "setting",
    "setting_fields",
]

#: Look up the settings of another format by name (used by formats that delegate, like ``auto``).
SettingsOf = Callable[[str], Any]


@dataclass(frozen=True)
class LayerDecision:
    """What the plan says for one dense layer.

    Attributes
    ----------
    name : str
        Qualified module name (the first one, for a module shared under several names).
    type : str
        The dense layer's class name (``"Linear"``, ``"Conv2d"``).
    shape : tuple of int
        Weight shape.
    format : str
        A registered format name, or ``"dense"`` when the layer is skipped.
    options : dict
        Keyword options for the format's :meth:`CompressionFormat.build` (JSON-ready).
    params_before : int
        Parameters of the dense layer (weight + bias).
    params_after : int or None
        Predicted parameters after compression (None when only an error bound fixes the ranks).
    skipped : str or None
        Why the layer stays dense.
    aliases : tuple of str
        Other names under which the same module object is reachable.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    format: str
    options: dict[str, Any]
    params_before: int
    params_after: int | None
    skipped: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class FormatDescription:
    """Typed description of a factorized layer, for tables and reports.

    Attributes
    ----------
    format : str
        The format's registered name.
    shape : tuple of int
        Shape of the equivalent dense weight.
    ranks : tuple of int
        The layer's ranks (TT: the full rank tuple; CP/SVD: one rank; Tucker-2: ``(in, out)``).
    in_modes, out_modes : tuple of int, optional
        Tensorized sizes, for formats that have them.
    text : str
        Ranks (and modes) as one short cell, e.g. ``"8x8<-4x4 r=1,4,1"`` or ``"r=12"``.
    """

    format: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    text: str = ""


@dataclass(frozen=True)
class Ladder:
    """Rank steps of one layer for the target-ratio allocator: level ``k`` has ``params[k]``
    parameters (bias included), an estimated squared relative error ``errors[k]`` and the build
    options ``options[k]``. ``params`` increases; every level is smaller than the dense layer."""

    params: tuple[int, ...]
    errors: tuple[float, ...]
    options: tuple[dict[str, Any], ...]


#: How a dry run's error relates to the real run's (data-free) error.
EXACT, ESTIMATE, UPPER_BOUND = "exact", "estimate", "upper bound"


@dataclass(frozen=True)
class ErrorPreview:
    """The data-free weight error a dry run shows for one layer.

    Attributes
    ----------
    error : float
        Relative Frobenius error of the weight.
    kind : str
        ``"exact"``: what :meth:`CompressionFormat.build` (without calibration data) gives, because
        the layer was decomposed and measured, the same computation as the real run;
        ``"upper bound"``: the real error is at most ``error``; ``"estimate"``: neither (a
        calibrated proxy). Only ``"exact"`` decomposes the layer.
    format : str
        The format that would be built (the winner, for a delegating format such as ``auto``).
    note : str or None
        Why that format (``auto``'s choice), or None.
    params : int or None
        Parameters of the layer that would be built (bias included) when known from the preview
        (an exact one), else None.
    """

    error: float
    kind: str
    format: str
    note: str | None = None
    params: int | None = None

    @property
    def exact(self) -> bool:
        return self.kind == EXACT


def bias_params(module: nn.Module) -> int:
    """Elements of ``module.bias`` (0 without one)."""
    b = getattr(module, "bias", None)
    return int(b.numel()) if isinstance(b, torch.Tensor) else 0


def dense_params(module: nn.Module) -> int:
    """All parameters of ``module`` (:func:`ttcompress.layer_report.count_params`)."""
    return count_params(module)


@dataclass(frozen=True)
class BuildResult:
    """What :meth:`CompressionFormat.build` returns.

    Attributes
    ----------
    layer : nn.Module
        The factorized layer.
    error : float or None
        Relative Frobenius error of its weight against the dense layer's (the layer's ``rel_error``).
    fit : FitResult or None
        The calibration fit (:class:`ttcompress.calibration.fit.FitResult`: output errors before and
        after fitting to calibration data, and the method), None without calibration data.
    note : str or None
        Why the build chose what it did (delegating formats such as ``auto``), or None.
    """

    layer: nn.Module
    error: float | None = None
    fit: Any = None
    note: str | None = None

    @classmethod
    def of(cls, layer: nn.Module, fit: Any = None, note: str | None = None) -> BuildResult:
        """A result for ``layer`` whose error is its ``rel_error`` attribute."""
        err = getattr(layer, "rel_error", None)
        return cls(layer, None if err is None else float(err), fit, note)


#: The settings group of the fields that fix a layer's size (ranks, error bounds, ratios): see :func:`setting`.
SIZE = "size"

#: CLI value kinds of a setting (how a flag's text is parsed): an integer, a number, or a string.
Kind = Literal["int", "float", "str"]


@dataclass(frozen=True)
class SettingField:
    """The metadata of one settings field (see :func:`setting`), with its field name."""

    name: str
    help: str | None
    kind: Kind
    flag: str | None
    metavar: str | None
    group: str | None
    excludes: tuple[str, ...]
    merge: bool


def setting(default: Any = None, *, help: str | None = None, kind: Kind = "int", flag: str | None = None,
            metavar: str | None = None, group: str | None = None, excludes: tuple[str, ...] = (),
            merge: bool = False) -> Any:
    """A field of a format's settings dataclass, with the metadata the plan and the CLI read.

    Parameters
    ----------
    default
        The field's default (immutable: None, a number, a tuple).
    help : str, optional
        Help text of the field's command-line flag; fields without one get no flag of their own
        (``--set FORMAT.FIELD=VALUE`` still sets them).
    kind : {"int", "float", "str"}
        How the flag's text is parsed (the settings class validates the value).
    flag : str, optional
        The flag's name (default ``--FORMAT-FIELD``, underscores as dashes).
    group : str, optional
        Fields of one group are replaced together by a plan rule: a rule that gives one of them
        resets the others (a rule's ``ranks`` replaces the settings' ``eps`` too). A group named
        ``"size"`` holds the fields that fix a layer's size: a ``none`` value on the command line
        keeps the format's layers dense, and ``target_ratio`` (which chooses sizes) excludes them.
    excludes : tuple of str
        Fields that a command-line value of this one clears (``cp.rank`` clears a plan file's ``cp.ratio``).
    merge : bool
        The field holds keyword options (pairs) that an override adds to instead of replacing.
    """
    meta = {"ttcompress": SettingField("", help, kind, flag, metavar, group, tuple(excludes), merge)}
    return dataclasses.field(default=default, metadata=meta)


def setting_fields(settings: type) -> tuple[SettingField, ...]:
    """The :class:`SettingField` of every field of a settings dataclass (defaults for plain fields)."""
    out = []
    for f in dataclasses.fields(settings):
        meta = f.metadata.get("ttcompress") or SettingField("", None, "str", None, None, None, (), False)
        out.append(dataclasses.replace(meta, name=f.name))
    return tuple(out)


def join(values: Any, sep: str = "x") -> str:
    """``(8, 4, 2)`` -> ``"8x4x2"``."""
    return sep.join(str(int(v)) for v in values)


class CompressionFormat(ABC):
    """One way of factorizing a dense layer type. Subclass, set the class attributes, register.

    Class attributes
    ----------------
    name : str
        Lower-case registered name (``"tt"``, ``"cp"``, ...), used in plans and checkpoints.
    targets : tuple of type
        Dense module types this format compresses.
    layer_class : type or None
        The factorized layer; ``layer_class(**layer.config())`` rebuilds its structure. None for
        a format that only delegates (``auto``).
    settings : type
        Frozen dataclass of the format's plan options; ``settings()`` are the defaults.
    default_for : tuple of type
        Dense types for which this format is the default when a plan names no format.
    default_under_target_ratio : bool
        This format is the default of a plan with a ``target_ratio`` (at most one should be).
    summary : str
        One line for help texts.
    structural : bool
        The format only restructures a module exactly (``mha``): surgery applies it where needed,
        plans never select it, and its layer's children stay layers of their own.
    """

    name: ClassVar[str]
    targets: ClassVar[tuple[type[nn.Module], ...]]
    layer_class: ClassVar[type[nn.Module] | None]
    settings: ClassVar[type]
    default_for: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: True for the format a plan with a ``target_ratio`` and no explicit format uses (``auto``).
    default_under_target_ratio: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    #: True for an exact restructuring whose layer's children remain compressible (see ``structural``).
    structural: ClassVar[bool] = False
    #: Alternative spellings accepted in plan files (``{"ranks": "rank"}``: ``ranks`` means ``rank``).
    settings_aliases: ClassVar[Mapping[str, str]] = {}

    # ---- what a layer would become ---------------------------------------------------------------
    def applies_to(self, module: nn.Module) -> bool:
        """True if ``module`` is a (non-lazy) instance of one of :attr:`targets`."""
        return isinstance(module, self.targets) and not isinstance(module, nn.modules.lazy.LazyModuleMixin)

    def decide(
        self,
        module: nn.Module,
        name: str,
        settings: Any,
        *,
        override: Mapping[str, Any] | None = None,
        aliases: tuple[str, ...] = (),
        lowest: bool = False,
        settings_of: SettingsOf | None = None,
    ) -> LayerDecision:
        """What ``module`` (at qualified ``name``) becomes under ``settings`` and a rule's ``override``.

        ``override`` holds a matching plan rule's values (``ranks``, ``eps``, ``ratio``, ...); they
        are applied here, once for every format (:meth:`with_overrides`; keys this format does not
        have are left to the others), and :meth:`choose` decides on the result. ``lowest=True``
        asks for the smallest structure (rank 1), the starting point of the target-ratio allocator.
        ``settings_of(name)`` gives another format's settings (for formats that delegate). The
        result's ``skipped`` says why the layer stays dense.
        """
        s = settings if settings is not None else self.settings()
        if override:
            s = self.with_overrides(s, override, rule=True, strict=False, where=f"plan rule for layer {name!r}")
        return self.choose(module, name, s, aliases=aliases, lowest=lowest, settings_of=settings_of)

    @abstractmethod
    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: SettingsOf | None = None) -> LayerDecision:
        """What ``module`` becomes under ``settings`` (a rule's overrides already applied): see :meth:`decide`."""

    def canonical_key(self, key: str) -> str | None:
        """The settings field a plan key means (``"ranks"`` is CP's ``rank``), None if it has none."""
        key = self.settings_aliases.get(key, key)
        return key if key in {f.name for f in dataclasses.fields(self.settings)} else None

    def with_overrides(self, settings: Any, values: Mapping[str, Any], *, rule: bool, strict: bool = True,
                       where: str | None = None) -> Any:
        """``settings`` with ``values`` (plan keys: field names or their aliases) applied, validated by
        the settings class.

        ``rule=True`` applies a plan rule: a value replaces the other fields of its ``group`` too
        (a rule's ``ranks`` resets the settings' ``eps``); ``rule=False`` applies command-line
        values: a value clears the fields it ``excludes``. Fields declared with ``merge`` (keyword
        options) are added to, not replaced. Keys this format does not have are an
        :class:`~ttcompress.errors.InputError` with ``strict``, else ignored. With ``where``, an
        invalid value's error says where it came from (``plan rule for layer 'fc'``).
        """
        given: dict[str, Any] = {}
        for key, value in values.items():
            name = self.canonical_key(key)
            if name is None:
                if strict:
                    known = ", ".join(f.name for f in dataclasses.fields(self.settings)) or "none"
                    raise InputError(where or self.name, f": format {self.name} has no setting {key!r} (it has: {known})")
                continue
            if name in given:
                raise InputError(where or self.name, f": give {name} once (also given as {key})")
            given[name] = value
        if not given:
            return settings
        meta = {f.name: f for f in setting_fields(self.settings)}
        fields = {name: getattr(settings, name) for name in meta}
        for name in given:
            cleared = ([n for n, f in meta.items() if f.group is not None and f.group == meta[name].group]
                       if rule else list(meta[name].excludes))
            for other in cleared:
                if other not in given:
                    fields[other] = None
        for name, value in given.items():
            if meta[name].merge and isinstance(value, Mapping):  # anything else: the settings class refuses it
                value = {**dict(fields[name] or ()), **value}
            fields[name] = value
        try:
            return self.settings(**fields)
        except InputError as exc:
            if where is None:
                raise
            raise InputError(where, f": {exc}") from None

    def dense_decision(self, module: nn.Module, name: str, reason: str, aliases: tuple[str, ...] = (),
                       options: dict[str, Any] | None = None, params_after: int | None = None) -> LayerDecision:
        """A decision that keeps ``module`` dense because of ``reason``."""
        before = dense_params(module)
        return LayerDecision(name, type(module).__name__, tuple(module.weight.shape), "dense", options or {},
                             before, before if params_after is None else params_after, reason, aliases)

    def decision(self, module: nn.Module, name: str, options: dict[str, Any], params_after: int | None,
                 aliases: tuple[str, ...] = (), what: str = "") -> LayerDecision:
        """A decision for this format, or a dense one when ``params_after`` does not shrink the layer."""
        before = dense_params(module)
        if params_after is not None and params_after >= before:
            return self.dense_decision(module, name, f"would not shrink at {what} ({params_after} >= {before} params)",
                                       aliases, options, params_after)
        return LayerDecision(name, type(module).__name__, tuple(module.weight.shape), self.name, options, before,
                             params_after, None, aliases)

    # ---- building --------------------------------------------------------------------------------
    @abstractmethod
    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        """The factorized layer decomposed from ``module`` with ``options`` (a decision's).

        ``calib`` is optional calibration statistics for formats that can use them (ignored by
        formats that cannot); ``name`` labels warnings and errors. The result holds the layer, the
        relative Frobenius error of its weight (also the layer's ``rel_error`` attribute), the
        calibration fit (None without ``calib``) and a note (why a delegating format chose what
        it did).
        """

    def rebuild(self, config: Mapping[str, Any]) -> nn.Module:
        """The layer's structure from a recorded ``config()``: no decomposition, no unpickling."""
        if self.layer_class is None:
            raise ValueError(f"format {self.name!r} has no layer of its own to rebuild")
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        return self.layer_class(**dict(config))

    @abstractmethod
    def describe(self, layer: nn.Module) -> FormatDescription:
        """Ranks and modes of a factorized ``layer`` of this format."""

    def suggest(self, decision: LayerDecision) -> str:
        """One short cell saying what a decision would build (``"CP rank 12"``)."""
        return f"{self.name.upper()} {decision.options}"

    def flops(self, layer: nn.Module) -> int:
        """Multiply-adds of ``layer`` per sample (Linear) or per output pixel (Conv2d)."""
        return dense_params(layer)

    # ---- optional: a cheaper build for comparing formats (``auto``) -------------------------------
    def build_trial(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
                    name: str | None = None) -> BuildResult:
        """A build to compare formats with: its error is never below what :meth:`build` would
        reach, and :meth:`finish_trial` turns it into that build. Default: :meth:`build`."""
        return self.build(module, options, calib=calib, name=name)

    def finish_trial(self, module: nn.Module, trial: BuildResult, options: Mapping[str, Any], *,
                     calib: Any = None, name: str | None = None) -> BuildResult:
        """The full build continued from a :meth:`build_trial` layer (default: ``trial`` itself)."""
        return trial

    # ---- dry runs: the error a build would reach ----------------------------------------------------
    def preview_cost(self, module: nn.Module, options: Mapping[str, Any]) -> float:
        """Work of :meth:`build` without calibration data, in multiply-adds (order of magnitude).

        A dry run decomposes a layer for real when this is within its budget. Default: one
        eigendecomposition-class pass over the weight (what the singular-value estimates cost anyway),
        ``numel * min(rows, cols)``; iterative formats (CP-ALS) override it.
        """
        w = module.weight
        return float(w.numel()) * float(min(w.shape[0], w[0].numel()))

    def estimate(self, module: nn.Module, options: Mapping[str, Any]) -> ErrorPreview | None:
        """The relative weight error :meth:`build` would reach, bounded or estimated without the
        full decomposition (None: neither). Used by dry runs for layers over their budget."""
        return None

    def preview(self, module: nn.Module, options: Mapping[str, Any], *, budget: float) -> ErrorPreview | None:
        """The data-free weight error of ``build(module, options)``: exact (the layer is decomposed and
        measured) when :meth:`preview_cost` is within ``budget``, else :meth:`estimate`."""
        if self.preview_cost(module, options) <= budget:
            built = self.build(module, options)
            return ErrorPreview(float(built.layer.rel_error), EXACT, self.name, params=dense_params(built.layer))
        return self.estimate(module, options)

    # ---- optional: rank ladders and budgets --------------------------------------------------------
    def ladder(self, module: nn.Module, decision: LayerDecision) -> Ladder | None:
        """Rank steps for the target-ratio allocator, starting at ``decision`` (its lowest rank).

        None when the format cannot be allocated (its layers then keep their planned ranks).
        """
        return None

    def fit_budget(self, module: nn.Module, budget: int, settings: Any) -> dict[str, Any] | None:
        """Build options of the largest structure with at most ``budget`` parameters (bias
        included), or None when even the smallest does not fit."""
        return None

    # ---- plan files ------------------------------------------------------------------------------
    def settings_from_dict(self, data: Mapping[str, Any] | None) -> Any:
        """Settings from a plan file's section (unknown keys are a ``ValueError`` naming them)."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(self.settings)]
        check_keys(data, [*names, *self.settings_aliases], f"plan {self.name}")
        for alias, key in self.settings_aliases.items():
            if alias in data:
                if key in data:
                    raise ValueError(f"plan {self.name}: give {key} or {alias}, not both")
                data[key] = data.pop(alias)
        return self.settings(**data)

    def settings_to_dict(self, settings: Any) -> dict[str, Any]:
        """The plan-file section for ``settings`` (None, empty and default fields left out)."""
        out: dict[str, Any] = {}
        default = self.settings()
        for f in dataclasses.fields(settings):
            v = getattr(settings, f.name)
            if v is None or v == () or v == getattr(default, f.name):
                continue
            if f.name == "options":
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def __repr__(self) -> str:
        return f"<format {self.name!r}>"
