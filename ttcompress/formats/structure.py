"""Exact restructuring around compression: attention modules, GPT-2 ``Conv1D``, encoder fast paths.

``nn.MultiheadAttention`` keeps its q/k/v projection as one bare parameter and reads
``out_proj.weight`` itself, so its projections cannot be compressed in place. Before planning,
:func:`prepare_model` converts every attention module the ``mha`` format supports into a
:class:`~ttcompress.layers.attention.FactorizedMultiheadAttention` (exact), whose projections
``q``, ``k``, ``v``, ``out`` are Linear layers a plan addresses by name, and turns
``transformers``' ``Conv1D`` layers (a transposed Linear) into ``nn.Linear``. After the swap,
:func:`finish_model` puts back the attention modules none of whose projections changed (unless
their encoder layer's feed-forward part changed: that layer's fast path reads ``linear1.weight``
and is skipped only with a converted attention) and turns off the nested-tensor fast path of
encoders whose layers changed. :func:`parent_reason` names the layers that must stay dense
because a parent that could not be converted reads their weights.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ttcompress.checkpoint import hf
from ttcompress.formats.base import dense_params
from ttcompress.modtree import get_submodule, set_submodule
from ttcompress.formats.registry import get_format
from ttcompress.layers.attention import FactorizedMultiheadAttention, disable_nested_fast_path, unsupported_reason

__all__ = ["Preparation", "finish_model", "parent_reason", "prepare_model", "preview_preparation"]


@dataclass
class Preparation:
    """What :func:`prepare_model` changed (exactly) before planning, so it can be finished or undone.

    Attributes
    ----------
    model : nn.Module
        The current root.
    attention : dict
        ``{name: (original nn.MultiheadAttention, converted module, aliases)}``.
    refused : dict
        ``{name: reason}`` for every ``nn.MultiheadAttention`` that cannot be converted.
    linearized : list of str
        ``Conv1D`` layers replaced by ``nn.Linear``.
    """

    model: nn.Module
    attention: dict[str, tuple[nn.Module, nn.Module, tuple[str, ...]]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    linearized: list[str] = field(default_factory=list)
    nested: list[nn.Module] = field(default_factory=list)

    def undo(self) -> nn.Module:
        """Put every converted attention module back (``Conv1D`` linearization is exact and stays)."""
        for name, (old, _, aliases) in self.attention.items():
            for n in (name, *aliases):
                self.model = set_submodule(self.model, n, old)
        self.attention.clear()
        for encoder in self.nested:
            encoder.use_nested_tensor = True
        return self.model

    def layer_records(self, root: nn.Module) -> dict[str, dict[str, Any]]:
        """Checkpoint records of the converted attention modules still in place (parents first)."""
        fmt = get_format("mha")
        out: dict[str, dict[str, Any]] = {}
        for name, (old, new, aliases) in self.attention.items():
            if get_submodule(root, name) is new:
                params = dense_params(old)
                record = {"format": fmt.name, "config": new.config(), "rel_error": 0.0, "params_before": params,
                          "params_after": params}
                out.update({n: dict(record) for n in (name, *aliases)})
        return out


def preview_preparation(model: nn.Module) -> Preparation:
    """The structure :func:`prepare_model` would put in place, without touching ``model``: on a
    copy when it would change something (attention, ``Conv1D``), else ``model`` itself as is (no
    copy of a large model that needs none)."""
    if any(isinstance(m, nn.MultiheadAttention) or hf.is_conv1d(m) for m in model.modules()):
        return prepare_model(copy.deepcopy(model))
    return Preparation(model)


def prepare_model(model: nn.Module) -> Preparation:
    """Put in place, exactly, the structure compression needs (see :func:`compress_with_report`).

    Every ``nn.MultiheadAttention`` that :func:`~ttcompress.layers.attention.unsupported_reason`
    accepts becomes a :class:`~ttcompress.layers.attention.FactorizedMultiheadAttention` (one
    instance per shared module); the others are listed with the reason. ``transformers``'
    ``Conv1D`` layers become ``nn.Linear`` (:func:`ttcompress.checkpoint.hf.linearize_conv1d`).
    """
    prep = Preparation(model)
    if any(hf.is_conv1d(m) for m in model.modules()):
        prep.linearized = hf.linearize_conv1d(model)
    names: dict[int, list[str]] = {}
    mods: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.MultiheadAttention):
            names.setdefault(id(m), []).append(name)
            mods[id(m)] = m
    for key, (first, *aliases) in names.items():
        old = mods[key]
        reason = unsupported_reason(old)
        if reason is not None:
            prep.refused.update({n: reason for n in (first, *aliases)})
            continue
        new = FactorizedMultiheadAttention.from_mha(old)
        prep.attention[first] = (old, new, tuple(aliases))
        for n in (first, *aliases):
            prep.model = set_submodule(prep.model, n, new)
    prep.nested = [prep.model.get_submodule(n) for n in disable_nested_fast_path(prep.model)]
    return prep


def parent_reason(prep: Preparation, name: str) -> str | None:
    """Why the layer at ``name`` must stay dense because of its parent, or None: the ``out_proj`` of an
    ``nn.MultiheadAttention`` that could not be converted (its forward reads ``out_proj.weight``),
    and the feed-forward layers of a ``TransformerEncoderLayer`` whose attention could not be
    converted (its fast path reads ``linear1.weight``)."""
    parent, _, child = name.rpartition(".")
    if child == "out_proj" and parent in prep.refused:
        return f"its parent MultiheadAttention reads out_proj.weight and cannot be converted: {prep.refused[parent]}"
    if child in ("linear1", "linear2") and f"{parent}.self_attn" in prep.refused:
        return ("the TransformerEncoderLayer fast path reads its weight and its self_attn cannot be converted: "
                f"{prep.refused[parent + '.self_attn']}")
    return None


def finish_model(prep: Preparation) -> nn.Module:
    """After the swap: put back converted attention modules none of whose projections changed
    (unless their encoder layer's ``linear1``/``linear2`` did), and turn off the nested-tensor fast
    path of encoders whose layers changed. Returns the root."""
    for name, (old, new, aliases) in list(prep.attention.items()):
        changed = any(type(getattr(new, c)) is not nn.Linear for c in ("q", "k", "v", "out"))
        parent, _, child = name.rpartition(".")
        layer = get_submodule(prep.model, parent) if child == "self_attn" else None
        ffn = layer is not None and any(not isinstance(getattr(layer, c, None), nn.Linear) for c in ("linear1", "linear2"))
        if not changed and not ffn:
            for n in (name, *aliases):
                prep.model = set_submodule(prep.model, n, old)
            del prep.attention[name]
    prep.nested = [prep.model.get_submodule(n) for n in disable_nested_fast_path(prep.model)]
    return prep.model


