"""A model's input batch: one tensor, or a mapping of named tensors passed by keyword.

A plain ``nn.Module`` takes one tensor. A transformers model takes ``input_ids`` and, for padded
batches, ``attention_mask`` (and sometimes more): those batches are mappings of names to tensors
whose first dimension is the batch, and the model is called as ``model(**batch)``. Every place
that runs a model on data (calibration, training, distillation, evaluation, FLOPs, latency) goes
through these helpers, so the two forms are handled once. Duck-typed: transformers is never
imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["MASK_KEY", "batch_size_of", "call_model", "input_mask", "main_tensor", "move_inputs", "take_rows"]

#: The key of the padding mask (1 = a real token, 0 = padding) in a mapping batch.
MASK_KEY = "attention_mask"


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of named tensors, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def move_inputs(inputs: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``inputs`` on ``device`` (every tensor of a mapping)."""
    if isinstance(inputs, Mapping):
        return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                for k, v in inputs.items()}  # fmt: skip
    return inputs.to(device, non_blocking=non_blocking)


def main_tensor(inputs: Any) -> torch.Tensor:
    """The tensor that sizes a batch: ``input_ids`` of a mapping, else its first tensor; a tensor as is.

    Raises
    ------
    TypeError
        A mapping without tensors, or something else than a tensor or a mapping.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        if isinstance(inputs.get("input_ids"), torch.Tensor):
            return inputs["input_ids"]
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError("an input mapping holds no tensor")
    raise TypeError(f"an input must be a tensor or a mapping of names to tensors, got {type(inputs).__name__}")


def batch_size_of(inputs: Any) -> int:
    """Number of samples of a batch (the first dimension of :func:`main_tensor`)."""
    return int(main_tensor(inputs).shape[0])


def take_rows(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (of every tensor of a mapping)."""
    if isinstance(inputs, Mapping):
        return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}
    return inputs[:n]


def input_mask(inputs: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a mapping batch, or None (every position counts)."""
    if isinstance(inputs, Mapping) and isinstance(inputs.get(MASK_KEY), torch.Tensor):
        return inputs[MASK_KEY]
    return None
