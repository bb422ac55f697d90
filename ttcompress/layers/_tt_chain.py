"""Permute-free TT-matrix times rows: a custom autograd function for :class:`TTLinear`.

The input rows are contracted with the merged core groups from the last to the first. With the
state of group ``g = [a, b)`` laid out as ``(rows * N_{<a}, N_g r_b, M_{>=b})``, the step is one
(broadcast) batched matmul ``W_g @ state`` with ``W_g = G_g.reshape(r_a M_g, N_g r_b)`` (a view
of the merged core), and its result ``(rows * N_{<a}, r_a M_g, M_{>=b})`` *is* the next group's
state by a reshape: the data are contracted in the order they lie and no intermediate is ever
permuted. The last group (``M_{>=b} = 1``) is one plain matmul and the first (``r_a = 1``) leaves
``(rows, M)`` directly.

The backward uses the saved states: ``d state = W_g^T @ d out`` (the same broadcast matmul) and
``d W_g = sum_p d out_p state_p^T``; the latter is one matmul of the two tensors with their batch
and column axes folded (one copy each, or none for the last group).

References
----------
.. [1] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["tt_chain"]

# Shape of one group: (n_left, n_g, r_left, m_g, r_right, m_right) with n_left = N_{<a},
# m_right = M_{>=b}.
GroupDims = tuple[int, int, int, int, int, int]


def _chain_forward(x: torch.Tensor, mats: Sequence[torch.Tensor], dims: Sequence[GroupDims]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(rows, N) -> (rows, M)``; also returns the input state of every group (for backward)."""
    rows = x.shape[0]
    states: list[torch.Tensor] = [x] * len(mats)
    out = x
    for g in range(len(mats) - 1, -1, -1):
        n_left, n_g, r_left, m_g, r_right, m_right = dims[g]
        if m_right == 1:  # last group: one matmul with the rows on the left
            state = out.reshape(rows * n_left, n_g * r_right)
            out = state @ mats[g].t()
        else:
            state = out.reshape(rows * n_left, n_g * r_right, m_right)
            out = _left_matmul(mats[g], state)
        states[g] = state
    return out.reshape(rows, -1), states


def _left_matmul(mat: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``mat @ state[p]`` for every ``p``: one batched matmul whose left operand has batch stride 0."""
    return torch.bmm(mat.expand(state.shape[0], *mat.shape), state)


def _weight_grad(grad_out: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``sum_p grad_out[p] @ state[p]^T`` for ``(P, R, Q)`` and ``(P, K, Q)`` (or 2-D, ``Q = 1``)."""
    if state.dim() == 2:
        return grad_out.t() @ state
    p, r, q = grad_out.shape
    k = state.shape[1]
    if p * r * k <= (r + k) * p * q:  # a batched product summed is smaller than two folded copies
        return torch.bmm(grad_out, state.transpose(1, 2)).sum(0)
    return grad_out.transpose(0, 1).reshape(r, p * q) @ state.transpose(0, 1).reshape(k, p * q).t()


def _chain_backward(grad: torch.Tensor, mats: Sequence[torch.Tensor], states: Sequence[torch.Tensor],
                    weight_grads: list[torch.Tensor | None], need: Sequence[bool], need_x: bool
                    ) -> torch.Tensor | None:
    """Backward of one chunk: accumulates into ``weight_grads``; returns the input's gradient."""
    n = len(mats)
    grad_out: torch.Tensor = grad
    for g in range(n):
        state, mat = states[g], mats[g]
        if state.dim() == 2:
            grad_out = grad_out.reshape(state.shape[0], mat.shape[0])
        else:
            grad_out = grad_out.reshape(state.shape[0], mat.shape[0], state.shape[2])
        if need[g]:
            part = _weight_grad(grad_out, state)
            current = weight_grads[g]
            weight_grads[g] = part if current is None else current.add_(part)
        if g == n - 1 and not need_x:
            return None
        grad_out = grad_out @ mat if state.dim() == 2 else _left_matmul(mat.t(), grad_out)
    return grad_out


class _TTChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: tuple[GroupDims, ...], chunk_rows: int,
                *mats: torch.Tensor) -> torch.Tensor:
        outs, saved = [], []
        for part in x.split(chunk_rows):
            out, states = _chain_forward(part, mats, dims)
            outs.append(out)
            saved.extend(states)
        ctx.n_groups = len(mats)
        ctx.chunk_rows = chunk_rows
        ctx.x_shape = x.shape
        ctx.save_for_backward(*mats, *saved)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = ctx.n_groups
        saved = ctx.saved_tensors
        mats = saved[:n]
        need = ctx.needs_input_grad[3:]
        need_x = ctx.needs_input_grad[0]
        weight_grads: list[torch.Tensor | None] = [None] * n
        grad_x = grad.new_empty(ctx.x_shape) if need_x else None
        for i, part in enumerate(grad.contiguous().split(ctx.chunk_rows)):
            states = saved[n + i * n: n + (i + 1) * n]
            part_x = _chain_backward(part, mats, states, weight_grads, need, need_x)
            if grad_x is not None and part_x is not None:
                start = i * ctx.chunk_rows
                grad_x[start:start + part.shape[0]] = part_x.reshape(part.shape[0], -1)
        return (grad_x, None, None, *weight_grads)


def tt_chain(x: torch.Tensor, mats: Sequence[torch.Tensor], dims: Sequence[GroupDims], *,
             chunk_rows: int | None = None) -> torch.Tensor:
    """Rows ``x`` ``(rows, N)`` times the TT-matrix given by merged core groups; ``(rows, M)``.

    Parameters
    ----------
    x : torch.Tensor
        ``(rows, N)`` input rows (zero-padded to the product of the input modes).
    mats : sequence of torch.Tensor
        Group ``g``'s merged core reshaped to ``(r_a M_g, N_g r_b)`` (a view of ``(r_a, M_g, N_g,
        r_b)``), groups in core order.
    dims : sequence of tuple of int
        ``(N_{<a}, N_g, r_a, M_g, r_b, M_{>=b})`` per group.
    chunk_rows : int, optional
        Rows contracted at a time (forward and backward), so that one chunk's intermediates stay
        in cache; default: all rows at once.
    """
    chunk = max(1, int(x.shape[0] if chunk_rows is None else chunk_rows))
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        # As autocast would run each matmul: in its dtype, the operands cast once up front.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _TTChain.apply(x.to(dtype), tuple(dims), chunk, *(m.to(dtype) for m in mats))
    return _TTChain.apply(x, tuple(dims), chunk, *mats)
