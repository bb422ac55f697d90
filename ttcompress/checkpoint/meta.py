"""Model metadata: what a model is built from and what was done to it, as typed data.

A model built or loaded by ttcompress carries ``model.ttcompress_meta``, a plain JSON-ready dict
(``{"arch": ..., "layers": {...}, "info": {...}}``) so that it pickles and prints like any
attribute. :class:`ModelMeta` is its typed form (with ``to_dict`` / ``from_dict``);
:func:`get_meta` and :func:`update_meta` read and update the attribute.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ttcompress.layer_report import LayerReport

__all__ = ["META_ATTR", "ArchSpec", "ModelMeta", "copy_meta", "get_meta", "has_meta", "read_meta", "set_meta", "update_meta"]

META_ATTR = "ttcompress_meta"

_MISSING: Any = object()


@dataclass(frozen=True)
class ArchSpec:
    """An architecture by name (built-in, ``torchvision:NAME`` or ``package.module:callable``) and its
    JSON keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": copy.deepcopy(dict(self.kwargs))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchSpec:
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise TypeError("arch must be a dict {'name': str, 'kwargs': dict} or None")
        return cls(data["name"], copy.deepcopy(dict(data.get("kwargs") or {})))


@dataclass(frozen=True)
class ModelMeta:
    """Typed ``model.ttcompress_meta``.

    Attributes
    ----------
    arch : ArchSpec or None
        How to rebuild the architecture; None when it cannot be rebuilt (a pickled module).
    layers : dict of str to LayerReport
        One record per replaced layer, by qualified name.
    info : dict
        Free-form JSON entries (dataset, plan, training history, ...).
    """

    arch: ArchSpec | None = None
    layers: dict[str, LayerReport] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": None if self.arch is None else self.arch.to_dict(),
            "layers": {name: r.to_meta() for name, r in self.layers.items()},
            "info": copy.deepcopy(dict(self.info)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelMeta:
        data = dict(data or {})
        arch = data.get("arch")
        layers = data.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise TypeError("layers must be a mapping {qualified_name: record}")
        info = data.get("info") or {}
        if not isinstance(info, Mapping):
            raise TypeError("info must be a mapping")
        return cls(
            None if arch is None else ArchSpec.from_dict(arch),
            {str(k): LayerReport.from_meta(str(k), v) for k, v in layers.items()},
            copy.deepcopy(dict(info)),
        )


def read_meta(model: nn.Module) -> ModelMeta:
    """``model``'s metadata as a :class:`ModelMeta` (empty when it has none)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    stored = getattr(model, META_ATTR, None)
    return ModelMeta.from_dict(stored) if isinstance(stored, Mapping) else ModelMeta()


def set_meta(model: nn.Module, meta: ModelMeta) -> None:
    """Store ``meta`` on ``model`` (as its dict form)."""
    # object.__setattr__ keeps nn.Module from treating the dict as anything special.
    object.__setattr__(model, META_ATTR, meta.to_dict())


def has_meta(model: nn.Module) -> bool:
    """Whether ``model`` carries ttcompress metadata (built, loaded or compressed by ttcompress)."""
    return hasattr(model, META_ATTR)


def copy_meta(src: nn.Module, dest: nn.Module) -> None:
    """Give ``dest`` a copy of ``src``'s metadata, if ``src`` has any."""
    if has_meta(src):
        set_meta(dest, read_meta(src))


def get_meta(model: nn.Module) -> dict[str, Any]:
    """Return a deep copy of ``model.ttcompress_meta``, with defaults filled in.

    Parameters
    ----------
    model : nn.Module
        Any module; one without metadata gives ``{"arch": None, "layers": {}, "info": {}}``.

    Returns
    -------
    dict
        ``{"arch": {"name": str, "kwargs": dict} | None, "layers": {name: record}, "info": dict}``
        (:meth:`ModelMeta.to_dict`).
    """
    return read_meta(model).to_dict()


def update_meta(
    model: nn.Module,
    *,
    arch: Mapping[str, Any] | None = _MISSING,
    layers: Mapping[str, Mapping[str, Any] | LayerReport] | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Update ``model.ttcompress_meta`` in place and return a copy of the result.

    Parameters
    ----------
    model : nn.Module
        The model to annotate.
    arch : dict or None, optional
        Replaces the architecture spec (``{"name": ..., "kwargs": {...}}``); ``None`` marks the
        model as not rebuildable. Left unchanged when not given.
    layers : dict, optional
        Per-layer records (:class:`LayerReport` or their dict form) merged into ``meta["layers"]``
        (a record replaces one of the same name).
    info : dict, optional
        Free-form JSON entries merged into ``meta["info"]`` (shallow merge).

    Returns
    -------
    dict
        A deep copy of the updated metadata.
    """
    meta = read_meta(model)
    new_arch = meta.arch if arch is _MISSING else None if arch is None else ArchSpec.from_dict(arch)
    new_layers = dict(meta.layers)
    if layers is not None:
        if not isinstance(layers, Mapping):
            raise TypeError("layers must be a mapping {qualified_name: record}")
        for k, v in layers.items():
            new_layers[str(k)] = v if isinstance(v, LayerReport) else LayerReport.from_meta(str(k), v)
    new_info = dict(meta.info)
    if info is not None:
        if not isinstance(info, Mapping):
            raise TypeError("info must be a mapping")
        new_info.update(copy.deepcopy(dict(info)))
    updated = ModelMeta(new_arch, new_layers, new_info)
    set_meta(model, updated)
    return updated.to_dict()
