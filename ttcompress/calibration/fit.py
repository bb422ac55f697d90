"""Fit a compressed layer to the dense layer's *outputs* on calibration data, not its weight.

For a layer with dense weight ``W`` (``out x K``; a conv kernel reshaped to ``out x (C_in/groups
kh kw)``, one block per group), dense-model inputs ``X`` and compressed-model inputs ``X~`` (rows),
a replacement ``W^`` is scored by the output error::

    E(W^) = ||X W^T - X~ W^^T||_F^2 = tr(W G W^T) - 2 tr(W C W^^T) + tr(W^ G~ W^^T)

with ``G = X^T X``, ``C = X^T X~``, ``G~ = X~^T X~`` (:class:`~ttcompress.calibration.stats.LayerStats`).
``E`` is a convex quadratic in ``W^``; its unconstrained minimiser solves ``W^ G~ = W C``.
Writing ``G~ = L L^T``, ``E(W^) = ||(W^ - T) L||_F^2 + const`` with ``T L = W C L^{-T}``, so the
best rank-``r`` ``W^`` is the truncated SVD of the *whitened* target ``W C L^{-T}``, un-whitened by
``L^{-1}`` (:func:`whitened_lowrank`; Eckart-Young in the ``G~`` metric). A TT-matrix is linear
in each core, so one core with the others fixed is a linear least-squares problem
(:func:`refine_tt_cores`). Any other factorisation gets a bounded number of optimiser steps on
its own parameters (:func:`refine_by_gradient`). With a bias, the joint optimum of weight and
bias is the fit on mean-centred statistics followed by :func:`corrected_bias`.

Damping
-------
``G~`` is rank-deficient when there are fewer rows than features or inputs span a subspace. We
add ``lambda I`` to ``G``, ``G~`` *and* ``C`` (``lambda = damping * tr(G~) / K``): this is the
exact objective for the calibration rows plus ``K`` extra rows ``sqrt(lambda) I`` in both
models, i.e. ``E(W^) + lambda ||W - W^||_F^2``. Directions the data never excite then keep the
dense weight instead of being set to zero, and every solve stays well posed.

References
----------
.. [1] Z. Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
       Language Models", 2023 (scaling the weight by input statistics before the SVD).
.. [2] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", 2024 (whitening by the Cholesky
       factor of ``X^T X``: truncation error equals output error).
.. [3] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training
       Quantization for Generative Pre-trained Transformers", ICLR 2023 (layer-wise output
       objective, sequential calibration, relative Hessian damping).
.. [4] S. Holtz, T. Rohwedder, R. Schneider, "The alternating linear scheme for tensor
       optimization in the tensor train format", SIAM J. Sci. Comput. 34(2), 2012 (ALS for TT).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ttcompress.calibration._linalg import eigh as _eigh
from ttcompress.calibration._linalg import svd as _svd
from ttcompress.calibration.reconstruct import dense_weight, effective_bias, set_effective_bias
from ttcompress.calibration.stats import GRAM_FLOAT32_FEATURES, LayerStats
from ttcompress.decompose._threads import few_threads
from ttcompress.decompose.svd import randomized_svd, use_randomized_svd
from ttcompress.decompose.tt import tt_to_matrix

__all__ = [
    "DAMPING",
    "FitResult",
    "corrected_bias",
    "fit_layer",
    "lowrank_output_errors",
    "objective",
    "output_error",
    "refine_by_gradient",
    "refine_tt_cores",
    "tt_metric_bytes",
    "whitened_lowrank",
]

#: Default relative damping ``lambda / (tr(G~) / K)``.
DAMPING = 1e-4
# Eigenvalues of G~ below this fraction of the largest are treated as zero (pseudo-inverse).
_EIG_RTOL = 1e-12
# Rows of a weight taken at a time where a float64 copy of all of it is not needed: at most 2048, and
# at most _BLOCK_VALUES values, so that the float64 temporaries of a block stay ~16 MB each whatever
# the fan-in (2048 rows of an 11,008-wide weight were 180 MB each, six of them alive at once).
_ROW_BLOCK = 2048
_BLOCK_VALUES = 1 << 21


def _row_block(width: int) -> int:
    """Rows of a ``width``-wide weight per block (see ``_BLOCK_VALUES``)."""
    return max(1, min(_ROW_BLOCK, _BLOCK_VALUES // max(1, int(width))))
# Ridge on the ALS normal equations, relative to their mean diagonal (only for solvability).
_SOLVE_RIDGE = 1e-12


# --------------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------------
def _check(weight: torch.Tensor, stats: LayerStats, name: str = "weight", *,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if not isinstance(stats, LayerStats):
        raise TypeError(f"stats must be a LayerStats, got {type(stats).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (out, K)")
    if weight.shape[1] != stats.features or weight.shape[0] % stats.groups:
        raise ValueError(f"{name} of shape {tuple(weight.shape)} does not fit statistics with "
                         f"{stats.groups} group(s) of {stats.features} features")
    return weight.detach().to(device="cpu", dtype=dtype).reshape(stats.groups, -1, stats.features)


def _damped(stats: LayerStats, damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, G~, C)`` with ``lambda I`` added to each (see the module docstring)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a non-negative number, got {damping!r}")
    k = stats.features
    lam = damping * torch.diagonal(stats.gram, dim1=1, dim2=2).sum(-1) / k  # (groups,)
    eye = torch.eye(k, dtype=torch.float64)[None] * lam[:, None, None]
    return stats.dense_gram + eye, stats.gram + eye, stats.cross + eye


def _quadratic(w: torch.Tensor, w_hat: torch.Tensor, g: torch.Tensor, gt: torch.Tensor,
               c: torch.Tensor) -> torch.Tensor:
    """``sum_groups tr(W G W^T) - 2 tr(W C W^^T) + tr(W^ G~ W^^T)`` for ``(groups, out/g, K)`` blocks."""
    return (((w @ g) * w).sum() - 2 * ((w @ c) * w_hat).sum() + ((w_hat @ gt) * w_hat).sum())


def _lambdas(stats: LayerStats, damping: float) -> torch.Tensor:
    """``lambda`` per group: ``damping * tr(G~) / K`` (the trace is exact for sketches too)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a non-negative number, got {damping!r}")
    trace = stats.trace if stats.sketched else torch.diagonal(stats.gram, dim1=1, dim2=2).sum(-1)
    return damping * trace.to(torch.float64) / stats.features  # type: ignore[union-attr]


