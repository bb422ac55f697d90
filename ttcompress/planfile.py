"""Plan files and option mapping: read and write a :class:`~ttcompress.plan.Plan` as YAML or JSON,
and build one from command-line style options.

YAML is read with a hardened ``safe_load``: no aliases (no "billion laughs" expansion), at most
:data:`MAX_PLAN_NODES` nodes, nested at most :data:`MAX_PLAN_DEPTH` deep. Errors name the
parameters (``tt.ranks``, ``cp_ranks``, ``target_ratio``, ...), never command-line flags; the CLI
maps them onto its flags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ttcompress.formats.checks import check_patterns
from ttcompress.formats.cp import CPSettings
from ttcompress.formats.tt import TTSettings
from ttcompress.fsutil import atomic_write
from ttcompress.plan import Plan

__all__ = ["MAX_PLAN_DEPTH", "MAX_PLAN_NODES", "load_plan", "plan_from_options", "save_plan"]


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
    formats: Sequence[str] = (),
) -> Plan:
    """Build a plan from command-line style options, on top of an optional plan file.

    Options given here override the file's defaults (``cp_ranks`` replaces a file's
    ``cp.ratio`` and vice versa); ``layers``/``exclude`` patterns are added to the file's;
    ``formats`` (registered names, each may be comma-separated) replace the file's.
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
        raise ValueError("cp_ranks and cp_ratio are mutually exclusive; give one")
    if cp_ranks is not None:
        cp = CPSettings(rank=cp_ranks, options=cp.options)
    elif cp_ratio is not None:
        cp = CPSettings(ratio=cp_ratio, options=cp.options)
    names = tuple(n for f in formats for n in check_patterns(f, "formats"))
    return replace(
        base,
        tt=tt,
        cp=cp,
        layers=tuple(base.layers) + tuple(check_patterns(list(layers), "layers")),
        exclude=tuple(base.exclude) + tuple(check_patterns(list(exclude), "exclude")),
        target_ratio=target_ratio if target_ratio is not None else base.target_ratio,
        formats=names or base.formats,
    )
