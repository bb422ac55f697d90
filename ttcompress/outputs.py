"""The tensor that losses and metrics read from a model's output.

A plain ``nn.Module`` returns a tensor. A transformers model returns a ``ModelOutput`` (a mapping
that also exposes its fields as attributes) or, with ``return_dict=False``, a tuple. Duck-typed,
so transformers is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ttcompress.errors import UserInputError

__all__ = ["is_logits_field", "primary_output"]

# In order of preference: a classifier's or language model's logits, else an encoder's states.
_FIELDS = ("logits", "last_hidden_state")


def primary_output(out: Any, *, what: str = "the model") -> torch.Tensor:
    """The tensor of ``out`` that a loss or a metric is computed on.

    Parameters
    ----------
    out : Any
        What a model's forward returned: a tensor is returned as is; a mapping (a transformers
        ``ModelOutput``, a dict) gives its ``logits``, else its ``last_hidden_state``, else its
        first tensor value; a tuple or list gives its first element (unwrapped the same way).

    Returns
    -------
    torch.Tensor

    Raises
    ------
    UserInputError
        Nothing of ``out`` is a tensor; the message names the type that was returned.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for field in _FIELDS:
            if isinstance(out.get(field), torch.Tensor):
                return out[field]
        for value in out.values():
            if isinstance(value, torch.Tensor):
                return value
    elif isinstance(out, (tuple, list)) and out:
        return primary_output(out[0], what=what)
    raise UserInputError(f"{what} returned {_describe(out)}, not a tensor (nor logits, last_hidden_state "
                         "or a tuple starting with a tensor)")


def is_logits_field(out: Any) -> bool:
    """Whether :func:`primary_output` of ``out`` is a ``logits`` field (of a ``ModelOutput`` or a
    dict, possibly first in a tuple): unnormalized log-probabilities over the last dimension."""
    if isinstance(out, (tuple, list)) and out:
        return is_logits_field(out[0])
    return isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor)


def _describe(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {sorted(map(str, out.keys()))[:8]}"
    if isinstance(out, (tuple, list)):
        return f"an empty {type(out).__name__}" if not out else f"a {type(out).__name__} starting with {_describe(out[0])}"
    return "None" if out is None else f"a {type(out).__name__}"
