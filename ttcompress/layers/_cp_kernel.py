"""A CP kernel as an ``(out, K)`` matrix, built and differentiated by blocks of input channels.

``CPConv2d.kernel()`` forms the ``(groups, R, C_in, kh, kw)`` tensor of rank-1 terms and one
``bmm``; under autograd that tensor is saved for the backward pass and its gradient is as large:
``R K`` values each. At ``R`` = 1,723 and ``K`` = 65,536 (CREPE's ``Conv2d(1024, 128, (64, 1))`` at
4x) that is 0.9 GB in float64 per copy, and the calibrated fit (L-BFGS in float64,
:func:`ttcompress.calibration.fit.refine_by_gradient`) held about 3.3 GB of them (issue 25).
:func:`cp_kernel_matrix` gives the same matrix with an autograd function that keeps only the
factors and recomputes each block of rank-1 terms in the backward pass: at most
:data:`BLOCK_VALUES` values of them at a time (the products are those of the plain reconstruction
and its gradient, plus one more elementwise pass over the terms).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BLOCK_VALUES", "LEAN_MIN_VALUES", "cp_kernel_matrix"]

#: Values of rank-1 terms formed at a time (``R x C_in-block x kh x kw``): 128 MB in float64. The
#: forward and backward of the 1723 x 65,536 CREPE case took the CPU time of ``kernel()``'s at this
#: size (3.4 s vs 3.3 s), 1.1x at 8 M, 1.3x at 4 M and 1.6x at 2 M values (one process, load ~10).
BLOCK_VALUES = 1 << 24
#: :meth:`CPConv2d.dense_weight` uses :func:`cp_kernel_matrix` when ``R K`` exceeds this (one
#: block); smaller layers keep ``kernel()``'s single product, bit for bit.
LEAN_MIN_VALUES = BLOCK_VALUES


def _blocks(r: int, cin: int, taps: int) -> range:
    step = max(1, BLOCK_VALUES // max(1, r * taps))
    return range(0, cin, step)


class _CPKernel(torch.autograd.Function):
    """``(u_out, u_in, u_kh, u_kw)`` -> ``(g, cout, cin * kh * kw)``; see :func:`cp_kernel_matrix`."""

    @staticmethod
    def forward(ctx: Any, u_out: torch.Tensor, u_in: torch.Tensor, u_kh: torch.Tensor,  # type: ignore[override]
                u_kw: torch.Tensor) -> torch.Tensor:
        g, cout, r = u_out.shape
        cin, kh, kw = u_in.shape[2], u_kh.shape[2], u_kw.shape[2]
        spatial = (u_kh[:, :, :, None] * u_kw[:, :, None, :]).reshape(g, r, kh * kw)
        out = u_out.new_empty(g, cout, cin, kh * kw)
        blocks = _blocks(r, cin, kh * kw)
        for c0 in blocks:
            c1 = min(cin, c0 + blocks.step)
            terms = (u_in[:, :, c0:c1, None] * spatial[:, :, None, :]).reshape(g, r, -1)
            out[:, :, c0:c1] = torch.bmm(u_out, terms).reshape(g, cout, c1 - c0, kh * kw)
        ctx.save_for_backward(u_out, u_in, u_kh, u_kw)
        return out.reshape(g, cout, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        u_out, u_in, u_kh, u_kw = ctx.saved_tensors
        g, cout, r = u_out.shape
        cin, kh, kw = u_in.shape[2], u_kh.shape[2], u_kw.shape[2]
        spatial = (u_kh[:, :, :, None] * u_kw[:, :, None, :]).reshape(g, r, kh * kw)
        grad = grad.reshape(g, cout, cin, kh * kw)
        g_out = torch.zeros_like(u_out)
        g_in = torch.empty_like(u_in)
        g_spatial = spatial.new_zeros(g * r, 1, kh * kw)
        u_out_t = u_out.transpose(1, 2)
        blocks = _blocks(r, cin, kh * kw)
        for c0 in blocks:
            c1 = min(cin, c0 + blocks.step)
            block = grad[:, :, c0:c1].reshape(g, cout, -1)
            terms = (u_in[:, :, c0:c1, None] * spatial[:, :, None, :]).reshape(g, r, -1)
            g_out.baddbmm_(block, terms.transpose(1, 2))
            del terms
            # the gradient of the block's terms, reduced over the taps and over the channels as
            # batched matrix-vector products (no second temporary of its size)
            g_terms = torch.bmm(u_out_t, block).reshape(g * r, c1 - c0, kh * kw)
            g_in[:, :, c0:c1] = torch.bmm(g_terms, spatial.reshape(g * r, kh * kw, 1)).reshape(g, r, c1 - c0)
            g_spatial.baddbmm_(u_in[:, :, c0:c1].reshape(g * r, 1, c1 - c0), g_terms)
        g_spatial = g_spatial.reshape(g, r, kh, kw)
        g_kh = (g_spatial * u_kw[:, :, None, :]).sum(-1)
        g_kw = (g_spatial * u_kh[:, :, :, None]).sum(-2)
        return g_out, g_in, g_kh, g_kw


def cp_kernel_matrix(u_out: torch.Tensor, u_in: torch.Tensor, u_kh: torch.Tensor, u_kw: torch.Tensor) -> torch.Tensor:
    """``K[g, o, (c, y, x)] = sum_r u_out[g, o, r] u_in[g, r, c] u_kh[g, r, y] u_kw[g, r, x]``.

    Factors as ``CPConv2d`` holds them per group: ``u_out (g, cout, R)``, ``u_in (g, R, cin)``,
    ``u_kh (g, R, kh)``, ``u_kw (g, R, kw)``. Differentiable in all four; no tensor of ``R K``
    values is formed or kept (blocks of :data:`BLOCK_VALUES`).
    """
    return _CPKernel.apply(u_out, u_in, u_kh, u_kw)
