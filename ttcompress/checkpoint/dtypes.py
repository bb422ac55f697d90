"""A model saved in half precision runs in it: its forward casts floating inputs to its dtype.

A float16/bfloat16 ttcompress checkpoint loads in the dtype it was saved in, every layer alike
(:func:`ttcompress.checkpoint.rebuild.rebuild_model`). Data arrive as float32, so :func:`cast_inputs_to_model`
gives such a model a forward pre-hook that casts floating tensor inputs (positional and keyword,
nested in tuples, lists and dicts) to the model's dtype; integer inputs (token ids) pass
unchanged. Every command (evaluation, report FLOPs and latency, calibration, fine-tuning) then
runs the model as saved, without an option. A float32 model gets no hook.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPE_ERROR", "HALF_DTYPES", "cast_inputs_to_model", "model_dtype"]

#: The half-precision dtypes a checkpoint may be saved in.
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: PyTorch's wording of a dtype mismatch in a forward pass (told apart from a shape mismatch).
DTYPE_ERROR = re.compile(r"dtype|scalar type|Input type \(.*\) and (weight|bias) type|c10::(Half|BFloat16)|"
                         r"(Half|BFloat16|Float|Double)\b.*\b(Half|BFloat16|Float|Double)\b")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s floating parameters (then buffers) when they all share one, else None."""
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if not dtypes:
        dtypes = {t.dtype for t in model.buffers() if t.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 else None


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _cast_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    dtype = model_dtype(module)
    if dtype is None or dtype == torch.float32:
        return None
    return _cast(args, dtype), _cast(kwargs, dtype)


def cast_inputs_to_model(model: nn.Module) -> nn.Module:
    """Give a model whose floating parameters share one dtype other than float32 an input-casting pre-hook.

    Returns ``model`` (unchanged when it is float32, mixed, or already has the hook). The hook
    reads the dtype at each call, so ``model.float()`` later turns it into a no-op.
    """
    dtype = model_dtype(model)
    if dtype is None or dtype == torch.float32:
        return model
    if _cast_inputs not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
    return model
