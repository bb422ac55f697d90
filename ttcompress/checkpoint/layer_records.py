"""Put the factorized layers a checkpoint records into a dense model: :func:`apply_layer_records`.

The one way both file kinds rebuild their structure: a ttcompress checkpoint
(:func:`ttcompress.checkpoint.rebuild.rebuild_model`, on the skeleton of the recorded architecture)
and a Hugging Face directory (:mod:`ttcompress.checkpoint.hf`, on the model transformers built from
its config). Each layer is built by its registered format from the recorded ``config``
(``get_format(name).rebuild(config)``: structure only, randomly initialized; the weights are
loaded after), and swapped in with :func:`ttcompress.modtree.set_submodule`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from ttcompress.errors import CheckpointError, short_error
from ttcompress.formats import get_format
from ttcompress.modtree import get_submodule, set_submodule

__all__ = ["apply_layer_records"]

#: Sizes a factorized layer shares with the dense layer it replaced.
_SIZE_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_embeddings", "embedding_dim",
               "embed_dim", "kernel_size", "stride", "padding", "dilation", "groups")  # fmt: skip


def apply_layer_records(model: nn.Module, layers: Mapping[str, Mapping[str, Any]], where: str, *,
                        check_sizes: bool = False, missing: str = "the architecture") -> nn.Module:
    """Replace every recorded layer of ``model`` by its factorized structure; return the (possibly new) root.

    Parameters
    ----------
    model : nn.Module
        The dense model (modified in place).
    layers : mapping
        ``{qualified name: {"format": name, "config": {...}, "rel_error": ...}}``, validated by the
        caller (the header schema, or the directory's record).
    where : str
        The file, for messages.
    check_sizes : bool
        Refuse a layer whose sizes (``in_features``, ...) differ from the dense layer it replaces.
    missing : str
        What a name that is not in ``model`` is missing from, for the message.

    Notes
    -----
    A module reachable under several names (shared, tied) is replaced by one new instance. The old
    module is kept beside its replacement in the lookup: a freed module's ``id()`` can be reused by a
    later module, and must not be mistaken for the shared one.
    """
    by_id: dict[int, tuple[nn.Module, nn.Module]] = {}
    for layer, record in layers.items():
        try:
            old = get_submodule(model, layer)
        except (AttributeError, ValueError, TypeError):
            raise CheckpointError(f"{where}: layer {layer!r} does not exist in {missing}") from None
        seen = by_id.get(id(old))
        new = seen[1] if seen is not None and seen[0] is old else None
        if new is None:
            try:
                new = get_format(record["format"]).rebuild(record.get("config") or {})
            except (TypeError, ValueError, RuntimeError, OverflowError, KeyError) as exc:
                raise CheckpointError(f"{where}: cannot rebuild layer {layer!r}: {short_error(exc)}") from None
            if hasattr(new, "rel_error"):
                with contextlib.suppress(AttributeError):
                    new.rel_error = record.get("rel_error")
            by_id[id(old)] = (old, new)
        if check_sizes:
            _check_same_sizes(old, new, f"{where}: layer {layer!r}")
        model = set_submodule(model, layer, new)
    return model


def _check_same_sizes(old: nn.Module, new: nn.Module, where: str) -> None:
    """Refuse a recorded layer whose sizes differ from the dense layer it replaces in the architecture."""
    for attr in _SIZE_ATTRS:
        a, b = getattr(old, attr, None), getattr(new, attr, None)
        if a is not None and b is not None and not isinstance(a, nn.Module) and _norm(a) != _norm(b):
            raise CheckpointError(f"{where}: the architecture has {attr}={_norm(a)}, the file's layer {_norm(b)}")


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
