"""1x1 convolutions that change memory format on the way, for factorized convs on NCHW input.

A factorized conv (CP, Tucker-2) runs its spatial pass fastest in ``channels_last`` on CPU, while
most networks hand it NCHW tensors. Converting the input, the output and both their gradients
costs four full-size copies, more than the pointwise convolutions themselves on wide layers. But a
1x1 convolution is a matmul per image, and a matmul can read either operand transposed for free:

* :func:`pointwise_to_channels_last` computes ``z_b = x_b^T W^T`` with ``x_b`` the ``(C, HW)`` NCHW
  image, so ``z`` comes out ``(B, HW, R)`` -- a channels_last ``(B, R, H, W)`` tensor, no copy;
* :func:`pointwise_to_nchw` computes ``y_b = W z_b^T + bias`` from a channels_last ``z``, so ``y``
  comes out ``(B, C, HW)``: NCHW, as ``nn.Conv2d`` would return it.

Each is a custom autograd function so that the gradients, too, come out in the layout of the
tensor they belong to (NCHW for the caller's input, channels_last for the intermediate), without
copies; its backward is made of differentiable ops on the saved inputs, so double backward is
exact. Without gradients, and where custom autograd functions cannot run (tracing, compiling,
``torch.func``, forward-mode AD: :func:`~ttcompress.layers._autograd.plain_ops_only`), the same
products run as plain ops. The arithmetic is exactly that of the 1x1 convolution.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ttcompress.layers._autograd import plain_ops_only

__all__ = ["SWITCH_MIN_POSITIONS", "nchw_only", "pointwise_to_channels_last", "pointwise_to_nchw", "switches_layout"]


#: Below this many positions per image (H * W) the layout switch is not worth it: each image's
#: matmul has too few rows. Measured (CP at 8x, fwd+bwd, 1 thread, batch 32; ratio to dense):
#: 16x16 maps 0.20-0.23 switched vs 0.26-0.27 copied to channels_last and back vs 0.24-0.29
#: plain NCHW; 8x8 all within 0.18-0.23; 4x4 and 7x7 at 512 channels 0.25-0.37 switched vs
#: 0.13-0.16 plain NCHW. Smaller maps run the chain in NCHW (no copies either).
SWITCH_MIN_POSITIONS = 128


def nchw_only(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out NCHW and *not* also channels_last (so a layout change is real)."""
    return (x.dim() == 4 and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last))


def switches_layout(x: torch.Tensor) -> bool:
    """Whether a factorized conv should run its chain channels_last by switching layout in its 1x1
    products: an NCHW input (:func:`nchw_only`) with at least :data:`SWITCH_MIN_POSITIONS` positions."""
    return nchw_only(x) and x.shape[-2] * x.shape[-1] >= SWITCH_MIN_POSITIONS


def _batched(mat: torch.Tensor, batch: int) -> torch.Tensor:
    return mat.expand(batch, *mat.shape)  # batch stride 0: one weight for every image


def _to_channels_last(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x3 = x.reshape(b, c, h * w).transpose(1, 2)
    if plain_ops_only():  # traced/exported: a broadcast MatMul, not an Expand the runtime materialises
        z = torch.matmul(x3, weight.t())
    else:
        z = torch.bmm(x3, _batched(weight.t(), b))  # (B, HW, R)
    return z.view(b, h, w, -1).permute(0, 3, 1, 2)


def _to_nchw(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b, r, h, w = z.shape
    z3t = z.permute(0, 2, 3, 1).reshape(b, h * w, r).transpose(1, 2)  # a view when z is channels_last
    if plain_ops_only():  # traced/exported: a broadcast MatMul, not an Expand the runtime materialises
        y = torch.matmul(weight, z3t)
        if bias is not None:
            y = y + bias.view(1, -1, 1)
    elif bias is None:
        y = torch.bmm(_batched(weight, b), z3t)
    else:
        y = torch.baddbmm(bias.view(1, -1, 1), _batched(weight, b), z3t)
    return y.view(b, -1, h, w)


def _plain(*tensors: torch.Tensor | None) -> bool:
    """Use the plain (autograd-differentiated) ops: see :func:`plain_ops_only`, or when no
    gradient will be asked for."""
    if plain_ops_only():
        return True
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


class _ToChannelsLast(torch.autograd.Function):
    # The result is a fresh tensor (not a view of one made here), so in-place ops on it, such as a
    # following ReLU(inplace=True), are allowed; the inputs themselves are saved, and the backward
    # is made of differentiable ops on them, so double backward (Hessian-vector products) is exact.
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = torch.empty((b, weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        torch.bmm(x.reshape(b, c, h * w).transpose(1, 2), _batched(weight.t(), b),
                  out=z.permute(0, 2, 3, 1).view(b, h * w, -1))
        ctx.save_for_backward(x, weight)
        return z

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        g3 = grad.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # a view when grad is channels_last
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(_batched(weight.t(), b), g3.transpose(1, 2)).view(b, c, h, w)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g3.transpose(1, 2), x.reshape(b, c, h * w).transpose(1, 2)).sum(0)
        return grad_x, grad_w


class _ToNCHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, r, h, w = z.shape
        y = torch.empty((b, weight.shape[0], h, w), dtype=z.dtype, device=z.device)
        z3t = z.permute(0, 2, 3, 1).reshape(b, h * w, r).transpose(1, 2)  # a view when z is channels_last
        y3 = y.view(b, -1, h * w)
        if bias is None:
            torch.bmm(_batched(weight, b), z3t, out=y3)
        else:
            torch.baddbmm(bias.view(1, -1, 1), _batched(weight, b), z3t, out=y3)
        ctx.save_for_backward(z, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, weight = ctx.saved_tensors
        b, r, h, w = z.shape
        g3 = grad.reshape(b, grad.shape[1], h * w)  # a view when grad is NCHW
        grad_z = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_z = torch.bmm(g3.transpose(1, 2), _batched(weight, b)).view(b, h, w, r).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g3, z.permute(0, 2, 3, 1).reshape(b, h * w, r)).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g3.sum((0, 2))
        return grad_z, grad_w, grad_b


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return None


def pointwise_to_channels_last(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(x, weight[:, :, None, None])`` for an NCHW ``x`` ``(B, C, H, W)`` and ``weight``
    ``(R, C)``; the result ``(B, R, H, W)`` is channels_last."""
    dtype = _autocast_dtype(x)
    if dtype is not None:  # as autocast runs a conv: in its dtype, operands cast up front
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if _plain(x, weight):
            return _to_channels_last(x, weight)
        return _ToChannelsLast.apply(x, weight)


def pointwise_to_nchw(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(z, weight[:, :, None, None], bias)`` for ``z`` ``(B, R, H, W)`` (channels_last for
    speed; any layout is correct) and ``weight`` ``(C, R)``; the result is NCHW-contiguous."""
    dtype = _autocast_dtype(z)
    if dtype is not None:
        z, weight, bias = z.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    with torch.autocast(z.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if _plain(z, weight, bias):
            return _to_nchw(z, weight, bias)
        return _ToNCHW.apply(z, weight, bias)
