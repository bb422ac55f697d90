"""Plan files and option mapping: read and write a :class:`~ttcompress.compression.plan.Plan` as YAML or JSON,
and build one from command-line style options.

A plan file is a regular file of at most 16 MiB (:data:`~ttcompress.checkpoint.smallfile.MAX_SMALL_FILE_BYTES`;
a FIFO or a device is refused before it is read). YAML is read with a hardened ``safe_load``: no
aliases (no "billion laughs" expansion), at most :data:`MAX_PLAN_NODES` nodes, nested at most
:data:`MAX_PLAN_DEPTH` deep. Errors name the
parameters (``tt.ranks``, ``cp_ranks``, ``target_ratio``, ...), never command-line flags; the CLI
maps them onto its flags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ttcompress.formats import DENSE, format_names, get_format
from ttcompress.formats.checks import check_patterns
from ttcompress.formats.cp import CPSettings
from ttcompress.formats.tt import TTSettings
from ttcompress.fsutil import atomic_write
from ttcompress.compression.plan import Plan
from ttcompress.checkpoint.smallfile import read_small_text

__all__ = ["MAX_PLAN_DEPTH", "MAX_PLAN_NODES", "NONE", "option_formats", "plan_kwargs", "load_plan", "plan_from_options", "save_plan"]


def load_plan(path: str | Path) -> Plan:
    """Read a YAML (``.yaml``/``.yml``) or JSON plan file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        It is not a regular file (a FIFO, a device) of at most ``MAX_SMALL_FILE_BYTES``, it cannot be
        parsed, or it describes an invalid plan.
    """
    p = Path(path)
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
    p = Path(path)
    with atomic_write(p, "w") as f:
        if p.suffix.lower() == ".json":
            json.dump(plan.to_dict(), f, indent=2)
            f.write("\n")
        else:
            import yaml

            yaml.safe_dump(plan.to_dict(), f, sort_keys=False)
    return p


def option_formats() -> dict[str, tuple[str, ...]]:
    """Formats with their own options in :func:`plan_from_options` (the ``dense`` parameter names
    them), with the options of each: the formats whose settings are :class:`TTSettings` and
    :class:`CPSettings` (``tt`` and ``cp``)."""
    by_settings = {get_format(n).settings: n for n in format_names()}
    return {by_settings[TTSettings]: ("tt_ranks", "tt_eps", "tt_d"), by_settings[CPSettings]: ("cp_ranks", "cp_ratio")}
#: The value that, given for a format's rank option (``tt_ranks``, ``tt_eps``, ``cp_ranks``,
#: ``cp_ratio``), keeps that format's layers dense (``--tt-ranks none``); for any other option
#: (``tt_d``, ``target_ratio``) it means "not given".
NONE = "none"
_RANK_OPTIONS = ("tt_ranks", "tt_eps", "cp_ranks", "cp_ratio")


def plan_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`plan_from_options` from option values where :data:`NONE` may appear.

    ``NONE`` for a format's rank option (``tt_ranks``, ``tt_eps``, ``cp_ranks``, ``cp_ratio``) puts
    that format in ``dense``; for any other option it means "not given". ``None`` values are left out.
    """
    kwargs: dict[str, Any] = {}
    dense: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, str) and value.lower() == NONE:
            fmt = next((f for f, keys in option_formats().items() if key in keys and key in _RANK_OPTIONS), None)
            if fmt is not None and fmt not in dense:
                dense.append(fmt)
            continue
        kwargs[key] = value
    if dense:
        kwargs["dense"] = tuple(dense)
    return kwargs


def _tt_settings(tt: TTSettings, ranks: int | None, eps: float | None, d: int | None) -> TTSettings:
    """``tt`` with the given options replacing its own."""
    if ranks is None and eps is None and d is None:
        return tt
    return TTSettings(ranks=ranks if ranks is not None else tt.ranks, eps=eps if eps is not None else tt.eps,
                      d=d if d is not None else tt.d, in_modes=tt.in_modes, out_modes=tt.out_modes)


