"""The values of a ``config.json`` (or a recorded ``hf:`` config), checked before transformers sees them.

transformers builds a config object from whatever the file says: ``n_head: 0`` divides by zero,
``n_head: "2"`` and ``vocab_size: NaN`` fail deep inside it, and ``num_labels: 2**31`` builds a
2^31-entry ``id2label`` dict before any tensor is compared. So the raw dict is checked first:

* every field the config class declares (its ``__init__`` annotations, else its default's type)
  holds a value of that type: an ``int`` field an int (not a bool, a string or a float), a
  ``float`` field a finite number, a ``bool`` field a bool, and so on; a field whose declared type
  is something else (a ``Literal``, a nested config class) is left to transformers, whose every
  exception is then one line (:class:`~ttcompress.errors.CheckpointError`);
* sizes are positive: an int field named like a size (``vocab_size``, ``n_embd``, ``n_head``,
  ``num_attention_heads``, ``max_position_embeddings``, ...) is at least 1, and a count
  (``n_layer``, any ``n_*``/``num_*``) at least 0, where the class's own default keeps that bound
  (a default of 0 or -1 means "off" or "from the end" for that model: llava's
  ``vision_feature_layer`` is -2);
* no float anywhere in the config is NaN or infinite;
* ``num_labels`` and the sizes of ``id2label`` / ``label2id`` are at most a bound set by the
  tensors present (:func:`label_bound`: their largest dimension, as a dense classifier head has
  ``num_labels`` rows, or up to :data:`MAX_LABELS` as far as they hold that many elements), or
  :data:`MAX_LABELS` where no tensors are known (a config given in Python or on the command line).

Nested configs (``text_config``, ``vision_config``) are checked against their own classes.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from ttcompress.errors import CheckpointError
from ttcompress.checkpoint.header import config_items

__all__ = ["MAX_LABELS", "check_config_values", "check_label_counts", "label_bound"]

#: Most labels a classification config may declare when no tensors bound it (about a million).
MAX_LABELS = 1 << 20

_LABEL_KEYS = ("id2label", "label2id")
#: Int fields that size a tensor dimension: at least 1.
_SIZE = re.compile(r"(_size|_dim|_heads|_embd|_positions|_embeddings|_channels)$|^n_head$|^n_embd$")
#: Int fields that count something (layers, heads, experts): at least 0.
_COUNT = re.compile(r"^(n|num)_|_layers?$")

_KIND_NAMES = {"int": "int", "float": "float", "bool": "bool", "str": "str", "None": "none", "NoneType": "none",
               "list": "list", "tuple": "list", "dict": "dict"}  # fmt: skip
_SHOW = {"int": "an int", "float": "a finite number", "bool": "true or false", "str": "a string", "none": "null",
         "list": "a list", "dict": "an object"}  # fmt: skip


def label_bound(shapes: Iterable[tuple[int, ...]]) -> int:
    """The most labels a config may declare for a file holding tensors of ``shapes``.

    A dense classifier head has one row per label, so its largest dimension; a factorized head
    (TT, SVD) has fewer rows than labels, so also up to :data:`MAX_LABELS` where the tensors hold
    at least that many elements in all; and at least 2 (transformers' default). A tensor without
    elements (shape ``[2**31, 0]``, free to store) bounds nothing.
    """
    shapes = [tuple(s) for s in shapes if math.prod(s) > 0]
    largest = max((max(s, default=1) for s in shapes), default=1)
    return max(2, largest, min(MAX_LABELS, sum(math.prod(s) for s in shapes)))


def check_label_counts(config: Any, bound: int, where: str) -> None:
    """Refuse ``num_labels``, ``id2label`` or ``label2id`` (anywhere in ``config``) beyond ``bound``.

    transformers builds ``id2label`` with ``num_labels`` entries as soon as the config is made, so
    this runs on the raw dict, before it is given to transformers.
    """
    for name, value in config_items(config):
        key = name.rpartition(".")[2]
        if key == "num_labels":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                raise CheckpointError(f"{where}: {name} must be an int from 1 to {bound:,} (bounded by the tensors "
                                      f"present), got {_show(value)}")
        elif key in _LABEL_KEYS and value is not None:
            if not isinstance(value, Mapping):
                raise CheckpointError(f"{where}: {name} must be an object, got {_show(value)}")
            if len(value) > bound:
                raise CheckpointError(f"{where}: {name} has {len(value):,} labels, more than {bound:,} (bounded by "
                                      "the tensors present)")


def check_config_values(
    config: Mapping[str, Any], config_class: type, where: str, *, max_labels: int = MAX_LABELS
) -> None:
    """Refuse (one line) a raw config whose values do not fit ``config_class``'s declared fields.

    Parameters
    ----------
    config : mapping
        The config as read from JSON.
    config_class : type
        The transformers config class for its ``model_type``.
    where : str
        The file, for messages.
    max_labels : int, optional
        Bound of ``num_labels`` and of the label maps (see :func:`label_bound`).

    Raises
    ------
    CheckpointError
        A wrong type, a non-positive size, a non-finite float, or too many labels.
    """
    for name, value in config_items(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{where}: {name} must be a finite number, got {value}")
    check_label_counts(config, max_labels, where)
    _check_fields(config, config_class, where, "")


def _check_fields(config: Mapping[str, Any], config_class: type, where: str, prefix: str) -> None:
    fields = _declared_fields(config_class)
    aliases = getattr(config_class, "attribute_map", None) or {}
    subs = getattr(config_class, "sub_configs", None) or {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        sub = subs.get(key)
        if isinstance(sub, type) and isinstance(value, Mapping):
            _check_fields(value, sub, where, f"{name}.")
            continue
        field = aliases.get(key, key) if isinstance(aliases, Mapping) else key
        if field not in fields:
            continue
        kinds, default = fields[field]
        if not _fits(value, kinds):
            wanted = " or ".join(_SHOW[k] for k in sorted(kinds))
            raise CheckpointError(f"{where}: {name} must be {wanted}, got {_show(value)}")
        if isinstance(value, int) and not isinstance(value, bool) and "int" in kinds:
            low = 1 if _SIZE.search(field) else 0 if _COUNT.search(field) else None
            # only where the class's own default keeps the bound (llava's vision_feature_layer is -2)
            if low is not None and isinstance(default, int) and default >= low and value < low:
                sign = "a positive" if low else "a non-negative"
                raise CheckpointError(f"{where}: {name} must be {sign} int, got {value}")


def _fits(value: Any, kinds: frozenset[str]) -> bool:
    if value is None:
        return "none" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    if isinstance(value, list):
        return "list" in kinds
    if isinstance(value, Mapping):
        return "dict" in kinds
    return False


@functools.lru_cache(maxsize=256)
def _declared_fields(config_class: type) -> dict[str, tuple[frozenset[str], Any]]:
    """``{field: (kinds, default)}`` for the fields of ``config_class`` whose declared type is made
    only of int, float, bool, str, None, list, tuple and dict (others are left out: not checked here)."""
    try:
        params = inspect.signature(config_class.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    fields: dict[str, tuple[frozenset[str], Any]] = {}
    for p in params:
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kinds = _kinds(p.annotation, p.default)
        if kinds:
            fields[p.name] = (kinds, p.default)
    return fields


def _kinds(annotation: Any, default: Any) -> frozenset[str] | None:
    if annotation is inspect.Parameter.empty:
        if default is inspect.Parameter.empty or default is None:
            return None
        kind = _KIND_NAMES.get(type(default).__name__)
        return frozenset({kind, "none"} if kind == "float" else {kind}) if kind else None
    kinds = set()
    for arm in _arms(annotation):
        kind = _arm_kind(arm)
        if kind is None:
            return None  # a type this check does not know: transformers decides
        kinds.add(kind)
    return frozenset(kinds)


def _arms(annotation: Any) -> list[Any]:
    """The members of a union annotation (a string ``"int | None"`` or a typing object)."""
    if isinstance(annotation, str):
        arms, depth, start = [], 0, 0
        for i, ch in enumerate(annotation):
            if ch in "[(":
                depth += 1
            elif ch in "])":
                depth -= 1
            elif ch == "|" and depth == 0:
                arms.append(annotation[start:i])
                start = i + 1
        return [a.strip() for a in [*arms, annotation[start:]]]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [arm for a in typing.get_args(annotation) for arm in _arms(a)]
    return [annotation]


def _arm_kind(arm: Any) -> str | None:
    if isinstance(arm, str):
        base = arm.split("[", 1)[0].strip().removeprefix("typing.")
        return _KIND_NAMES.get({"List": "list", "Dict": "dict", "Tuple": "tuple", "Optional": "?"}.get(base, base))
    if arm is None or arm is type(None):
        return "none"
    origin = typing.get_origin(arm) or arm
    return _KIND_NAMES.get(origin.__name__) if isinstance(origin, type) else None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
