"""The registry of compression formats, by name.

Formats register with :func:`register_format` (a class decorator). Everything else asks the
registry: :func:`get_format` by name, :func:`formats_for` a dense module, :func:`format_of` a
factorized layer, :func:`default_format` the default for a dense module. :data:`LAYER_TYPES`
is a live read-only mapping name -> layer class over the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import nn

from ttcompress.formats.base import CompressionFormat

__all__ = [
    "LAYER_TYPES",
    "default_format",
    "format_names",
    "format_of",
    "formats_for",
    "get_format",
    "layer_classes",
    "register_format",
    "structural_classes",
]

_REGISTRY: dict[str, CompressionFormat] = {}

#: The name a plan uses to keep a layer uncompressed; never a registered format.
DENSE = "dense"


def register_format(cls: type[CompressionFormat]) -> type[CompressionFormat]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``.

    Raises
    ------
    TypeError
        ``cls`` is not a :class:`CompressionFormat` subclass.
    ValueError
        The name is not lower-case, is ``"dense"``, or is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, CompressionFormat)):
        raise TypeError(f"cls must be a CompressionFormat subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or name == DENSE:
        raise ValueError(f"format name must be a non-empty lower-case string other than {DENSE!r}, got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and type(old) is not cls:
        raise ValueError(f"format {name!r} is already registered by {type(old).__name__}")
    _REGISTRY[name] = cls()
    return cls


def format_names() -> tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(_REGISTRY)


def get_format(name: str) -> CompressionFormat:
    """The format registered as ``name``; ``ValueError`` naming the registered ones otherwise."""
    fmt = _REGISTRY.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown format {name!r}; registered: {', '.join(_REGISTRY)}")
    return fmt


def formats_for(module: nn.Module) -> tuple[CompressionFormat, ...]:
    """Formats that can compress ``module`` (with a layer of their own), in registration order.

    Structural formats (exact restructurings such as ``mha``) are not among them."""
    return tuple(f for f in _REGISTRY.values()
                 if f.layer_class is not None and not f.structural and f.applies_to(module))


def default_format(module: nn.Module) -> CompressionFormat | None:
    """The format used for ``module`` when a plan names none (None: no format compresses it)."""
    for f in _REGISTRY.values():
        if isinstance(module, f.default_for) and f.applies_to(module):
            return f
    return None


def format_of(layer: nn.Module) -> CompressionFormat | None:
    """The format whose layer class ``layer`` is an instance of (None for any other module)."""
    for f in _REGISTRY.values():
        if f.layer_class is not None and type(layer) is f.layer_class:
            return f
    for f in _REGISTRY.values():
        if f.layer_class is not None and isinstance(layer, f.layer_class):
            return f
    return None


def layer_classes() -> tuple[type[nn.Module], ...]:
    """Every registered factorized layer class (structural formats' layers excluded: their children
    are layers of their own)."""
    return tuple(f.layer_class for f in _REGISTRY.values() if f.layer_class is not None and not f.structural)


def structural_classes() -> tuple[type[nn.Module], ...]:
    """The layer classes of structural formats (e.g. ``FactorizedMultiheadAttention``)."""
    return tuple(f.layer_class for f in _REGISTRY.values() if f.layer_class is not None and f.structural)


def compressible(module: nn.Module) -> bool:
    """True if some registered format compresses ``module``."""
    return bool(formats_for(module))


class _LayerTypes(Mapping[str, type[nn.Module]]):
    """Read-only live view: format name -> layer class, for formats that have a layer."""

    def __getitem__(self, name: str) -> type[nn.Module]:
        fmt = _REGISTRY.get(name)
        if fmt is None or fmt.layer_class is None:
            raise KeyError(name)
        return fmt.layer_class

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, f in _REGISTRY.items() if f.layer_class is not None])

    def __len__(self) -> int:
        return sum(1 for f in _REGISTRY.values() if f.layer_class is not None)

    def __repr__(self) -> str:
        return repr(dict(self))


LAYER_TYPES: Mapping[str, type[nn.Module]] = _LayerTypes()