#: Whether the fits on sketched statistics add the sketch's lost mass (:meth:`LayerStats.residual`)
#: to their damping, as the reported errors do (docs/theory.md, "What the sketch lost"; measured
#: better than fitting with lambda alone on every test case, tests/test_sketch_residual.py).
FIT_RESIDUAL = True


def _shifts(stats: LayerStats, damping: float, *, residual: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, s_x, s~)`` per group: the multiples of ``I`` added to ``G``, ``C`` and ``G~``.

    ``lambda`` (:func:`_lambdas`) for each, plus the isotropic model of a sketch's lost rows,
    ``(rho, rho_x, rho~)`` (:meth:`LayerStats.residual`), when ``residual``. The objective then
    holds ``s ||W||^2 - 2 s_x <W, W^> + s~ ||W^||^2`` besides the sketch rows' error; with no lost
    mass that is ``lambda ||W - W^||^2``.
    """
    lam = _lambdas(stats, damping)
    if not residual or not stats.sketched:
        return lam, lam, lam
    rho_d, rho_x, rho_c = stats.residual()
    return lam + rho_d, lam + rho_x, lam + rho_c


def _shift_form(shifts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s~, a, c)`` with ``s ||W||^2 - 2 s_x <W, W^> + s~ ||W^||^2 = s~ ||W^ - a W||^2 + c ||W||^2``
    (``a = s_x / s~``, ``c = s - s_x^2 / s~ >= 0``; ``a = 0``, ``c = s`` where ``s~ = 0``)."""
    s_d, s_x, s_c = shifts
    pos = s_c > 0
    a = torch.where(pos, s_x / s_c.clamp_min(1e-300), torch.zeros_like(s_c))
    c = torch.where(pos, (s_d - s_x * a).clamp_min(0), s_d)
    return s_c, a, c


