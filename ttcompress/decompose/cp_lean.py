"""Helpers of :func:`ttcompress.decompose.cp.cp_als`: the memory-lean MTTKRP backend and the SVD start.

The MTTKRP (matricised tensor times Khatri-Rao product) of each ALS step is computed without
forming the Khatri-Rao product (see the :mod:`ttcompress.decompose.cp` docstring for the memory
figures); the SVD start follows Kolda & Bader 2009 [1]_, sec. 3.4.

References
----------
.. [1] T. G. Kolda, B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
       455-500, 2009.
.. [2] A.-H. Phan, P. Tichavsky, A. Cichocki, "Fast Alternating LS Algorithms for High Order
       CANDECOMP/PARAFAC Tensor Factorizations", IEEE TSP 61(19), 2013 (shared partial MTTKRP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ttcompress.decompose._threads import at_most_threads

__all__ = [
    "FLOAT32_MIN_WORK",
    "balance_factors",
    "contract_pair",
    "lean_mttkrp",
    "scratch",
    "slice_svd_upper_bound",
    "svd_init_bytes",
    "svd_start",
]


#: A float64 MTTKRP matrix product of at least this many multiply-adds runs in float32 (result cast
#: back; the normal equations, errors and factors stay float64): the (8192 x 1024) @ (1024 x 1411)
#: product of a 128x1024x64x1 kernel at rank 1,411 took 1.06 s in float64 and 0.82 s in float32
#: with both casts (2 threads, load 7; docs/benchmarks.md, "data-free at real size"). Its rounding
#: (~1e-7 relative) is far below the 1e-3 improvement at which the fits stop:
#: tests/test_cp_float32.py checks the errors against float64.
FLOAT32_MIN_WORK = 1_000_000_000


#: Left operands of the MTTKRP products of one ALS run, by key (see :func:`_left`), and the
#: run's scratch buffers (keys ``("buf", ...)``, see :func:`scratch`).
Operands = dict[tuple[Any, ...], torch.Tensor]


def scratch(cache: Operands | None, tag: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """An uninitialised buffer of ``shape`` kept in ``cache`` for the next sweep of the run.

    Each sweep of a large fit makes the same few large temporaries (the MTTKRP products, 46-270 MB
    at ranks 1,411-2,060 on CREPE's big convs); fresh ones are fresh pages from the kernel every
    time (130 M minor page faults, 206 s of system time in the 22 M-parameter run,
    docs/benchmarks.md). A buffer is keyed by ``tag``, shape and dtype: callers share a tag only
    where the buffer is dead before the next use.
    """
    shape = tuple(shape)
    if cache is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = ("buf", tag, shape, dtype)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def _product(a: torch.Tensor, b: torch.Tensor, cache: Operands | None = None) -> torch.Tensor:
    """``a @ b`` (2-D), computed in float32 when ``a`` is float32 (a cached :func:`_left`) or a
    float64 product of at least :data:`FLOAT32_MIN_WORK`; the result is float32 then (exact in
    float64: the caller's next product promotes it), written into a :func:`scratch` buffer."""
    if a.dtype == torch.float64 and a.shape[0] * a.shape[1] * b.shape[1] >= FLOAT32_MIN_WORK:
        a = a.to(torch.float32)
    if a.dtype == torch.float32 and b.dtype == torch.float64:
        b = b.to(torch.float32)
    return torch.matmul(a, b, out=scratch(cache, "product", (a.shape[0], b.shape[1]), a.dtype, a.device))


def _weighted_sum(partial: torch.Tensor, factor: torch.Tensor, axis: int, cache: Operands | None) -> torch.Tensor:
    """``(partial * factor).sum(axis, keepdim=True)`` in float64 (``factor`` of ``partial``'s
    shape but 1 along the other axes); the product goes into a :func:`scratch` buffer.

    ``partial`` may be float32: it is copied into the float64 buffer first (exact), so the result
    equals the float64 product's; ``torch.mul`` of mixed dtypes would cast it into a fresh
    temporary first (270 MB a call at rank 2,060 on a 512x256x64x1 kernel).
    """
    prod = scratch(cache, "weighted", partial.shape, torch.float64, partial.device)
    prod.copy_(partial).mul_(factor)
    return prod.sum(dim=axis, keepdim=True)


def _left(cache: Operands | None, key: tuple[Any, ...], build: Callable[[], torch.Tensor], rank: int) -> torch.Tensor:
    """``build()`` (a 2-D view or copy of the tensor), already in float32 when its product with an
    ``(n, rank)`` factor reaches :data:`FLOAT32_MIN_WORK`; kept in ``cache`` for the next sweep.

    The tensor does not change during a run, so its unfoldings (and their float32 casts: 10 % of a
    sweep of a 512x256x64x1 kernel at rank 2,060) are made once, holding at most three copies of
    the tensor (keys ``("unfold", mode)``: ``mode`` first; ``("last", mode)``: ``mode`` last).
    """
    if cache is not None and key in cache:
        return cache[key]
    a = build()
    if a.dtype == torch.float64 and a.shape[0] * a.shape[1] * rank >= FLOAT32_MIN_WORK:
        a = a.to(torch.float32)
    if cache is not None:
        cache[key] = a
    return a


def lean_mttkrp(tensor: torch.Tensor, cp_tensor: Any, mode: int, cache: Operands | None = None) -> torch.Tensor:
    """``unfold(tensor, mode) @ khatri_rao(factors, skip=mode)`` without forming the product.

    Contracts the largest other mode with one matrix product (result ``numel / n * R``), then
    the remaining modes by broadcasting: same result as TensorLy's MTTKRP, far less memory.
    ``cache`` (one dict per ALS run on ``tensor``) keeps the unfoldings between calls.
    """
    weights, factors = cp_tensor
    ndim = tensor.ndim
    others = [m for m in range(ndim) if m != mode]
    big = max(others, key=lambda m: tensor.shape[m])
    rank = factors[0].shape[1]
    if tensor.shape[mode] > tensor.shape[big]:
        # the updated mode is the largest: contracting `big` first would leave numel / n_big * R numbers
        # to sum over by broadcasting (740 MB for the in-mode of a 128x1024x64x1 kernel at rank 1,411,
        # memory-bound); the Khatri-Rao product of the other factors is n_mode / n_big times smaller
        # and the contraction one compute-bound matrix product
        left = _left(cache, ("unfold", mode),
                     lambda: torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1), rank)
        kr = factors[others[0]].to(left.dtype)  # formed in the product's precision
        for step, m in enumerate(others[1:]):
            rows = kr.shape[0] * tensor.shape[m]
            out = scratch(cache, f"kr{step % 2}", (kr.shape[0], tensor.shape[m], rank), left.dtype, left.device)
            kr = torch.mul(kr[:, None, :], factors[m].to(left.dtype)[None, :, :], out=out).reshape(rows, rank)
        result = torch.matmul(left, kr, out=scratch(cache, "product", (left.shape[0], rank), left.dtype,
                                                     left.device)).to(tensor.dtype, copy=True)
        return result * weights.reshape(1, -1) if weights is not None else result
    # (..., n_big) @ (n_big, R) -> remaining dims in order + R
    left = _left(cache, ("last", big), lambda: torch.movedim(tensor, big, -1).reshape(-1, tensor.shape[big]), rank)
    partial = _product(left, factors[big], cache)
    rest = [m for m in range(ndim) if m != big]
    partial = partial.reshape(*[tensor.shape[m] for m in rest], rank)
    # multiply the small remaining factors in and sum them out
    for m in rest:
        if m == mode:
            continue
        axis = rest.index(m)
        shape = [1] * (len(rest) + 1)
        shape[axis] = tensor.shape[m]
        shape[-1] = rank
        partial = _weighted_sum(partial, factors[m].reshape(shape), axis, cache)
    result = partial.reshape(tensor.shape[mode], rank).to(tensor.dtype, copy=True)
    if weights is not None:
        result = result * weights.reshape(1, -1)
    return result


def contract_pair(
    tensor: torch.Tensor, factors: Any, pair: tuple[int, int], cache: Operands | None = None
) -> torch.Tensor:
    """``sum_{i_0, i_1} T[i_0, i_1, :, :] U_0[i_0, r] U_1[i_1, r]`` as ``(R, n2, n3)`` (4-way).

    The larger channel mode is contracted by one matrix product with a large inner dimension
    (compute-bound), the other by a broadcast sum over a ``(n, n2 n3, R)`` array. ``cache``: as
    in :func:`lean_mttkrp`.
    """
    if pair != (0, 1):
        raise ValueError(f"only the channel pair (0, 1) is shared, got {pair}")
    rank = factors[0].shape[1]
    n = tensor.shape
    if n[0] >= n[1]:
        left = _left(cache, ("unfold", 0), lambda: tensor.reshape(n[0], -1), rank).T  # shared with lean_mttkrp
        part = _product(left, factors[0], cache)  # (n1 n2 n3, R)
        part = part.reshape(n[1], n[2] * n[3], rank)
        part = _weighted_sum(part, factors[1][:, None, :], 0, cache)[0]
    else:
        left = _left(cache, ("unfold", 1), lambda: torch.movedim(tensor, 1, 0).reshape(n[1], -1), rank).T
        part = _product(left, factors[1], cache)  # (n0 n2 n3, R)
        part = part.reshape(n[0], n[2] * n[3], rank)
        part = _weighted_sum(part, factors[0][:, None, :], 0, cache)[0]
    return part.T.reshape(rank, n[2], n[3]).contiguous()


def svd_start(kernel: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """SVD start: leading left singular vectors of each unfolding (Kolda & Bader 2009, sec. 3.4).

    The vectors come from the eigendecomposition of the smaller Gram matrix of each unfolding
    ``X`` (``n x m``), never from an SVD of ``X`` itself: ``X X^T`` when ``n <= m``; otherwise
    (a tall unfolding, e.g. the output mode of a 2048x512x1x1 kernel) ``X^T X`` and
    ``u_k = X v_k / s_k``, which is the same singular subspace at ``(m/n)^3`` of the cost (measured
    on the loaded machine: the 2048x2048 eigendecomposition took most of the 9-18 s that a 1x1
    resnet50 conv spent in CP-ALS). Mode 0 is scaled by the singular values so that the start is
    on the kernel's scale; columns beyond the unfolding's rank (``min(n, m)``) are seeded Gaussian
    noise of matching scale.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    for mode, size in enumerate(kernel.shape):
        unfolded = torch.movedim(kernel, mode, 0).reshape(size, -1)
        if unfolded.shape[1] < size:
            evals, evecs = _tall_leading(unfolded, rank)
        else:
            gram = unfolded @ unfolded.T
            with at_most_threads(1):  # eigensolvers on busy cores: see at_most_threads
                evals, evecs = torch.linalg.eigh(gram)  # ascending
            evals, evecs = evals.flip(0), evecs.flip(1)
        keep = min(rank, evecs.shape[1])
        u = evecs[:, :keep]
        # deterministic signs: largest entry of each vector positive
        idx = u.abs().argmax(dim=0)
        u = u * torch.sign(u[idx, torch.arange(keep, device=u.device)]).reshape(1, -1)
        if mode == 0:
            u = u * evals[:keep].clamp_min(0).sqrt().reshape(1, -1)
        if keep < rank:
            noise = torch.randn(size, rank - keep, generator=gen, dtype=torch.float64)
            noise = (
                noise.to(kernel.device) * float(u.norm(dim=0).mean()) / math.sqrt(size)
            )
            u = torch.cat([u, noise], dim=1)
        factors.append(u)
    return factors


def _tall_leading(unfolded: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (descending) and left singular vectors of a tall ``n x m`` matrix
    from its ``m x m`` Gram matrix; directions with a numerically zero singular value are left out."""
    gram = unfolded.T @ unfolded
    with at_most_threads(1):
        evals, v = torch.linalg.eigh(gram)
    evals, v = evals.flip(0), v.flip(1)
    tiny = float(evals[0]) * unfolded.shape[1] * torch.finfo(unfolded.dtype).eps if evals.numel() else 0.0
    keep = min(rank, int((evals > tiny).sum()))
    evals = evals[:keep]
    return evals, unfolded @ v[:, :keep] / evals.sqrt().reshape(1, -1)


def slice_svd_upper_bound(kernel: torch.Tensor, rank: int) -> float:
    """Relative error of an explicit rank-``rank`` CP model built from per-tap SVDs.

    Writing ``K = sum_{y,x} K[:, :, y, x] (x) e_y (x) e_x`` and keeping the ``rank`` largest
    singular triplets over all ``kh*kw`` slices gives a valid CP model, so the best rank-R error
    is at most this value. A run that ends far above it has stalled.
    """
    slices = kernel.permute(2, 3, 0, 1).reshape(-1, kernel.shape[0], kernel.shape[1])
    if slices.shape[1] > slices.shape[2]:
        slices = slices.transpose(1, 2)
    # squared singular values = eigenvalues of the small Gram matrices; float32 is plenty for a
    # warning threshold and several times faster than float64 here
    gram = (slices @ slices.transpose(1, 2)).to(torch.float32)
    with at_most_threads(1):
        sq = torch.linalg.eigvalsh(gram).clamp_min(0).reshape(-1).to(torch.float64)
    total = float(sq.sum())
    if total == 0.0:
        return 0.0
    tail = float(
        torch.sort(sq).values[: max(sq.numel() - rank, 0)].sum()
    )  # discarded part
    return math.sqrt(min(tail / total, 1.0))


def svd_init_bytes(shape: tuple[int, ...]) -> int:
    """Float64 bytes for one unfolding copy and the Gram matrices used by the SVD start."""
    return 8 * (2 * math.prod(shape) + 3 * max(shape) ** 2)


def balance_factors(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each rank-1 term's norm evenly over its factor columns (same product)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
    total = norms.prod(dim=0)
    target = total ** (1.0 / len(factors))
    out = []
    for f, n in zip(factors, norms):
        scale = torch.where(
            n > 0, target / torch.where(n > 0, n, torch.ones_like(n)), 0.0
        )
        out.append(f * scale)
    return out
