"""Validation of a ttcompress checkpoint header, which is untrusted data read from a file.

:func:`parse_header_json` bounds the JSON text (size and nesting depth) before parsing it, and
:func:`validate_header` checks every field, types included, before anything is built from it:

- ``version``: an int from 1 to the supported version;
- ``arch``: ``{"name": str, "kwargs": {str: JSON value}}``; every int in the kwargs is at most
  :data:`MAX_INT` in size, every list at most :data:`MAX_LIST` long;
- ``layers``: ``{name: {"format": a key of LAYER_TYPES, "config": {...}, "rel_error": number or
  None, ...}}``; a config may only hold the constructor arguments of its layer class that describe
  its structure: ``device`` and ``dtype`` are refused (the loader decides where and how a model is
  built), as is any unknown field; ``params_before``/``params_after`` are ints >= 0 (or null),
  ``rel_error``, ``seconds`` and the output errors numbers >= 0 (or null), ``note`` and
  ``fit_method`` strings (or null);
- ``tied``: ``{str: str}``; ``info``: a JSON object, whose ``input_shape`` (if present) is a short
  list of positive ints of bounded product, and ``kept_dense`` (if present) ``{str: str}``.

Numbers that pass are still only bounded, not proven consistent: :mod:`ttcompress.checkpoint.io` builds the
model on the ``meta`` device and compares every tensor shape with the tensors present in the file
before it allocates anything real.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ttcompress.errors import CheckpointError
from ttcompress.layer_report import KEPT_DENSE_INFO
from ttcompress.layers import LAYER_TYPES

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADER_CHARS",
    "MAX_INT",
    "MAX_LIST",
    "check_layer_counts",
    "config_items",
    "json_depth",
    "layer_config_fields",
    "parse_header_json",
    "validate_header",
]

#: Longest header JSON text accepted (characters).
MAX_HEADER_CHARS = 16 * 2**20
#: Deepest nesting of JSON arrays/objects accepted.
MAX_DEPTH = 32
#: Largest absolute value of an int in an architecture's kwargs or a layer config.
MAX_INT = 2**31
#: Longest list accepted in an architecture's kwargs or a layer config.
MAX_LIST = 4096
#: Largest product of ``info["input_shape"]`` (elements of one input sample).
MAX_INPUT_ELEMENTS = 2**24
#: Numeric fields of a layer record: counts (ints >= 0, at most MAX_INT like every int) ...
COUNT_FIELDS = ("params_before", "params_after")
#: ... and measurements (numbers >= 0); both may be null.
NUMBER_FIELDS = ("rel_error", "seconds", "out_error_before", "out_error_after")
#: Text fields of a layer record (str or null).
TEXT_FIELDS = ("note", "fit_method")
#: Config fields that decide where or how a model is built: the loader decides those.
BUILD_FIELDS = frozenset({"device", "dtype", "memory_format", "requires_grad", "pin_memory"})
#: Architecture arguments that would make a builder fetch pretrained weights (torchvision): the
#: file holds the weights, and a header must not trigger a download.
DOWNLOAD_FIELDS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_backbone", "progress"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON ``text``, found without parsing it (strings skipped)."""
    depth = deepest = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_header_json(text: str, *, source: str) -> dict[str, Any]:
    """Parse header JSON ``text`` read from ``source``, refusing oversized or too deeply nested text.

    Raises
    ------
    CheckpointError
        Too long, nested deeper than :data:`MAX_DEPTH`, not JSON, or not a JSON object.
    """
    if len(text) > MAX_HEADER_CHARS:
        raise CheckpointError(f"{source}: ttcompress header is too large ({len(text):,} characters)")
    if json_depth(text) > MAX_DEPTH:
        raise CheckpointError(f"{source}: ttcompress header is nested deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{source}: corrupted ttcompress header (invalid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: corrupted ttcompress header (not a JSON object)")
    return header


def layer_config_fields(layer_type: type) -> frozenset[str]:
    """Constructor arguments of ``layer_type`` that a checkpoint config may set (structure only)."""
    params = inspect.signature(layer_type.__init__).parameters.values()
    return frozenset(
        p.name for p in params
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in BUILD_FIELDS
    )  # fmt: skip


def validate_header(header: Mapping[str, Any], *, source: str, max_version: int) -> None:
    """Check every field of a parsed header (see the module docstring).

    Parameters
    ----------
    header : mapping
        From :func:`parse_header_json`.
    source : str
        The file, for messages.
    max_version : int
        Newest checkpoint format version supported.

    Raises
    ------
    CheckpointError
        One line naming the field (and the layer) that is wrong.
    """
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: header field version must be a positive int, got {_show(version)}")
    if version > max_version:
        raise CheckpointError(
            f"{source}: checkpoint format version {version} is newer than this ttcompress supports "
            f"({max_version}); upgrade ttcompress"
        )
    arch = header.get("arch")
    if arch is not None:
        _check_arch(arch, source)
    layers = header.get("layers", {})
    if layers is None:
        layers = {}
    if not isinstance(layers, Mapping):
        raise CheckpointError(f"{source}: header field layers must be an object, got {_show(layers)}")
    for name, record in layers.items():
        _check_layer(name, record, source)
    tied = header.get("tied", {})
    if tied is not None and (
        not isinstance(tied, Mapping) or not all(isinstance(v, str) for v in tied.values())
    ):
        raise CheckpointError(f"{source}: header field tied must be an object of strings")
    info = header.get("info", {})
    if info is not None:
        if not isinstance(info, Mapping):
            raise CheckpointError(f"{source}: header field info must be an object, got {_show(info)}")
        if "input_shape" in info:
            _check_input_shape(info["input_shape"], source)
        kept = info.get(KEPT_DENSE_INFO)
        if kept is not None and (not isinstance(kept, Mapping) or not all(isinstance(v, str) for v in kept.values())):
            raise CheckpointError(f"{source}: header field info.{KEPT_DENSE_INFO} must be an object of strings")


