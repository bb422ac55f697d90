"""The ALS sweeps of :func:`ttcompress.decompose.cp.cp_als`: CP-ALS with cached Gram matrices.

One sweep updates the four factor matrices in turn; the update of mode ``n`` solves the normal
equations ``A_n V_n = M_n`` with ``V_n`` the Hadamard product of the other factors' Gram matrices
``A_m^T A_m`` and ``M_n`` the MTTKRP (Kolda & Bader 2009 [1]_, sec. 3.4). This is TensorLy's
``parafac`` loop (which this module replaced) with the work that does not depend on the data
taken out of it:

* each Gram matrix ``A_m^T A_m`` is formed once, when ``A_m`` changes (``parafac`` forms three
  per mode update: twelve ``n R^2`` products per sweep instead of four);
* ``V_n`` is symmetric positive definite: a Cholesky solve (``R^3 / 3``) instead of an LU
  solve (``2 R^3 / 3``); at rank 2,060 the four LU solves alone were ~2.3e10 flops a sweep;
* the error of the start comes from the first MTTKRP (``||T - T^||^2 = ||T||^2 - 2 <T, T^> +
  ||T^||^2``, the inner product from ``M_0`` and ``A_0``), where ``parafac`` reconstructed the
  dense tensor once per run, and so does every later error (from the last mode's MTTKRP, as in
  ``parafac``); only the result's error, when its square is below :data:`DIRECT_ERROR_BELOW`
  (where that difference cancels), is measured on the reconstruction.

The iterates are those of ``parafac`` with ``normalize_factors=False`` (up to rounding: the
tests compare both). The MTTKRPs are :func:`~ttcompress.decompose.cp_lean.lean_mttkrp` and, for
the two spatial modes of a 4-way kernel, one shared partial contraction
(:func:`~ttcompress.decompose.cp_lean.contract_pair`).

References
----------
.. [1] T. G. Kolda, B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
       455-500, 2009.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ttcompress.decompose.cp_lean import Operands, contract_pair, lean_mttkrp, scratch

__all__ = ["DIRECT_ERROR_BELOW", "als_sweeps", "cp_reconstruct"]

#: Below this squared relative error the error is measured on the reconstruction: the formula
#: ``1 - 2 <T, T^> + ||T^||^2`` loses about ``1e-16 / e^2`` of it to cancellation (and more with
#: float32 MTTKRPs), far below the stopping test's ``tol`` above it.
DIRECT_ERROR_BELOW = 1e-4

#: ``watch(iteration, rel_error)``: called at the start (iteration 0) and after every sweep;
#: returns True to stop.
Watch = Callable[[int, float], bool]


def cp_reconstruct(factors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Rebuild the 4-D kernel from ``(out, in, kh, kw)`` CP factors (weights absorbed).

    Forms ``U_out @ khatri_rao(U_in, U_kh, U_kw).T`` -- memory ``numel(K) + C_in*kh*kw*R``.
    """
    a, b, c, d = factors
    rank = a.shape[1]
    kr = (b[:, None, None, :] * c[None, :, None, :] * d[None, None, :, :]).reshape(-1, rank)
    return (a @ kr.T).reshape(a.shape[0], b.shape[0], c.shape[0], d.shape[0])


def _mttkrp(target: torch.Tensor, factors: list[torch.Tensor], mode: int,
            shared: dict[str, torch.Tensor], operands: Operands) -> torch.Tensor:
    """``unfold(target, mode) @ khatri_rao(others)``; the spatial modes of a 4-way tensor share
    ``T x_0 A_0 x_1 A_1``, formed for mode 2 and reused for mode 3 (``shared``); ``operands``
    keeps the target's unfoldings for the whole run."""
    if target.ndim != 4 or mode in (0, 1):
        return lean_mttkrp(target, (None, factors), mode, operands)
    if mode == 2:
        shared["pair"] = contract_pair(target, factors, (0, 1), operands)  # (R, n2, n3)
        return torch.bmm(shared["pair"], factors[3].T.unsqueeze(-1)).squeeze(-1).T
    pair = shared.pop("pair")
    return torch.bmm(factors[2].T.unsqueeze(1), pair).squeeze(1).T


