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

from ttcompress.layers._autograd import plain_ops_only

__all__ = ["tt_chain"]

# Shape of one group: (n_left, n_g, r_left, m_g, r_right, m_right) with n_left = N_{<a},
# m_right = M_{>=b}.
GroupDims = tuple[int, int, int, int, int, int]


def _chain_forward(x: torch.Tensor, mats: Sequence[torch.Tensor], dims: Sequence[GroupDims],
                   out: torch.Tensor | None = None, bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(rows, N) -> (rows, M)``; also returns the input state of every group (for backward).

    With ``out`` (a contiguous ``(rows, M)`` tensor) the first group writes its result there; with
    ``bias`` (``(M,)``) that matmul adds it (``beta = 1``), so the bias costs no extra pass.
    """
    rows = x.shape[0]
    states: list[torch.Tensor] = [x] * len(mats)
    y = x
    for g in range(len(mats) - 1, -1, -1):
        n_left, n_g, r_left, m_g, r_right, m_right = dims[g]
        target = None if out is None or g else out.view(rows * n_left, r_left * m_g, m_right)
        add = bias if g == 0 else None
        if m_right == 1:  # last group: one matmul with the rows on the left
            state = y.reshape(rows * n_left, n_g * r_right)
            target2 = None if target is None else target.view(state.shape[0], -1)
            if add is None:
                y = torch.mm(state, mats[g].t(), out=target2)
            else:
                y = torch.addmm(add, state, mats[g].t(), out=target2)
        else:
            state = y.reshape(rows * n_left, n_g * r_right, m_right)
            y = _left_matmul(mats[g], state, out=target,
                             add=None if add is None else add.view(1, r_left * m_g, m_right))
        states[g] = state
    return y.reshape(rows, -1), states


def _left_matmul(mat: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None = None,
                 add: torch.Tensor | None = None) -> torch.Tensor:
    """``mat @ state[p]`` (``+ add``, broadcast) for every ``p``: one batched matmul whose left
    operand has batch stride 0.

    Traced or exported (:func:`plain_ops_only`), a broadcasting ``matmul`` instead: an exported
    ``Expand`` is materialised by the runtime (onnxruntime allocated 1 GB per TT layer of a small
    ViT at batch 64), a broadcast ``MatMul`` is not.
    """
    if out is None and plain_ops_only():
        y = torch.matmul(mat, state)
        return y if add is None else y + add
    batched = mat.expand(state.shape[0], *mat.shape)
    if add is None:
        return torch.bmm(batched, state, out=out)
    return torch.baddbmm(add, batched, state, out=out)


def _accumulate_weight_grad(acc: torch.Tensor | None, grad_out: torch.Tensor, state: torch.Tensor
                            ) -> torch.Tensor:
    """Add ``sum_p state[p] @ grad_out[p]^T`` (``(P, K, Q)``, ``(P, R, Q)``; or 2-D, ``Q = 1``) to ``acc``.

    ``acc`` is the *transposed* weight gradient ``(K, R)``, or ``(P, K, R)`` when the per-``p``
    products are kept unsummed (a batched product is smaller than two folded copies): then
    :func:`_finish_weight_grad` sums over ``p`` once, after the last chunk, instead of once per
    chunk. Transposed, the large operand (the state) is read in the order it lies, which MKL runs
    1.5x faster than reading it transposed (docs/benchmarks.md, issue 15).
    """
    if state.dim() == 2:
        return state.t() @ grad_out if acc is None else acc.addmm_(state.t(), grad_out)
    p, r, q = grad_out.shape
    k = state.shape[1]
    grad_t = grad_out.transpose(1, 2)
    if p * r * k <= (r + k) * p * q and (acc is None or (acc.dim() == 3 and acc.shape[0] >= p)):
        if acc is None:
            return torch.bmm(state, grad_t)
        acc[:p].baddbmm_(state, grad_t)  # a shorter last chunk adds into the first p rows
        return acc
    if acc is not None and acc.dim() == 3:  # a longer chunk after a shorter one: fold the products first
        acc = acc.sum(0)
    part = state.transpose(0, 1).reshape(k, p * q) @ grad_out.transpose(0, 1).reshape(r, p * q).t()
    return part if acc is None else acc.add_(part)


def _finish_weight_grad(acc: torch.Tensor | None) -> torch.Tensor | None:
    """The weight gradient ``(R, K)`` from the transposed accumulator of :func:`_accumulate_weight_grad`."""
    if acc is None:
        return None
    return (acc.sum(0) if acc.dim() == 3 else acc).t()


def _chain_backward(grad: torch.Tensor, mats: Sequence[torch.Tensor], mats_t: Sequence[torch.Tensor],
                    states: Sequence[torch.Tensor], weight_grads: list[torch.Tensor | None],
                    need: Sequence[bool], grad_x: torch.Tensor | None) -> None:
    """Backward of one chunk: accumulates into ``weight_grads`` (transposed, see
    :func:`_accumulate_weight_grad`); writes the input's gradient into ``grad_x`` (the chunk's
    contiguous ``(rows, N)`` slice) when given. ``mats_t[g]`` is ``mats[g].t()``, contiguous for the
    groups that multiply by it (3-D states): the batched ``W_g^T @ d out`` reads it 1.3x faster so."""
    n = len(mats)
    grad_out: torch.Tensor = grad
    for g in range(n):
        state, mat = states[g], mats[g]
        if state.dim() == 2:
            grad_out = grad_out.reshape(state.shape[0], mat.shape[0])
        else:
            grad_out = grad_out.reshape(state.shape[0], mat.shape[0], state.shape[2])
        if need[g]:
            weight_grads[g] = _accumulate_weight_grad(weight_grads[g], grad_out, state)
        if g == n - 1:
            if grad_x is not None:
                target = grad_x.view(state.shape)
                if state.dim() == 2:
                    torch.mm(grad_out, mat, out=target)
                else:
                    _left_matmul(mats_t[g], grad_out, out=target)
            return
        grad_out = grad_out @ mat if state.dim() == 2 else _left_matmul(mats_t[g], grad_out)


class _TTChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: tuple[GroupDims, ...], chunk_rows: int,
                bias: torch.Tensor | None, *mats: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(x.shape[0], mats[0].shape[0] * dims[0][5])
        saved = []
        for start in range(0, x.shape[0], chunk_rows):
            _, states = _chain_forward(x[start:start + chunk_rows], mats, dims,
                                       out=y[start:start + chunk_rows], bias=bias)
            saved.extend(states)
        ctx.n_groups = len(mats)
        ctx.chunk_rows = chunk_rows
        ctx.x_shape = x.shape
        ctx.dims = dims
        ctx.save_for_backward(x, bias, *mats, *saved)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = ctx.n_groups
        x, bias, *saved = ctx.saved_tensors
        mats = saved[:n]
        if torch.is_grad_enabled():  # create_graph=True: a backward that can itself be differentiated
            return _differentiable_backward(ctx, grad, x, bias, mats)
        need = ctx.needs_input_grad[4:]
        weight_grads: list[torch.Tensor | None] = [None] * n
        grad_x = grad.new_empty(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad = grad.contiguous()
        starts = range(0, grad.shape[0], ctx.chunk_rows)
        # Last chunk first: its states were written last by the forward, so they are the likeliest
        # to still be in cache (measured 1-4 % faster than first-chunk-first, docs/benchmarks.md).
        # A shorter last chunk goes at the very end, so that the full chunks set the size of the
        # per-row weight-gradient accumulators and the short one adds into their first rows.
        mats_t = [m.t() if s.dim() == 2 else m.t().contiguous() for m, s in zip(mats, saved[n:2 * n], strict=True)]
        order = list(reversed(range(len(starts))))
        if grad.shape[0] % ctx.chunk_rows and len(order) > 1:
            order = order[1:] + order[:1]
        for i in order:
            start = starts[i]
            stop = start + ctx.chunk_rows
            states = saved[n + i * n: n + (i + 1) * n]
            _chain_backward(grad[start:stop], mats, mats_t, states, weight_grads, need,
                            None if grad_x is None else grad_x[start:stop])
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
        return (grad_x, None, None, grad_bias, *(_finish_weight_grad(w) for w in weight_grads))


def _differentiable_backward(ctx: Any, grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                             mats: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """The gradients as a graph (for double backward: Hessian-vector products, gradient penalties).

    The saved states are results of the forward, cut off from autograd, and the fast backward
    writes into preallocated tensors; so the contraction is redone in plain differentiable ops
    from the saved inputs and differentiated by autograd with ``create_graph``.
    """
    inputs = [x, bias, *mats]
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[0 if i == 0 else i + 2]]
    y, _ = _chain_forward(x, mats, ctx.dims)
    if bias is not None:
        y = y + bias
    grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g
    return (out[0], None, None, *out[1:])


def tt_chain(x: torch.Tensor, mats: Sequence[torch.Tensor], dims: Sequence[GroupDims], *,
             chunk_rows: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
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
    bias : torch.Tensor, optional
        ``(M,)``, added by the last matmul of the forward (and differentiated).
    """
    chunk = max(1, int(x.shape[0] if chunk_rows is None else chunk_rows))
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        # As autocast would run each matmul: in its dtype, the operands cast once up front.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _TTChain.apply(x.to(dtype), tuple(dims), chunk,
                                  None if bias is None else bias.to(dtype), *(m.to(dtype) for m in mats))
    return _TTChain.apply(x, tuple(dims), chunk, bias, *mats)