def _check_arch(arch: Any, source: str) -> None:
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{source}: header field arch must be an object or null, got {_show(arch)}")
    extra = sorted(set(arch) - {"name", "kwargs"})
    if extra:
        raise CheckpointError(f"{source}: header field arch has unknown field(s) {', '.join(map(repr, extra))}")
    name = arch.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 256:
        raise CheckpointError(f"{source}: header field arch.name must be a non-empty str, got {_show(name)}")
    kwargs = arch.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{source}: header field arch.kwargs must be an object, got {_show(kwargs)}")
    for key, value in (kwargs or {}).items():
        if key in BUILD_FIELDS:
            raise CheckpointError(f"{source}: header field arch.kwargs.{key} is refused: the loader decides {key}")
        if key in DOWNLOAD_FIELDS and value not in (None, False):
            raise CheckpointError(f"{source}: header field arch.kwargs.{key} is refused: the file holds the "
                                  "weights, and a header cannot ask for a download")
        _check_value(value, f"{source}: header field arch.kwargs.{key}")


def _check_layer(name: str, record: Any, source: str) -> None:
    where = f"{source}: layer {name!r}"
    if not name:
        raise CheckpointError(f"{source}: header field layers has an empty layer name")
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{where}: record must be an object, got {_show(record)}")
    fmt = record.get("format")
    if not isinstance(fmt, str) or fmt not in LAYER_TYPES:
        raise CheckpointError(f"{where} has unknown format {_show(fmt)} (known: {', '.join(sorted(LAYER_TYPES))})")
    config = record.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: config must be an object, got {_show(config)}")
    allowed = layer_config_fields(LAYER_TYPES[fmt])
    for key, value in config.items():
        if key in BUILD_FIELDS:
            raise CheckpointError(f"{where}: config field {key!r} is refused: the loader decides {key}")
        if key not in allowed:
            raise CheckpointError(f"{where}: config has unknown field {key!r} for format {fmt!r}")
        _check_value(value, f"{where}: config field {key!r}")
    for key in COUNT_FIELDS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckpointError(f"{where}: {key} must be a non-negative int or null, got {_show(value)}")
    for key in NUMBER_FIELDS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise CheckpointError(f"{where}: {key} must be a non-negative number or null, got {_show(value)}")
    for key in TEXT_FIELDS:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{where}: {key} must be a string or null, got {_show(value)}")
    for key, value in record.items():
        if key not in ("format", "config"):
            _check_value(value, f"{where}: field {key!r}")


def _check_value(value: Any, where: str, depth: int = 0) -> None:
    """A JSON value with bounded ints, lists and strings (depth is bounded by the parser already)."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{where} is nested too deeply")
    if value is None or isinstance(value, (bool, float)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise CheckpointError(f"{where}: {value} is out of range (|value| <= 2**31)")
        return
    if isinstance(value, str):
        if len(value) > 4096:
            raise CheckpointError(f"{where}: string is too long ({len(value):,} characters)")
        return
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise CheckpointError(f"{where}: list is too long ({len(value):,} items)")
        for item in value:
            _check_value(item, where, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_value(item, f"{where}.{key}", depth + 1)
        return
    raise CheckpointError(f"{where}: not a JSON value ({type(value).__name__})")


def _check_input_shape(shape: Any, source: str) -> None:
    ok = (
        isinstance(shape, list) and 1 <= len(shape) <= 8
        and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_INT for s in shape)
    )  # fmt: skip
    if not ok or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise CheckpointError(
            f"{source}: header field info.input_shape must be 1 to 8 positive ints with a product of at most "
            f"{MAX_INPUT_ELEMENTS:,}, got {_show(shape)}"
        )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_LAYER_COUNT_KEY = re.compile(r"^(n|num)_(\w+_)?layers?$|^\w+_layers$|^depths?$")


def config_items(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted.name, value)`` under a JSON-like config, mappings and lists walked through
    (a list's items keep the list's name)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            name = f"{path}.{key}" if path else str(key)
            yield name, value
            yield from config_items(value, name)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from config_items(value, path)


def check_layer_counts(config: Any, n_tensors: int, where: str) -> None:
    """Refuse a recorded config (an architecture's kwargs, a ``config.json``) whose layer counts
    exceed the tensors the file holds: each layer has at least one, and a crafted count of 10^5
    layers would otherwise keep the loader building modules for many minutes before the shapes
    are compared. Keys: ``num_hidden_layers``, ``n_layer``, ``encoder_layers``, ``depth(s)``, ..."""
    for name, value in config_items(config):
        if not _LAYER_COUNT_KEY.match(name.rpartition(".")[2].lower()):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and sum(values) > n_tensors:
            raise CheckpointError(f"{where}: {name} = {value} layers, but the file holds only {n_tensors} tensors")
