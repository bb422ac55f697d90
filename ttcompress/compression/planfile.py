"""Plan files and option mapping: read and write a :class:`~ttcompress.compression.plan.Plan` as YAML or JSON,
and build one from command-line style options.

A plan file is a regular file of at most 16 MiB (:data:`~ttcompress.checkpoint.smallfile.MAX_SMALL_FILE_BYTES`;
a FIFO or a device is refused before it is read). YAML is read with a hardened ``safe_load``: no
aliases (no "billion laughs" expansion), at most :data:`MAX_PLAN_NODES` nodes, nested at most
:data:`MAX_PLAN_DEPTH` deep. Errors name the
parameters (``tt.ranks``, ``cp.rank``, ``target_ratio``, ...; :class:`~ttcompress.errors.InputError`
carries the name as ``param``), never command-line flags; the CLI maps them onto its flags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ttcompress.errors import InputError
from ttcompress.formats import DENSE, format_names, get_format
from ttcompress.formats.base import SIZE, setting_fields
from ttcompress.formats.checks import check_patterns
from ttcompress.fsutil import atomic_write
from ttcompress.compression.plan import Plan
from ttcompress.checkpoint.smallfile import read_small_text

__all__ = ["MAX_PLAN_DEPTH", "MAX_PLAN_NODES", "NONE", "SHORTHANDS", "load_plan", "option_formats", "plan_from_options",
           "is_size_param", "plan_kwargs", "save_plan", "split_param"]


def load_plan(path: str | Path) -> Plan:
    """Read a YAML (``.yaml``/``.yml``) or JSON plan file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    InputError
        It is not a regular file (a FIFO, a device) of at most ``MAX_SMALL_FILE_BYTES``, it cannot be
        parsed, or it describes an invalid plan (``param`` is ``plan file PATH``).
    """
    p = Path(path)
    where = f"plan file {p}"
    try:
        text = read_small_text(p, what="plan file")
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file not found: {p}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _safe_yaml(text)
    except Exception as exc:
        raise InputError(where, f"is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                         f"{' '.join(str(exc).split())[:160]}") from None
    if data is not None and not isinstance(data, Mapping):
        raise InputError(where, "must hold a mapping at the top level")
    try:
        return Plan.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise InputError(where, f": {exc}") from None


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
    p = Path(path)
    with atomic_write(p, "w") as f:
        if p.suffix.lower() == ".json":
            json.dump(plan.to_dict(), f, indent=2)
            f.write("\n")
        else:
            import yaml

            yaml.safe_dump(plan.to_dict(), f, sort_keys=False)
    return p


#: The command-line style keywords of :func:`plan_from_options` that predate ``values``, by the
#: setting (``FORMAT.FIELD``) each sets.
SHORTHANDS: Mapping[str, str] = {
    "tt_ranks": "tt.ranks", "tt_eps": "tt.eps", "tt_d": "tt.d", "cp_ranks": "cp.rank", "cp_ratio": "cp.ratio",
}  # fmt: skip


def option_formats() -> dict[str, tuple[str, ...]]:
    """The formats with options of their own on the command line, with those options' settings
    (``{..., "svd": ("svd.rank", "svd.eps", "svd.ratio"), ...}``): the fields
    their settings class declares with a ``help`` (:func:`~ttcompress.formats.base.setting`)."""
    out: dict[str, tuple[str, ...]] = {}
    for name in format_names():
        params = tuple(f"{name}.{f.name}" for f in setting_fields(get_format(name).settings) if f.help)
        if params:
            out[name] = params
    return out


def split_param(param: str) -> tuple[str, str]:
    """``"svd.rank"`` -> ``("svd", "rank")``, checked against the registered formats' settings
    (a field's alias gives the field: ``"svd.ranks"`` -> ``("svd", "rank")``)."""
    fmt_name, dot, key = param.partition(".") if isinstance(param, str) else ("", "", "")
    if not dot or fmt_name not in format_names():
        raise InputError("set", f": {param!r} is not FORMAT.FIELD with a registered format ({', '.join(format_names())})")
    fmt = get_format(fmt_name)
    field = fmt.canonical_key(key)
    if field is None:
        fields = ", ".join(f.name for f in setting_fields(fmt.settings)) or "none"
        raise InputError("set", f": format {fmt_name} has no setting {key!r} (it has: {fields})")
    return fmt_name, field


def is_size_param(param: str) -> bool:
    """True for a setting that fixes a layer's size (a ``none`` value then keeps the format's layers dense)."""
    fmt_name, field = split_param(param)
    return any(f.name == field and f.group == SIZE for f in setting_fields(get_format(fmt_name).settings))


#: The value that, given for a format's size option (``tt_ranks``, ``tt_eps``, ``cp_ranks``,
#: ``cp_ratio``, ``svd.rank``, ...), keeps that format's layers dense (``--tt-ranks none``); for any
#: other option (``tt_d``, ``target_ratio``) it means "not given".
NONE = "none"


def plan_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`plan_from_options` from option values where :data:`NONE` may appear.

    Keys are :func:`plan_from_options` keywords or settings (``FORMAT.FIELD``, which go into
    ``values``). ``NONE`` for a format's size option (``tt_ranks``, ``tt_eps``, ``cp_ranks``,
    ``cp_ratio``, ``svd.rank``, ...) puts that format in ``dense``; for any other option it means
    "not given". ``None`` values are left out.
    """
    kwargs: dict[str, Any] = {}
    values: dict[str, Any] = {}
    dense: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        param = SHORTHANDS.get(key, key)
        setting = "." in param
        if isinstance(value, str) and value.lower() == NONE:
            if setting and is_size_param(param):
                fmt_name = split_param(param)[0]
                if fmt_name not in dense:
                    dense.append(fmt_name)
            continue
        if setting and key not in SHORTHANDS:
            values[key] = value
        else:
            kwargs[key] = value
    if values:
        kwargs["values"] = values
    if dense:
        kwargs["dense"] = tuple(dense)
    return kwargs


def plan_from_options(
    *,
    plan_file: str | Path | None = None,
    tt_ranks: int | None = None,
    tt_eps: float | None = None,
    tt_d: int | None = None,
    cp_ranks: int | None = None,
    cp_ratio: float | None = None,
    values: Mapping[str, Any] | None = None,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    target_ratio: float | None = None,
    formats: Sequence[str] = (),
    min_saving: float | None = None,
    max_error: float | None = None,
    dense: Sequence[str] = (),
    base: Plan | None = None,
) -> Plan:
    """Build a plan from command-line style options, on top of an optional plan file.

    **One rule for which layer types are compressed** (``decompose``, ``inspect`` and ``sweep``
    share it): with no per-format option at all (``values``, ``tt_*``, ``cp_*``, ``formats``,
    ``dense``), every layer type gets its default format (or the plan file's ``formats``); once
    any is given, the plan uses exactly the formats they name (``formats`` first, then, in
    registration order, each format a setting is given for) and a layer type none of them covers
    stays dense (``Plan.others = "dense"``). ``tt_ranks=8`` alone therefore compresses only the
    Linear layers, ``cp_ranks=6`` alone only the convolutions.

    Options given here override the file's settings field by field, and clear the fields they
    exclude (``cp_ranks`` replaces a file's ``cp.ratio`` and vice versa);
    ``layers``/``exclude`` patterns are added to the file's; ``formats`` (registered names, each
    may be comma-separated) replace the file's.

    Parameters
    ----------
    values : mapping of str to value, optional
        Settings by ``FORMAT.FIELD`` (``{"svd.rank": 16, "tucker2.ranks": [16, 32]}``), validated
        by each format's settings class. ``tt_ranks``, ``tt_eps``, ``tt_d``, ``cp_ranks`` and
        ``cp_ratio`` are shorthands for ``tt.ranks``, ``tt.eps``, ``tt.d``, ``cp.rank`` and ``cp.ratio``.
    base : Plan, optional
        The plan to start from instead of ``plan_file``'s (give at most one of them).
    dense : sequence of str
        Formats whose layers stay dense although their option was given (a ``none`` value on the
        command line, e.g. ``--tt-ranks none``); they count as given, so other types stay dense
        unless their own options are given too.

    Raises
    ------
    InputError
        Conflicting options (``cp_ranks`` with ``cp_ratio``, a ``tt_*`` option with ``tt`` in ``dense``),
        bad values, or a bad plan file (whose errors are ``ValueError``).
    """
    if base is not None and plan_file is not None:
        raise InputError("plan_file", "and base are both given; give one")
    if base is None:
        base = load_plan(plan_file) if plan_file is not None else Plan()
    given: dict[str, dict[str, Any]] = {}
    shorthand = {"tt_ranks": tt_ranks, "tt_eps": tt_eps, "tt_d": tt_d, "cp_ranks": cp_ranks, "cp_ratio": cp_ratio}
    pairs = [(SHORTHANDS[k], v) for k, v in shorthand.items() if v is not None]
    pairs += [(k, v) for k, v in dict(values or {}).items() if v is not None]
    for param, value in pairs:
        fmt_name, field = split_param(param)
        if field in given.setdefault(fmt_name, {}):
            raise InputError(param, "is given twice")
        given[fmt_name][field] = value
    dense = tuple(dense)
    for name in dense:
        if name not in format_names() or get_format(name).layer_class is None:
            raise InputError("dense", f"must name formats with layers of their own, got {name!r}")
        if given.get(name):
            raise InputError(f"{name}.{next(iter(given[name]))}", f"is given while {name} layers stay dense (none); give one")
    settings = dict(base.settings)
    for fmt_name, fields in given.items():
        fmt = get_format(fmt_name)
        settings[fmt_name] = fmt.with_overrides(base.settings_for(fmt_name), fields, rule=False)
    names = tuple(n for f in formats for n in check_patterns(f, "formats"))
    selected = bool(names or dense or given)
    if selected:
        names += tuple(n for n in format_names() if n in given and n not in names)
    return replace(
        base,
        settings=settings,
        layers=tuple(base.layers) + tuple(check_patterns(list(layers), "layers")),
        exclude=tuple(base.exclude) + tuple(check_patterns(list(exclude), "exclude")),
        target_ratio=target_ratio if target_ratio is not None else base.target_ratio,
        formats=names if selected else base.formats,
        others=DENSE if selected else base.others,
        min_saving=min_saving if min_saving is not None else base.min_saving,
        max_error=max_error if max_error is not None else base.max_error,
    )