def _cp_settings(cp: CPSettings, rank: int | None, ratio: float | None) -> CPSettings:
    """``cp`` with the given rank or ratio replacing its own (not both)."""
    if rank is not None and ratio is not None:
        raise ValueError("cp_ranks and cp_ratio are mutually exclusive; give one")
    if rank is not None:
        return CPSettings(rank=rank, options=cp.options)
    if ratio is not None:
        return CPSettings(ratio=ratio, options=cp.options)
    return cp


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
    formats: Sequence[str] = (),
    min_saving: float | None = None,
    max_error: float | None = None,
    dense: Sequence[str] = (),
    base: Plan | None = None,
) -> Plan:
    """Build a plan from command-line style options, on top of an optional plan file.

    **One rule for which layer types are compressed** (``decompose``, ``inspect`` and ``sweep``
    share it): with no per-format option at all (``tt_*``, ``cp_*``, ``formats``, ``dense``),
    every layer type gets its default format (or the plan file's ``formats``); once any is given,
    the plan uses exactly the formats they name (``formats`` first, then ``tt`` if a ``tt_*``
    option is given, then ``cp`` if a ``cp_*`` option is) and a layer type none of them covers
    stays dense (``Plan.others = "dense"``). ``tt_ranks=8`` alone therefore compresses only the
    Linear layers, ``cp_ranks=6`` alone only the convolutions.

    Options given here override the file's defaults (``cp_ranks`` replaces a file's
    ``cp.ratio`` and vice versa); ``layers``/``exclude`` patterns are added to the file's;
    ``formats`` (registered names, each may be comma-separated) replace the file's.

    Parameters
    ----------
    base : Plan, optional
        The plan to start from instead of ``plan_file``'s (give at most one of them).
    dense : sequence of {"tt", "cp"}
        Formats whose layers stay dense although their option was given (a ``none`` value on the
        command line, e.g. ``--tt-ranks none``); they count as given, so other types stay dense
        unless their own options are given too.

    Raises
    ------
    ValueError
        Conflicting options (``cp_ranks`` with ``cp_ratio``, a ``tt_*`` option with ``dense=["tt"]``),
        bad values, or a bad plan file.
    """
    if base is not None and plan_file is not None:
        raise ValueError("give plan_file or base, not both")
    if base is None:
        base = load_plan(plan_file) if plan_file is not None else Plan()
    dense = tuple(dense)
    owners = option_formats()
    for name in dense:
        if name not in owners:
            raise ValueError(f"dense must name formats among {', '.join(owners)}, got {name!r}")
    values = {"tt_ranks": tt_ranks, "tt_eps": tt_eps, "tt_d": tt_d, "cp_ranks": cp_ranks, "cp_ratio": cp_ratio}
    given = {f: [k for k in keys if values[k] is not None] for f, keys in owners.items()}
    for name in dense:
        if given[name]:
            raise ValueError(f"{given[name][0]} is given while {name} layers stay dense (none); give one")
    tt = _tt_settings(base.tt, tt_ranks, tt_eps, tt_d)
    cp = _cp_settings(base.cp, cp_ranks, cp_ratio)
    names = tuple(n for f in formats for n in check_patterns(f, "formats"))
    selected = bool(names or dense or any(given.values()))
    if selected:
        names += tuple(n for n in owners if given[n] and n not in names)
    return replace(
        base,
        tt=tt,
        cp=cp,
        layers=tuple(base.layers) + tuple(check_patterns(list(layers), "layers")),
        exclude=tuple(base.exclude) + tuple(check_patterns(list(exclude), "exclude")),
        target_ratio=target_ratio if target_ratio is not None else base.target_ratio,
        formats=names if selected else base.formats,
        others=DENSE if selected else base.others,
        min_saving=min_saving if min_saving is not None else base.min_saving,
        max_error=max_error if max_error is not None else base.max_error,
    )