def _hadamard(grams: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The elementwise product of ``grams`` (at least two), written into ``out``."""
    torch.mul(grams[0], grams[1], out=out)
    for g in grams[2:]:
        out.mul_(g)
    return out


def _solve(v: torch.Tensor, m: torch.Tensor, operands: Operands, mode: int) -> torch.Tensor:
    """``A`` with ``A v = m`` for symmetric ``v`` (Cholesky; LU where ``v`` is not numerically
    positive definite).

    The Cholesky factor and both triangular solves write into column-major buffers of the run
    (``operands``; the result is mode ``mode``'s, rewritten by its next update): LAPACK works in
    place there, where ``cholesky_ex`` into a row-major buffer and ``cholesky_solve`` each copied
    an ``R x R`` matrix (34 MB at rank 2,060: 16,578 fresh pages a mode update).
    """
    rank, n = v.shape[0], m.shape[0]
    chol = scratch(operands, "chol", v.shape, v.dtype, v.device).mT  # column-major
    info = scratch(operands, "info", (), torch.int32, v.device)
    torch.linalg.cholesky_ex(v, out=(chol, info))
    if int(info) == 0:
        half = scratch(operands, "half", (n, rank), v.dtype, v.device).mT  # (R, n), column-major
        torch.linalg.solve_triangular(chol, m.T, upper=False, out=half)
        out = scratch(operands, f"factor{mode}", (n, rank), v.dtype, v.device)
        return torch.linalg.solve_triangular(chol.mT, half, upper=True, out=out.mT).T
    return torch.linalg.solve(v, m.T).T


def _squared_error(norm2: float, grams: list[torch.Tensor], mttkrp: torch.Tensor, factor: torch.Tensor,
                   operands: Operands) -> float:
    """``||T - T^||^2`` from the Gram matrices and the MTTKRP ``M_n`` of the mode whose factor is ``factor``."""
    model2 = float(_hadamard(grams, scratch(operands, "hadamard", grams[0].shape, grams[0].dtype,
                                            grams[0].device)).sum())
    inner = float(torch.mul(mttkrp, factor, out=scratch(operands, "inner", mttkrp.shape, mttkrp.dtype,
                                                          mttkrp.device)).sum())
    return norm2 - 2.0 * inner + model2


def _final_error(target: torch.Tensor, norm2: float, factors: list[torch.Tensor], sq: float) -> float:
    """Relative error of the result: from the formula's squared error ``sq``, or from the
    reconstruction where that is below :data:`DIRECT_ERROR_BELOW` (cancellation)."""
    if not math.isfinite(sq):
        return math.inf
    if sq / norm2 < DIRECT_ERROR_BELOW:
        sq = float((cp_reconstruct(factors) - target).square().sum())
    return math.sqrt(max(sq, 0.0) / norm2)


def als_sweeps(target: torch.Tensor, factors: list[torch.Tensor], n_iter_max: int,
               watch: Watch) -> tuple[list[torch.Tensor], int, float]:
    """Run up to ``n_iter_max`` ALS sweeps on ``target`` from ``factors``; ``(factors, sweeps run,
    relative error)``.

    ``factors`` (one ``(n_m, R)`` matrix per mode, on ``target``'s device and dtype) are not
    modified. ``watch(iteration, rel_error)`` is called at the start and after every sweep with
    the error from the formula (``parafac``'s, noise ~1e-8 near zero); the run stops when it
    returns True. The returned error is the result's, measured on the reconstruction where small.
    """
    factors = [f.clone() for f in factors]
    norm2 = float(target.square().sum())
    grams = [f.T @ f for f in factors]
    shared: dict[str, torch.Tensor] = {}
    operands: Operands = {}
    mttkrp = _mttkrp(target, factors, 0, shared, operands)
    sq = _squared_error(norm2, grams, mttkrp, factors[0], operands)
    start = _final_error(target, norm2, factors, sq)  # as parafac: exact where small (a warm start)
    if watch(0, start):
        return factors, 0, start
    sweep = 0
    for sweep in range(1, n_iter_max + 1):  # noqa: B007
        for mode in range(len(factors)):
            if mode or sweep > 1:
                mttkrp = _mttkrp(target, factors, mode, shared, operands)
            others = [g for m, g in enumerate(grams) if m != mode]
            v = _hadamard(others, scratch(operands, "hadamard", grams[0].shape, grams[0].dtype,
                                          grams[0].device)) if len(others) > 1 else others[0]
            factors[mode] = _solve(v, mttkrp, operands, mode)
            torch.matmul(factors[mode].T, factors[mode], out=grams[mode])  # its own buffer, rewritten in place
        sq = _squared_error(norm2, grams, mttkrp, factors[-1], operands)
        if not math.isfinite(sq):
            watch(sweep, math.inf)
            break
        if watch(sweep, math.sqrt(abs(sq) / norm2)):
            break
    return factors, sweep, _final_error(target, norm2, factors, sq)