def _objective_fn(w: torch.Tensor, stats: LayerStats, damping: float, *, residual: bool = True
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """``(f, ref)``: ``f(W^)`` the damped objective for ``(groups, out/g, K)`` blocks (differentiable
    in ``W^``), ``ref = tr(W G W^T)``.

    Exact statistics: the Gram form :func:`_quadratic`. Sketched: ``sum_groups ||R W^T - R~
    W^^T||_F^2 + s ||W||^2 - 2 s_x <W, W^> + s~ ||W^||^2`` (:func:`_shifts`: ``lambda ||W -
    W^||_F^2`` plus, when ``residual``, the sketch's lost rows), the same quadratic with the rows'
    Grams, ``O(l K out)``; ``ref`` then includes ``s ||W||^2``.
    """
    if not stats.sketched:
        g, gt, c = _damped(stats, damping)
        return (lambda w_hat: _quadratic(w, w_hat, g, gt, c)), float(((w @ g) * w).sum())
    shifts = _shifts(stats, damping, residual=residual)
    s_c, a, c = _shift_form(shifts)
    factors = [stats.factors(i) for i in range(stats.groups)]
    targets = [torch.cat([rd @ blk.T for blk in _blocks64(w[i])], dim=1) for i, (rd, _rc) in enumerate(factors)]
    norms = torch.stack([sum(((blk * blk).sum() for blk in _blocks64(w[i])), torch.zeros((), dtype=torch.float64))
                         for i in range(w.shape[0])])
    ref = float(sum((t * t).sum() for t in targets)) + float((shifts[0] * norms).sum())
    const = float((c * norms).sum())

    def f(w_hat: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64) + const
        for i, (_rd, rc) in enumerate(factors):  # by blocks of rows: no out x K temporary
            total = total + ((targets[i] - torch.cat([rc @ blk.T for blk in _blocks64(w_hat[i])], dim=1)) ** 2).sum()
            for blk_hat, blk in zip(_blocks64(w_hat[i]), _blocks64(w[i])):
                total = total + s_c[i] * ((blk_hat - a[i] * blk) ** 2).sum()
        return total

    return f, ref


def _lean(stats: object, weight: object) -> bool:
    """True when ``weight`` is taken in its own float dtype by float64 row blocks (sketched statistics)."""
    return (isinstance(stats, LayerStats) and stats.sketched and isinstance(weight, torch.Tensor)
            and weight.is_floating_point())


def _checked_pair(weight: torch.Tensor, new_weight: torch.Tensor, stats: LayerStats
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_check` of both weights: float64, or (sketched statistics) each in its own float dtype."""
    dtype = lambda t: t.dtype if _lean(stats, t) else torch.float64  # noqa: E731
    return _check(weight, stats, dtype=dtype(weight)), _check(new_weight, stats, "new_weight", dtype=dtype(new_weight))


def _blocks64(w: torch.Tensor) -> Iterator[torch.Tensor]:
    """The rows of ``w`` (``(out, K)``, any float dtype) by blocks of :func:`_row_block` rows, in float64."""
    for blk in w.split(_row_block(w.shape[-1])):
        yield blk.to(torch.float64)


def _mean_products(w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``W mu`` per group, flattened (``w`` ``(groups, out/g, K)``, ``mean`` ``(groups, K)``), in float64;
    a weight in another dtype is taken by float64 row blocks."""
    if w.dtype == torch.float64:
        return (w @ mean[:, :, None]).reshape(-1)
    return torch.cat([torch.cat([blk @ mean[i] for blk in _blocks64(w[i])]) for i in range(w.shape[0])])


def objective(weight: torch.Tensor, new_weight: torch.Tensor, stats: LayerStats, *,
              damping: float = 0.0) -> float:
    """The output error ``||X W^T - X~ W^^T||_F^2`` (plus ``lambda ||W - W^||^2`` when damped).

    Parameters
    ----------
    weight, new_weight : torch.Tensor
        ``(out, K)`` dense and replacement weights.
    stats : LayerStats
        Input statistics of the layer.
    damping : float, default 0
        Relative damping (see the module docstring); 0 gives the plain output error.
    """
    w, w_hat = _check(weight, stats), _check(new_weight, stats, "new_weight")
    f, _ref = _objective_fn(w, stats, damping)
    return float(f(w_hat))


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, stats: LayerStats, *,
                 bias: torch.Tensor | None = None, new_bias: torch.Tensor | None = None) -> float:
    """Relative output error ``||Y - Y^||_F / ||Y||_F`` on the calibration rows, from the statistics.

    ``Y = X W^T + 1 b^T`` is the dense layer's output and ``Y^ = X~ W^^T + 1 b^^T`` the
    replacement's on the compressed model's inputs; a missing bias counts as zero. Computed from
    the Gram matrices as a difference of squared norms, it cannot resolve errors below about
    ``sqrt(float64 eps) ~ 1e-8``. On sketched statistics the rows the sketch lost count as an
    isotropic residual (:meth:`LayerStats.residual`): ``rho ||W||^2 - 2 rho_x <W, W^> + rho~
    ||W^||^2`` in the error and ``rho ||W||^2`` in the reference.
    """
    # sketched statistics take the weights by float64 row blocks (no float64 copy of an out x K weight)
    w, w_hat = _checked_pair(weight, new_weight, stats)
    n = float(stats.count)
    out = w.shape[0] * w.shape[1]
    zero = torch.zeros(out, dtype=torch.float64)
    b = zero if bias is None else bias.detach().to("cpu", torch.float64).reshape(-1)
    b_hat = zero if new_bias is None else new_bias.detach().to("cpu", torch.float64).reshape(-1)
    if b.numel() != out or b_hat.numel() != out:
        raise ValueError(f"bias and new_bias must have {out} entries")
    f, ref_w = _objective_fn(w, stats, 0.0)
    err = f(w_hat)
    wmu = _mean_products(w, stats.dense_mean)
    wmu_hat = _mean_products(w_hat, stats.mean)
    db = b - b_hat
    err = err + 2 * n * ((wmu - wmu_hat) @ db) + n * (db @ db)
    ref = ref_w + 2 * n * (wmu @ b) + n * (b @ b)
    err_f, ref_f = max(float(err), 0.0), float(ref)
    if ref_f <= 0.0:
        return 0.0 if err_f == 0.0 else math.inf
    return math.sqrt(err_f / ref_f)


def lowrank_output_errors(weight: torch.Tensor, candidates: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                          stats: LayerStats, *, bias: torch.Tensor | None = None) -> list[float]:
    """:func:`output_error` of several low-rank replacements ``W^ = A B`` (with biases) at once.

    ``candidates`` holds ``(A, B, new_bias)`` with ``A`` ``(out, r)`` and ``B`` ``(r, K)``; nothing
    of size ``out x K`` is formed but blocks of ``W``'s rows. On exact statistics the products with
    the ``K x K`` Grams are shared and taken through the factors: ``tr(W C W^^T) = sum((W (C B^T))
    * A)``, ``tr(W^ G~ W^^T) = sum((B G~ B^T) * (A^T A))``, and one ``out x K x K`` product,
    ``tr(W G W^T)``, for all candidates instead of three each (float32 products summed in float64
    for a float32 layer with ``K >= GRAM_FLOAT32_FEATURES``, as its Gram). On sketched rows ``R``,
    ``R~``: ``||R W^T - (R~ B^T) A^T||_F^2`` plus the sketch's lost rows (:func:`output_error`).
    """
    w = _check(weight, stats, dtype=weight.dtype if weight.is_floating_point() else torch.float64)[0]
    if stats.groups != 1:
        raise ValueError("lowrank_output_errors needs statistics with a single group")
    n, out = float(stats.count), w.shape[0]
    vec = lambda t: (torch.zeros(out, dtype=torch.float64) if t is None  # noqa: E731
                     else t.detach().to("cpu", torch.float64).reshape(-1))
    b0 = vec(bias)
    facs = [(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)) for a, b, _nb in candidates]
    wmu = torch.cat([blk.to(torch.float64) @ stats.dense_mean[0] for blk in w.split(_row_block(w.shape[-1]))])
    if stats.sketched:
        rd, rc = stats.factors(0)
        target = torch.cat([rd @ blk.to(torch.float64).T for blk in w.split(_row_block(w.shape[-1]))], dim=1)  # R W^T
        s_c, scale, c = (float(t[0]) for t in _shift_form(_shifts(stats, 0.0)))
        norm = sum(float(blk.to(torch.float64).square().sum()) for blk in w.split(_row_block(w.shape[-1])))
        ref = float(target.square().sum()) + float(_shifts(stats, 0.0)[0][0]) * norm
        errw = []
        for a, b in facs:  # + s~ ||A B - a W||^2 + c ||W||^2, through the factors
            inner = sum(float(((blk.to(torch.float64) @ b.T) * a[i:i + _row_block(w.shape[-1])]).sum())
                        for i, blk in zip(range(0, out, _row_block(w.shape[-1])), w.split(_row_block(w.shape[-1])))) if s_c else 0.0
            lost = s_c * (float(((a.T @ a) * (b @ b.T)).sum()) - 2 * scale * inner + scale ** 2 * norm) + c * norm
            errw.append(float((target - (rc @ b.T) @ a.T).square().sum()) + lost)
    else:
        g, c, gt = stats.dense_gram[0], stats.cross[0], stats.gram[0]  # type: ignore[index]
        cbt = [c @ b.T for _a, b in facs]  # C B^T, K x r
        # tr(W G W^T) is the one out x K x K product: float32 for a large float32 layer (as its Gram)
        big = stats.features >= GRAM_FLOAT32_FEATURES and w.dtype != torch.float64
        gram = g.to(torch.float32 if big else torch.float64)
        ref = 0.0
        cross = [0.0] * len(facs)
        for rows in range(0, out, _row_block(w.shape[-1])):
            block = w[rows:rows + _row_block(w.shape[-1])].to(gram.dtype)
            ref += float(((block @ gram) * block).sum(dtype=torch.float64))
            block = block.to(torch.float64)
            for i, (a, _b) in enumerate(facs):
                cross[i] += float(((block @ cbt[i]) * a[rows:rows + _row_block(w.shape[-1])]).sum())
            del block
        errw = [ref - 2 * cr + float(((b @ gt @ b.T) * (a.T @ a)).sum()) for (a, b), cr in zip(facs, cross)]
    ref_b = ref + 2 * n * float(wmu @ b0) + n * float(b0 @ b0)
    errors = []
    for (a, b), ew, (_a, _b, nb) in zip(facs, errw, candidates):
        db = b0 - vec(nb)
        err = ew + 2 * n * float((wmu - a @ (b @ stats.mean[0])) @ db) + n * float(db @ db)
        err_f = max(err, 0.0)
        errors.append(0.0 if ref_b <= 0.0 and err_f == 0.0 else math.inf if ref_b <= 0.0 else math.sqrt(err_f / ref_b))
    return errors


def corrected_bias(weight: torch.Tensor, bias: torch.Tensor | None, new_weight: torch.Tensor,
                   stats: LayerStats) -> torch.Tensor:
    """The bias that makes the replacement's mean output equal the dense layer's.

    ``b^ = b + W mu - W^ mu~`` with ``mu``, ``mu~`` the mean input rows of the dense and the
    compressed model (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
    Correction", ICCV 2019, use the same correction with expected inputs). Returned in
    ``new_weight``'s dtype; a missing ``bias`` counts as zero.
    """
    w, w_hat = _checked_pair(weight, new_weight, stats)
    if w.dtype == w_hat.dtype == torch.float64:
        shift = (w @ stats.dense_mean[:, :, None] - w_hat @ stats.mean[:, :, None]).reshape(-1)
    else:  # by float64 row blocks (sketched statistics: no float64 copy of the weights)
        shift = _mean_products(w, stats.dense_mean) - _mean_products(w_hat, stats.mean)
    if bias is not None:
        shift = shift + bias.detach().to("cpu", torch.float64).reshape(-1)
    return shift.to(device=new_weight.device, dtype=new_weight.dtype)


# --------------------------------------------------------------------------------------------------
# closed form: whitened truncated SVD
# --------------------------------------------------------------------------------------------------
def whitened_lowrank(weight: torch.Tensor, stats: LayerStats, rank: int, *,
                     damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` ``W^ = A B`` minimising the (damped) output error, in closed form.

    With ``G~ = Q diag(e) Q^T`` (eigenvalues below ``1e-12 max(e)`` treated as zero: the
    pseudo-inverse square root, so ``damping=0`` is exact for rank-deficient inputs), the
    whitened target ``M = W C Q diag(e)^{-1/2}`` is truncated by SVD, ``M_r = U S V^T``, and
    ``A = U S^{1/2}``, ``B = S^{1/2} V^T diag(e)^{-1/2} Q^T`` (SVD-LLM [2]_, ASVD [1]_; GPTQ's
    damping [3]_). This is the exact optimum for a two-factor (``svd``) layer.

    Parameters
    ----------
    weight : torch.Tensor
        ``(out, K)`` dense weight (one group).
    stats : LayerStats
        The layer's statistics (``groups == 1``).
    rank : int
        Target rank (capped at ``min(out, K)``).
    damping : float, default DAMPING
        Relative damping.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``A`` of shape ``(out, r)`` and ``B`` of shape ``(r, K)`` in ``weight``'s dtype.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    randomized = use_randomized_svd(weight.shape[0], stats.features, rank)
    large = not stats.sketched and damping > 0 and randomized
    w = _check(weight, stats, dtype=torch.float32 if large or (stats.sketched and randomized) else torch.float64)
    if stats.groups != 1:
        raise ValueError(f"whitened_lowrank needs a single group, got stats with {stats.groups}")
    if stats.sketched:
        a, b = _whitened_lowrank_rows(w[0], stats, rank, damping)
        return a.to(weight.dtype), b.to(weight.dtype)
    if large:
        found = _whitened_lowrank_cholesky(w[0], stats, rank, damping)
        if found is not None:
            return found[0].to(weight.dtype), found[1].to(weight.dtype)
        w = w.to(torch.float64)
    _, gt, c = (t[0] for t in _damped(stats, damping))
    evals, q = _eigh(gt)
    keep = evals > _EIG_RTOL * max(float(evals.max()), 0.0)
    inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    m = (w[0] @ c @ q) * inv_sqrt
    u, s, vh = _svd(m, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    a = u[:, :r] * root
    b = (root[:, None] * vh[:r] * inv_sqrt) @ q.T
    return a.to(weight.dtype), b.to(weight.dtype)


def _lowrank(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of ``m``: randomized (seeded, float32 products) where
    :func:`~ttcompress.decompose.svd.use_randomized_svd` says it is cheaper, else the full SVD."""
    if use_randomized_svd(m.shape[0], m.shape[1], rank):
        return randomized_svd(m, rank)
    u, s, vh = _svd(m, full_matrices=False)
    r = min(rank, s.numel())
    return u[:, :r], s[:r], vh[:r]


def _damped_block(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """``gram + lam I`` (a new float64 matrix)."""
    out = gram.to(torch.float64, copy=True)
    out.diagonal().add_(lam)
    return out


def _whitened_lowrank_cholesky(w: torch.Tensor, stats: LayerStats, rank: int, damping: float
                               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`whitened_lowrank` on exact statistics of a large layer: Cholesky whitening and a
    randomized truncated SVD (None when ``G~ + lambda I`` is not numerically positive definite).

    Any square root of the metric whitens (SVD-LLM [2]_ uses the Cholesky factor): with ``G~ +
    lambda I = L L^T``, the target is ``M = W (C + lambda I) L^{-T}`` (``W L`` when ``C = G~``, the
    layers before being still dense), ``M_r = U S V^T`` its leading triplets
    (:func:`~ttcompress.decompose.svd.randomized_svd`), ``A = U S^{1/2}``, ``B = S^{1/2} V^T L^{-1}``.
    ``O(K^3 / 3)`` for the factor and ``O(out K (K + r))`` for the products, instead of a ``K x K``
    eigendecomposition and a full SVD of the ``out x K`` target.
    """
    lam = float(_lambdas(stats, damping)[0])
    gt = _damped_block(stats.gram[0], lam)  # type: ignore[index]
    chol, info = torch.linalg.cholesky_ex(gt)
    del gt
    if int(info) != 0:
        return None
    same = stats.cross is stats.gram or torch.equal(stats.cross[0], stats.gram[0])  # type: ignore[index]
    w32 = w.to(torch.float32)
    if same:  # (C + lambda I) L^{-T} = L
        m = w32 @ chol.to(torch.float32)
    else:
        c = _damped_block(stats.cross[0], lam).to(torch.float32)  # type: ignore[index]
        m = torch.empty_like(w32)
        for rows in range(0, m.shape[0], _row_block(w.shape[-1])):  # float64 solves by blocks of rows
            wc = (w32[rows:rows + _row_block(w.shape[-1])] @ c).to(torch.float64)
            m[rows:rows + _row_block(w.shape[-1])] = torch.linalg.solve_triangular(chol, wc.T, upper=False).T
        del c, wc
    del w32
    u, s, vh = _lowrank(m, rank)
    del m
    root = s.sqrt()
    b = torch.linalg.solve_triangular(chol.T, (vh.T * root), upper=True).T  # S^{1/2} V^T L^{-1}
    return u * root, b


def _whitened_lowrank_rows(w: torch.Tensor, stats: LayerStats, rank: int, damping: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`whitened_lowrank` on sketched statistics, without any ``K x K`` matrix.

    With the thin SVD ``R~ = U S V^T`` (from the small Gram ``R~ R~^T``), the damped metric is
    ``G~ + lambda I = V (S^2 + lambda) V^T + lambda (I - V V^T)``, so ``P = (G~ + lambda I)^{-1/2}
    = V ((S^2 + lambda)^{-1/2} - lambda^{-1/2}) V^T + lambda^{-1/2} I`` (only the ``V`` part when
    ``lambda = 0``: the pseudo-inverse). The target ``W (C + s_x I) = (W R^T) R~ + s_x W`` is
    whitened by ``P``, truncated by SVD, and the right factor un-whitened by ``P`` again: each
    product ``O(out K l)``. Here ``lambda`` is ``s~`` and ``s_x`` the cross shift of
    :func:`_shifts` (both ``lambda`` when nothing of the sketch is lost).
    """
    _s, s_x, lam = (float(t[0]) for t in _shifts(stats, damping, residual=FIT_RESIDUAL))
    rd, rc = stats.factors(0)
    evals, u = _eigh(rc @ rc.T)
    keep = evals > _EIG_RTOL * max(float(evals.max()), 0.0)
    evals, u = evals[keep], u[:, keep]
    v = (u * evals.rsqrt()).T @ rc  # (p, K): orthonormal rows spanning R~'s row space
    base = lam ** -0.5 if lam > 0 else 0.0
    inner = (evals + lam).rsqrt() - base

    def whiten(x: torch.Tensor) -> torch.Tensor:
        return base * x + ((x @ v.T) * inner) @ v

    # the whitened target by blocks of rows (float32 when the SVD is randomized: its products are)
    m = torch.empty(w.shape, dtype=w.dtype)
    for rows in range(0, w.shape[0], _row_block(w.shape[-1])):
        block = w[rows:rows + _row_block(w.shape[-1])].to(torch.float64)
        m[rows:rows + _row_block(w.shape[-1])] = whiten((block @ rd.T) @ rc + s_x * block)
    del block
    u_m, s, vh = _lowrank(m, rank)
    del m
    root = s.sqrt()
    return u_m * root, whiten(root[:, None] * vh)


# --------------------------------------------------------------------------------------------------
# ALS for TT-matrix cores
# --------------------------------------------------------------------------------------------------
def _merge_left(cores: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Cores ``G_1 .. G_{k-1}`` contracted to ``(M_<, N_<, r_{k-1})``."""
    result = torch.ones(1, 1, 1, dtype=dtype)
    for core in cores:
        big_m, big_n, _ = result.shape
        _, m, n, r_right = core.shape
        result = torch.einsum("MNa,amnb->MmNnb", result, core).reshape(big_m * m, big_n * n, r_right)
    return result


def _merge_right(cores: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Cores ``G_{k+1} .. G_d`` contracted to ``(r_k, M_>, N_>)``."""
    result = torch.ones(1, 1, 1, dtype=dtype)
    for core in reversed(cores):
        _, big_m, big_n = result.shape
        r_left, m, n, _ = core.shape
        result = torch.einsum("amnb,bMN->amMnN", core, result).reshape(r_left, m * big_m, n * big_n)
    return result


@dataclass(frozen=True, eq=False)
class _RowsMetric:
    """The TT solve's metric ``R^T R + shift I`` (``K x K``) kept as its ``l`` rows ``R`` (``(l, K)``,
    padded with zero columns to the product of the input modes) and the scalar ``shift``: sketched
    statistics' ``G~ + s~ I`` without any ``K x K`` array (:func:`_normal_equations`)."""

    rows: torch.Tensor
    shift: float

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype


#: Values of one block of the sketch-row contractions in :func:`_rows_normal_matrix` (16 MB of float32).
_ROWS_BLOCK_VALUES = 1 << 22


def _rows_normal_matrix(metric: _RowsMetric, left: torch.Tensor, right: torch.Tensor, n: int) -> torch.Tensor:
    """``H = sum_{i<, i>} Phi^T (R^T R + shift I) Phi`` (see :func:`_normal_equations`) through the rows ``R``.

    With ``L`` the left cores merged (``(M<, N<, r_{k-1})``) and ``Rt`` the right ones (``(r_k, M>,
    N>)``), the low-rank part is contracted on the larger side first, through the rows: on the right,
    ``Q[s, o, (x, p, b)] = sum_z R[s, x, p, z] Rt[b, o, z]`` and ``T = sum_{s, o} Q^T Q`` (``(N< n r_k)^2``),
    then ``H = sum_{x, y} T[x p b, y q d] (sum_i L[i, x, a] L[i, y, c])``; mirrored on the left. The
    shift adds ``shift delta_pq (L^T L)[a, c] (Rt Rt^T)[b, d]``. Blocks of sketch rows bound the
    temporaries (:data:`_ROWS_BLOCK_VALUES`): nothing of size ``K x K`` is formed.
    """
    rows = metric.rows
    ell = rows.shape[0]
    m_l, n_l, r_l = left.shape
    r_r, m_r, n_r = right.shape
    r6 = rows.reshape(ell, n_l, n, n_r)
    if n_l * r_r <= r_l * n_r:  # the right side is the larger one: reduce it first
        width = n_l * n * r_r
        rt = right.permute(2, 0, 1).reshape(n_r, r_r * m_r)  # (z, (b, o))
        t = rows.new_zeros(width, width)
        step = max(1, _ROWS_BLOCK_VALUES // max(1, width * m_r))
        for s0 in range(0, ell, step):
            q = (r6[s0:s0 + step].reshape(-1, n_r) @ rt).reshape(-1, n_l * n, r_r, m_r)
            q = q.permute(0, 3, 1, 2).reshape(-1, width)  # ((s, o), (x, p, b))
            t.addmm_(q.T, q)
        pl = torch.einsum("ixa,iyc->xyac", left, left).reshape(n_l * n_l, r_l * r_l)
        t6 = t.reshape(n_l, n, r_r, n_l, n, r_r).permute(1, 2, 4, 5, 0, 3).reshape(-1, n_l * n_l)
        h = (t6 @ pl).reshape(n, r_r, n, r_r, r_l, r_l).permute(4, 0, 1, 5, 2, 3)  # (a, p, b, c, q, d)
    else:  # the left side is the larger one
        width = r_l * n * n_r
        lt = left.permute(1, 0, 2).reshape(n_l, m_l * r_l)  # (x, (i, a))
        t = rows.new_zeros(width, width)
        step = max(1, _ROWS_BLOCK_VALUES // max(1, width * m_l))
        for s0 in range(0, ell, step):
            blk = r6[s0:s0 + step]
            q = (lt.T @ blk.reshape(-1, n_l, n * n_r))  # (s, (i, a), (p, z))
            q = q.reshape(-1, width)  # ((s, i), (a, p, z))
            t.addmm_(q.T, q)
        pr = torch.einsum("boz,dow->zwbd", right, right).reshape(n_r * n_r, r_r * r_r)
        t6 = t.reshape(r_l, n, n_r, r_l, n, n_r).permute(0, 1, 3, 4, 2, 5).reshape(-1, n_r * n_r)
        h = (t6 @ pr).reshape(r_l, n, r_l, n, r_r, r_r).permute(0, 1, 4, 2, 3, 5)  # (a, p, b, c, q, d)
    p = r_l * n * r_r
    h = h.reshape(p, p).to(torch.float64)
    if metric.shift:
        gl = torch.einsum("ixa,ixc->ac", left, left).to(torch.float64)
        gr = torch.einsum("boz,doz->bd", right, right).to(torch.float64)
        eye = torch.eye(n, dtype=torch.float64)
        h += metric.shift * torch.einsum("ac,pq,bd->apbcqd", gl, eye, gr).reshape(p, p)
    return h


def _normal_equations(cores: Sequence[torch.Tensor], k: int, gt: torch.Tensor | _RowsMetric, d: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` (``p x p``, ``p = r_{k-1} n_k r_k``) and the right-hand sides ``(p, m_k)`` for core ``k``.

    ``W^[(i<, i, i>), (j<, j, j>)] = sum L[i<, j<, a] G_k[a, i, j, b] R[b, i>, j>]``: for each
    output index ``i`` of the core, the rows it touches are linear in ``G_k[:, i, :, :]`` through
    the same map, so ``H = sum_{i<, i>} Phi^T G~ Phi`` is shared by all ``i``. ``gt`` is the
    ``K x K`` metric, or its rows (:class:`_RowsMetric`, :func:`_rows_normal_matrix`).
    """
    if isinstance(gt, _RowsMetric):  # merged in the metric's dtype (no float64 copy of the merged cores)
        left = _merge_left([c.to(gt.dtype) for c in cores[:k]], gt.dtype)
        right = _merge_right([c.to(gt.dtype) for c in cores[k + 1:]], gt.dtype)
    else:
        left, right = _merge_left(cores[:k]).to(gt.dtype), _merge_right(cores[k + 1:]).to(gt.dtype)
    r_l, m, n, r_r = cores[k].shape
    n_l, n_r = left.shape[1], right.shape[2]
    m_l, m_r = left.shape[0], right.shape[1]
    if isinstance(gt, _RowsMetric):
        h = _rows_normal_matrix(gt, left, right, n)
    else:
        g6 = gt.reshape(n_l, n, n_r, n_l, n, n_r)
        pl = torch.einsum("ixa,iyc->xayc", left, left)
        pr = torch.einsum("boz,dow->bzdw", right, right)
        t1 = torch.einsum("xpzyqw,xayc->apzcqw", g6, pl)
        h = torch.einsum("apzcqw,bzdw->apbcqd", t1, pr).reshape(r_l * n * r_r, r_l * n * r_r)
        del t1
    d6 = d.reshape(m_l, m, m_r, n_l, n, n_r)
    if isinstance(gt, _RowsMetric):  # one output index at a time: temporaries of M / m_k x K values
        lt = left.reshape(m_l * n_l, r_l).T  # (a, (i, x))
        rt = right.reshape(r_r, m_r * n_r).T  # ((o, z), b)
        cols = []
        for s in range(m):
            t = lt @ d6[:, s].permute(0, 2, 1, 3, 4).reshape(m_l * n_l, -1)  # (a, (o, p, z))
            t = t.reshape(r_l, m_r, n, n_r).permute(0, 2, 1, 3).reshape(r_l * n, m_r * n_r)  # ((a, p), (o, z))
            cols.append((t @ rt).reshape(-1))  # (a, p, b)
        rhs = torch.stack(cols, dim=1)
    else:
        t2 = torch.einsum("isoxpz,ixa->asopz", d6, left)
        rhs = torch.einsum("asopz,boz->apbs", t2, right).reshape(r_l * n * r_r, m)
    return h.to(torch.float64), rhs.to(torch.float64)


def _solve_core(cores: list[torch.Tensor], k: int, gt: torch.Tensor | _RowsMetric, d: torch.Tensor) -> None:
    """Replace core ``k`` by the least-squares optimum unless that does not lower the objective."""
    h, rhs = _normal_equations(cores, k, gt, d)
    r_l, m, n, r_r = cores[k].shape
    old = cores[k].permute(0, 2, 3, 1).reshape(-1, m)
    ridge = _SOLVE_RIDGE * float(torch.diagonal(h).mean().clamp_min(1e-300))
    h_reg = h + ridge * torch.eye(h.shape[0], dtype=h.dtype)
    chol, info = torch.linalg.cholesky_ex(h_reg)
    new = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(h_reg, rhs).solution
    quad = lambda x: float(((h @ x) * x).sum() - 2 * (x * rhs).sum())  # noqa: E731
    if torch.isfinite(new).all() and quad(new) <= quad(old):
        cores[k] = new.reshape(r_l, n, r_r, m).permute(0, 3, 1, 2).contiguous()


def _left_orthogonalize(cores: list[torch.Tensor], k: int) -> None:
    """QR of core ``k``'s left unfolding; the triangular factor moves into core ``k + 1``."""
    r_l, m, n, r_r = cores[k].shape
    if r_l * m * n < r_r:
        return
    q, rr = torch.linalg.qr(cores[k].reshape(-1, r_r))
    cores[k] = q.reshape(r_l, m, n, r_r)
    cores[k + 1] = torch.einsum("ab,bmnc->amnc", rr, cores[k + 1])


def _right_orthogonalize(cores: list[torch.Tensor], k: int) -> None:
    """LQ of core ``k``'s right unfolding; the triangular factor moves into core ``k - 1``."""
    r_l, m, n, r_r = cores[k].shape
    if m * n * r_r < r_l:
        return
    q, rr = torch.linalg.qr(cores[k].reshape(r_l, -1).T)
    cores[k] = q.T.reshape(r_l, m, n, r_r)
    cores[k - 1] = torch.einsum("amnb,cb->amnc", cores[k - 1], rr)


def _tt_als_sweeps(
    work: list[torch.Tensor], sweeps: int, gt_pad: torch.Tensor | _RowsMetric, d_pad: torch.Tensor
) -> list[torch.Tensor]:
    """``sweeps`` left-to-right-and-back ALS sweeps over the float64 cores ``work`` (in place).

    The cores are first right-orthogonalized; each solve is followed by a QR gauge move towards
    the next core, and a last solve of core 0 ends the sweeps (see :func:`refine_tt_cores`).
    """
    dim = len(work)
    if dim > 1:
        for k in range(dim - 1, 0, -1):
            _right_orthogonalize(work, k)
        for _ in range(sweeps):
            for k in range(dim - 1):
                _solve_core(work, k, gt_pad, d_pad)
                _left_orthogonalize(work, k)
            for k in range(dim - 1, 0, -1):
                _solve_core(work, k, gt_pad, d_pad)
                _right_orthogonalize(work, k)
    if sweeps:
        _solve_core(work, 0, gt_pad, d_pad)
    return work


#: :func:`refine_tt_cores` contracts the metric in float32 from this input size ``prod(in_modes)`` on.
TT_FLOAT32_FEATURES = 1024


def tt_metric_bytes(features: int) -> int:
    """Bytes of the ``K x K`` float64 metric (and its padded copy) that :func:`refine_tt_cores` solves
    with on exact statistics (sketched statistics keep their rows: no ``K x K`` array)."""
    return 2 * features * features * 8


def refine_tt_cores(
    cores: Sequence[torch.Tensor],
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    weight: torch.Tensor,
    stats: LayerStats,
    *,
    sweeps: int = 2,
    damping: float = DAMPING,
) -> tuple[torch.Tensor, ...]:
    """Alternating least squares on TT-matrix cores for the (damped) output error.

    The TT-matrix ``W^`` is linear in each core, so with the others fixed the objective is a
    quadratic in one core whose minimiser solves normal equations of size ``r_{k-1} n_k r_k``
    (shared by the ``m_k`` output slices). Cores are updated left to right and back, ``sweeps``
    times, keeping the others orthogonal (QR gauge moves, which do not change ``W^``) for a well
    conditioned solve, as in the alternating linear scheme of Holtz et al. [4]_. A solve that does
    not lower its quadratic is discarded, and the result is the input when the sweeps did not
    lower the damped output error: the objective never increases.

    When the modes are padded (their products exceed ``weight``'s shape), the solves also drive
    the padded output rows towards zero (an upper bound of the objective); the final check is on
    the exact objective.

    Parameters
    ----------
    cores : sequence of torch.Tensor
        Core ``k`` of shape ``(r_{k-1}, out_modes[k], in_modes[k], r_k)`` (as a TT-matrix layer's ``tt_matrix_cores()``
        stores them).
    in_modes, out_modes : sequence of int
        The modes.
    weight : torch.Tensor
        ``(out_features, in_features)`` dense weight.
    stats : LayerStats
        Input statistics of the layer (one group).
    sweeps : int, default 2
        Left-to-right-and-back sweeps.
    damping : float, default DAMPING
        Relative damping.

    Returns
    -------
    tuple of torch.Tensor
        New cores, in the dtype and device of the given ones.
    """
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be a non-negative int, got {sweeps!r}")
    # sketched statistics take the weight by float64 row blocks (no float64 copy of it is held)
    w = _check(weight, stats, dtype=weight.dtype if _lean(stats, weight) else torch.float64)
    if stats.groups != 1:
        raise ValueError("TT cores need statistics with a single group")
    ins, outs = tuple(in_modes), tuple(out_modes)
    if len(cores) != len(ins) or len(ins) != len(outs) or any(
            c.dim() != 4 or c.shape[1:3] != (m, n) for c, m, n in zip(cores, outs, ins)):
        raise ValueError("cores must have shapes (r_{k-1}, out_modes[k], in_modes[k], r_k)")
    big_m, big_n = math.prod(outs), math.prod(ins)
    out_f, in_f = weight.shape
    if big_m < out_f or big_n < in_f:
        raise ValueError(f"modes {outs} x {ins} are smaller than weight's shape {tuple(weight.shape)}")
    _s, s_x, s_c = (float(t[0]) for t in _shifts(stats, damping, residual=FIT_RESIDUAL))
    # the metric and the targets the solves contract: float32 for a large layer (the contractions
    # are the cost; each solve and the final check stay float64)
    work = torch.float32 if big_n >= TT_FLOAT32_FEATURES else torch.float64
    d_pad = torch.zeros(big_m, big_n, dtype=work)
    gt_pad: torch.Tensor | _RowsMetric
    if stats.sketched:  # the metric stays its sketch rows (no K x K array: _rows_normal_matrix)
        rd, rc = stats.factors(0)
        rows_pad = torch.zeros(rc.shape[0], big_n, dtype=work)
        rows_pad[:, :in_f] = rc
        gt_pad = _RowsMetric(rows_pad, s_c)
        for rows in range(0, out_f, _row_block(w.shape[-1])):  # no out x K float64 temporaries
            block = w[0, rows:rows + _row_block(w.shape[-1])].to(torch.float64)
            d_pad[rows:rows + block.shape[0], :in_f] = (block @ rd.T) @ rc + s_x * block
        del rd, rc
    else:
        gt_pad = torch.zeros(big_n, big_n, dtype=work)
        gt_pad.diagonal().fill_(s_c)
        gt_pad[:in_f, :in_f] = _damped_block(stats.gram[0], s_c)  # type: ignore[index]
        c = _damped_block(stats.cross[0], s_x)  # type: ignore[index]
        d_pad[:out_f, :in_f] = w[0] @ c
        del c
    quad, _ref = _objective_fn(w, stats, damping, residual=FIT_RESIDUAL)

    def exact(cs: Sequence[torch.Tensor]) -> float:
        w_hat = tt_to_matrix(list(cs))[:out_f, :in_f]
        return float(quad(w_hat[None]))

    start = [core.detach().to("cpu", torch.float64) for core in cores]
    work = _tt_als_sweeps(list(start), sweeps, gt_pad, d_pad)
    best = work if exact(work) <= exact(start) else start
    return tuple(b.to(device=o.device, dtype=o.dtype) for b, o in zip(best, cores))


# --------------------------------------------------------------------------------------------------
# generic: a bounded number of optimiser steps
# --------------------------------------------------------------------------------------------------
def refine_by_gradient(
    layer: nn.Module,
    dense_weight_fn: Callable[[nn.Module], torch.Tensor],
    weight: torch.Tensor,
    stats: LayerStats,
    *,
    steps: int = 100,
    lr: float = 1.0,
    damping: float = DAMPING,
) -> float:
    """Minimise the damped output error over ``layer``'s own parameters by L-BFGS, in place.

    ``dense_weight_fn(layer)`` must rebuild the layer's ``(out, K)`` weight differentiably (e.g.
    :func:`ttcompress.calibration.reconstruct.dense_weight`). The optimisation runs on a float64
    copy with at most ``steps`` L-BFGS iterations (strong-Wolfe line search) on the objective
    divided by ``tr(W G W^T)``; parameters named ``bias`` are left alone (see
    :func:`corrected_bias`). The best parameters seen are written back, so the objective never
    increases.

    Returns
    -------
    float
        The relative damped objective ``E / tr(W G W^T)`` of the parameters written back.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    w = _check(weight, stats)
    quad, scale = _objective_fn(w, stats, damping, residual=FIT_RESIDUAL)
    scale = scale or 1.0
    work_layer = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    params = [p for name, p in work_layer.named_parameters() if name.rsplit(".", 1)[-1] != "bias"]

    def loss() -> torch.Tensor:
        w_hat = dense_weight_fn(work_layer).reshape(stats.groups, -1, stats.features)
        return quad(w_hat) / scale

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    with torch.no_grad():
        best_value, best = float(loss()), snapshot()
    # One evaluation: the weight's reconstruction (~ parameters x K) and the quadratic form
    # (out x K x K exact, out x K x 2l sketched). Below SMALL_WORK it runs on one thread: L-BFGS is
    # many small products and vector updates, each paying a thread wake-up (at load ~8 a CREPE-tiny
    # layer's 100 steps took 8.5 s CPU on two threads, 0.8 s on one).
    width = stats.features if not stats.sketched else 2 * stats.rows.shape[1]  # type: ignore[union-attr]
    work = (w.shape[0] * w.shape[1] * width + sum(p.numel() for p in params)) * stats.features
    if steps and params:
        with few_threads(work):
            best_value, best = _lbfgs(params, loss, snapshot, steps, lr, best_value, best)
    names = [name for name, _ in work_layer.named_parameters() if name.rsplit(".", 1)[-1] != "bias"]
    own = dict(layer.named_parameters())
    with torch.no_grad():
        for name, value in zip(names, best):
            own[name].copy_(value)
    return best_value


def _lbfgs(params: list[torch.Tensor], loss: Callable[[], torch.Tensor],
           snapshot: Callable[[], list[torch.Tensor]], steps: int, lr: float, best_value: float,
           best: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """At most ``steps`` L-BFGS iterations on ``loss``; the better of ``(best_value, best)`` and the end."""
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(loss())
    if math.isfinite(value) and value < best_value:
        return value, snapshot()
    return best_value, best


# --------------------------------------------------------------------------------------------------
# one layer, end to end
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FitResult:
    """A layer fitted to calibration data.

    Attributes
    ----------
    module : nn.Module
        The fitted replacement (the start, modified in place).
    error_before, error_after : float
        Relative output error (:func:`output_error`, bias included) of the start and the fit.
    method : str
        ``"whitened-svd"``, ``"tt-als"``, ``"gradient"`` or ``"none"`` (the fit was not better
        and the start was kept).
    """

    module: nn.Module
    error_before: float
    error_after: float
    method: str


def _two_factor(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2
            and all(isinstance(m, nn.Linear) for m in module) and module[0].bias is None)


def _tt_matrix_cores(module: nn.Module) -> tuple[Sequence[torch.Tensor], tuple[int, ...], tuple[int, ...]] | None:
    """``(cores, in_modes, out_modes)`` of a layer whose weight is one TT-matrix (the layer says so with a
    ``tt_matrix_cores()`` method), else None."""
    method = getattr(module, "tt_matrix_cores", None)
    return method() if callable(method) else None


def fit_layer(
    dense: nn.Module,
    start: nn.Module,
    stats: LayerStats,
    *,
    damping: float = DAMPING,
    sweeps: int = 2,
    steps: int = 100,
) -> FitResult:
    """Fit a compressed layer ``start`` (e.g. its data-free decomposition) to ``dense``'s outputs.

    The weight is fitted by the closed form when there is one -- :func:`whitened_lowrank` for a
    two-factor ``nn.Sequential(Linear(K, r, bias=False), Linear(r, out))`` and
    :func:`refine_tt_cores` for a layer whose weight is one TT-matrix (it has ``tt_matrix_cores()``)
    -- and otherwise by :func:`refine_by_gradient` (e.g. a CP convolution). With a bias the weight is fitted on centred statistics
    and the bias set by :func:`corrected_bias`, the joint optimum. ``start`` is modified in place;
    if the fit does not lower the output error the original parameters are restored.
    """
    w = dense_weight(dense).detach()
    b = effective_bias(dense)
    before_state = copy.deepcopy(start.state_dict())
    error_before = output_error(w, dense_weight(start).detach(), stats, bias=b, new_bias=effective_bias(start))
    has_bias = effective_bias(start) is not None
    fit_stats = stats.centered() if has_bias else stats
    with torch.no_grad():
        if _two_factor(start):
            rank = start[0].out_features
            a, bb = whitened_lowrank(w, fit_stats, rank, damping=damping)
            start[0].weight.copy_(bb)  # type: ignore[index]
            start[1].weight.copy_(a)  # type: ignore[index]
            method = "whitened-svd"
        elif (tt := _tt_matrix_cores(start)) is not None:
            cores, in_modes, out_modes = tt
            new = refine_tt_cores(list(cores), in_modes, out_modes, w, fit_stats, sweeps=sweeps, damping=damping)
            for param, core in zip(cores, new):
                param.copy_(core)
            method = "tt-als"
        else:
            method = "gradient"
    if method == "gradient":
        refine_by_gradient(start, dense_weight, w, fit_stats, steps=steps, damping=damping)
    with torch.no_grad():
        w_hat = dense_weight(start).detach()
        if has_bias:
            set_effective_bias(start, corrected_bias(w, b, w_hat, stats))
        error_after = output_error(w, w_hat, stats, bias=b, new_bias=effective_bias(start))
    if not error_after <= error_before:
        start.load_state_dict(before_state)
        return FitResult(start, error_before, error_before, "none")
    return FitResult(start, error_before, error_after, method)
