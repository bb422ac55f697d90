"""CP (CANDECOMP/PARAFAC) decomposition of 4-D convolution kernels by alternating least squares.

A kernel ``K`` of shape ``(C_out, C_in / groups, kh, kw)`` is approximated by a sum of ``R`` rank-1
terms (Lebedev et al. 2015, eq. 2)::

    K[o, c, y, x] ~= sum_r  U_out[o, r] * U_in[c, r] * U_kh[y, r] * U_kw[x, r]

The fit is ALS (Kolda & Bader 2009) in :func:`ttcompress.decompose.cp_sweeps.als_sweeps`: the
iterates of TensorLy's ``parafac`` (which it replaced; the tests compare both), with each Gram
matrix formed once per sweep, Cholesky solves and no dense reconstruction for the errors (half
the time per sweep on resnet50-sized kernels, docs/benchmarks.md "Data-free at real size").

Memory
------
Each ALS step needs an MTTKRP (matricised tensor times Khatri-Rao product). Forming the
Khatri-Rao product of the three other factors explicitly (TensorLy's default) costs, for the
``kh`` mode of a 512x512x3x3 kernel at rank 256, a 786432x256 float64 matrix (1.6 GB) and
several seconds per step; ``torch.einsum`` without ``opt_einsum`` first forms the ``tensor x
weights`` outer product (~10 GB measured). The MTTKRP here
(:func:`ttcompress.decompose.cp_lean.lean_mttkrp`) contracts the largest other mode first with
one compute-bound matrix product and then the small modes, holding at most ``numel / n_max * R``
extra numbers (1.2 M for the kernel above), and shares ``K x_0 U_out x_1 U_in`` between the two
spatial modes: three large matrix products per ALS sweep and well under 1 GB in all
(docs/benchmarks.md). When the updated mode is itself the largest (the 1,024-channel mode of a
128x1024x64x1 kernel), the Khatri-Rao product of the other factors is the smaller intermediate
and is formed instead; products above ~1e9 multiply-adds run in float32
(:data:`ttcompress.decompose.cp_lean.FLOAT32_MIN_WORK`).

References
----------
.. [1] V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up Convolutional
       Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015. arXiv:1412.6553.
.. [2] T. G. Kolda, B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
       455-500, 2009.
.. [3] V. de Silva, L.-H. Lim, "Tensor rank and the ill-posedness of the best low-rank
       approximation problem", SIAM J. Matrix Anal. Appl. 30(3), 2008 (diverging components).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ttcompress.decompose._threads import few_threads
from ttcompress.decompose.cp_lean import (
    balance_factors,
    slice_svd_upper_bound,
    svd_init_bytes,
    svd_start,
)
from ttcompress.decompose.cp_sweeps import als_sweeps, cp_reconstruct

__all__ = [
    "CPDecomposition",
    "CPProgress",
    "cp_als",
    "cp_progress",
    "cp_param_count",
    "cp_rank_for_ratio",
    "cp_reconstruct",
]

InitName = Literal["auto", "svd", "random"]

#: Above this many bytes of SVD work space, ``init="auto"`` falls back to a random start.
SVD_INIT_MAX_BYTES = 2 * 1024**3
#: A rank-1 term whose norm exceeds this multiple of ``||K||`` is cancelled by others: degenerate.
DIVERGENCE_RATIO = 10.0


@dataclass(frozen=True)
class CPDecomposition:
    """Result of :func:`cp_als`: a rank-``rank`` CP model of a conv kernel.

    Attributes
    ----------
    factors : tuple of torch.Tensor
        ``(out, in, kh, kw)`` factor matrices of shapes ``(C_out, R)``, ``(C_in / groups, R)``,
        ``(kh, R)`` and ``(kw, R)``, in the kernel's dtype and device. The CP weights are
        absorbed: the norm of each rank-1 term is spread evenly over its four columns.
    rank : int
        Number of rank-1 terms ``R``.
    rel_error : float
        Achieved relative reconstruction error ``||K - K_hat||_F / ||K||_F`` (in float64).
    n_iter : int
        ALS iterations run by the best restart.
    """

    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    rank: int
    rel_error: float
    n_iter: int

    def to_tensor(self) -> torch.Tensor:
        """Return the reconstructed kernel ``K_hat`` of shape ``(C_out, C_in/groups, kh, kw)``."""
        return cp_reconstruct(self.factors)


@dataclass(frozen=True)
class CPProgress:
    """Per-iteration state of :func:`cp_als`, passed to its ``progress`` callback.

    Attributes
    ----------
    iteration : int
        ALS iterations done in this run (0: the start, before the first sweep).
    n_iter_max : int
        Maximum iterations of this run (the run may stop earlier, see ``tol``).
    rel_error : float
        Relative reconstruction error after ``iteration`` sweeps.
    improvement : float
        Relative improvement ``(e_prev - e) / e_prev`` of the last sweep (``nan`` at iteration 0);
        the run stops once it is below ``tol``.
    restart : int
        Index of the run (``0 <= restart < n_restarts``).
    n_restarts : int
        Number of runs.
    elapsed : float
        Seconds since :func:`cp_als` started.
    """

    iteration: int
    n_iter_max: int
    rel_error: float
    improvement: float
    restart: int
    n_restarts: int
    elapsed: float


ProgressFn = Callable[[CPProgress], None]

#: The callback :func:`cp_als` reports to when it is given none (see :func:`cp_progress`).
_PROGRESS: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar("ttcompress_cp_progress", default=None)


@contextlib.contextmanager
def cp_progress(progress: ProgressFn | None) -> Iterator[None]:
    """Within the block, every :func:`cp_als` call without a ``progress`` argument reports to ``progress``.

    Layers decompose through several levels (surgery, a format's ``build``, a layer's
    ``from_conv``); this lets a caller watch every CP-ALS run below it, e.g. to draw a per-layer
    progress bar, without threading a callback through each level. The setting is local to the
    current thread (a :class:`contextvars.ContextVar`) and restored on exit; ``None`` turns
    reporting off inside the block.
    """
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


# --------------------------------------------------------------------------------------------
# parameter counts (no decomposition needed; used by the planner)
# --------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def cp_param_count(
    out_channels: int,
    in_channels_per_group: int,
    kh: int,
    kw: int,
    rank: int,
    groups: int = 1,
    *,
    bias: bool = False,
) -> int:
    """Parameters of a rank-``rank`` CP convolution (:class:`ttcompress.CPConv2d`).

    Each of the ``groups`` groups has its own rank-``rank`` factors, so the count is
    ``groups * rank * (in_channels_per_group + kh + kw + out_channels / groups)``, which for
    ``groups=1`` is ``R * (C_in + kh + kw + C_out)``; plus ``out_channels`` when ``bias``.

    Parameters
    ----------
    out_channels, in_channels_per_group, kh, kw : int
        Kernel shape ``(C_out, C_in / groups, kh, kw)``.
    rank : int
        CP rank per group.
    groups : int, default 1
        ``nn.Conv2d`` groups; must divide ``out_channels``.
    bias : bool, default False
        Count the bias too.
    """
    for value, name in (
        (out_channels, "out_channels"),
        (in_channels_per_group, "in_channels_per_group"),
        (kh, "kh"),
        (kw, "kw"),
        (rank, "rank"),
        (groups, "groups"),
    ):
        _check_positive_int(value, name)
    if out_channels % groups:
        raise ValueError(f"groups={groups} must divide out_channels={out_channels}")
    per_group = rank * (in_channels_per_group + kh + kw + out_channels // groups)
    return groups * per_group + (out_channels if bias else 0)


def cp_rank_for_ratio(
    out_channels: int,
    in_channels_per_group: int,
    kh: int,
    kw: int,
    ratio: float,
    groups: int = 1,
    *,
    bias: bool = False,
) -> int:
    """Largest CP rank whose layer is at least ``ratio`` times smaller than the dense conv.

    The ratio is ``dense / cp`` with ``dense = out_channels * in_channels_per_group * kh * kw``
    (``+ out_channels`` when ``bias``) and ``cp`` from :func:`cp_param_count` with the same
    ``bias``.

    Returns
    -------
    int
        The rank, or ``0`` when even rank 1 does not reach ``ratio`` (the layer would not shrink
        enough: the caller should skip it).
    """
    for value, name in (
        (out_channels, "out_channels"),
        (in_channels_per_group, "in_channels_per_group"),
        (kh, "kh"),
        (kw, "kw"),
        (groups, "groups"),
    ):
        _check_positive_int(value, name)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number, got {type(ratio).__name__}")
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be a positive finite number, got {ratio}")
    if out_channels % groups:
        raise ValueError(f"groups={groups} must divide out_channels={out_channels}")
    extra = out_channels if bias else 0
    dense = out_channels * in_channels_per_group * kh * kw + extra
    per_rank = groups * (in_channels_per_group + kh + kw + out_channels // groups)
    # dense / (per_rank * R + extra) >= ratio  <=>  R <= (dense / ratio - extra) / per_rank
    rank = math.floor((dense / ratio - extra) / per_rank)
    # guard the float division at the boundary
    while rank >= 1 and dense < ratio * (per_rank * rank + extra):
        rank -= 1
    while dense >= ratio * (per_rank * (rank + 1) + extra):
        rank += 1
    return max(rank, 0)


# --------------------------------------------------------------------------------------------
# ALS
# --------------------------------------------------------------------------------------------


def _validate(
    kernel: Any,
    rank: Any,
    n_iter_max: Any,
    tol: Any,
    init: Any,
    n_restarts: Any,
    seed: Any,
) -> None:
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if kernel.ndim != 4:
        raise ValueError(
            f"kernel must be 4-D (out, in/groups, kh, kw), got shape {tuple(kernel.shape)}"
        )
    if kernel.numel() == 0:
        raise ValueError(f"kernel is empty, shape {tuple(kernel.shape)}")
    if not kernel.is_floating_point():
        raise TypeError(f"kernel must be floating point, got {kernel.dtype}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if (
        isinstance(n_iter_max, bool)
        or not isinstance(n_iter_max, int)
        or n_iter_max < 1
    ):
        raise ValueError(f"n_iter_max must be a positive int, got {n_iter_max!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if isinstance(init, CPDecomposition):
        shapes = tuple(tuple(f.shape) for f in init.factors)
        want = tuple((n, rank) for n in kernel.shape)
        if shapes != want:
            raise ValueError(f"init: a CPDecomposition start must have factors of shapes {want}, got {shapes}")
        if not all(bool(torch.isfinite(f).all()) for f in init.factors):
            raise ValueError("init: the CPDecomposition start has NaN or Inf factors")
    elif init not in ("auto", "svd", "random"):
        raise ValueError(f"init must be 'auto', 'svd', 'random' or a CPDecomposition, got {init!r}")
    if (
        isinstance(n_restarts, bool)
        or not isinstance(n_restarts, int)
        or n_restarts < 1
    ):
        raise ValueError(f"n_restarts must be a positive int, got {n_restarts!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _random_start(target: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """TensorLy's seeded uniform start (``parafac(init="random")``), on ``target``'s device and dtype."""
    import tensorly as tl
    from tensorly.random import random_cp

    with tl.backend_context("pytorch", local_threadsafe=True):
        _weights, factors = random_cp(tuple(target.shape), rank, normalise_factors=False,
                                      random_state=tl.check_random_state(seed), **tl.context(target))
    return list(factors)


def _start(target: torch.Tensor, rank: int, init: str | list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The start's factors on the unit-norm ``target``'s scale (``init``: a resolved name or factors)."""
    if isinstance(init, list):
        return init
    if init == "svd":
        return svd_start(target, rank, seed)
    return _random_start(target, rank, seed)


def _als_run(
    target: torch.Tensor,
    rank: int,
    init: str | list[torch.Tensor],
    seed: int,
    n_iter_max: int,
    tol: float,
    report: Callable[[int, float, float], None] | None = None,
) -> tuple[float, list[torch.Tensor], int]:
    """One ALS run on a unit-norm float64 tensor: (error, factors, n_iter).

    ``init`` is ``"svd"``, ``"random"`` or the start's factors (on the target's scale).

    Stops after ``n_iter_max`` sweeps, or once a sweep improves the relative error by less than
    ``tol`` relative to the previous error, or on a non-finite error. ``report(iteration,
    rel_error, improvement)`` is called at the start and after every sweep.
    """
    errors: list[float] = []

    def watch(iteration: int, error: float) -> bool:
        errors.append(error)
        if not math.isfinite(error):
            return True  # stop: nothing useful will come of it
        improvement = math.nan
        if len(errors) >= 2:
            improvement = (errors[-2] - errors[-1]) / errors[-2] if errors[-2] > 0 else 0.0
        if report is not None:
            report(iteration, error, improvement)
        return len(errors) >= 2 and (improvement < tol or error == 0.0)

    factors, n_iter, error = als_sweeps(target, _start(target, rank, init, seed), n_iter_max, watch)
    finite = math.isfinite(error) and all(bool(torch.isfinite(f).all()) for f in factors)
    return (error if finite else math.inf), factors, n_iter


def _report(
    progress: ProgressFn,
    restart: int,
    n_restarts: int,
    n_iter_max: int,
    started: float,
    iteration: int,
    rel_error: float,
    improvement: float,
) -> None:
    progress(CPProgress(
        iteration=iteration,
        n_iter_max=n_iter_max,
        rel_error=rel_error,
        improvement=improvement,
        restart=restart,
        n_restarts=n_restarts,
        elapsed=time.perf_counter() - started,
    ))


def _best_run(
    target: torch.Tensor,
    rank: int,
    *,
    init: str | list[torch.Tensor],
    n_restarts: int,
    seed: int,
    n_iter_max: int,
    tol: float,
    progress: ProgressFn | None,
    label: str,
) -> tuple[float, list[torch.Tensor], int]:
    """The lowest-error of ``n_restarts`` ALS runs on a unit-norm float64 kernel: (error, factors, n_iter).

    The first run starts from ``init`` (``"auto"`` resolved by :data:`SVD_INIT_MAX_BYTES`; a list:
    the start's factors), the others from seeded random starts; raises ValueError when the best run
    is not finite.
    """
    shape = tuple(target.shape)
    first_init = init
    if isinstance(init, str) and init == "auto":
        first_init = "svd" if svd_init_bytes(shape) <= SVD_INIT_MAX_BYTES else "random"

    runs = []
    started = time.perf_counter()
    with few_threads(math.prod(shape) * rank):
        for restart in range(n_restarts):
            kind = first_init if restart == 0 else "random"
            report = None
            if progress is not None:
                report = functools.partial(_report, progress, restart, n_restarts, n_iter_max, started)
            runs.append(_als_run(target, rank, kind, seed + restart, n_iter_max, tol, report))
    best = min(runs, key=lambda run: run[0])  # first of equals: deterministic
    if not math.isfinite(best[0]):
        raise ValueError(
            f"CP-ALS of {label} (shape {shape}, rank {rank}) produced non-finite factors; "
            "try another seed, init='svd' or a lower rank"
        )
    return best


def _warn_if_degenerate(
    target: torch.Tensor, factors: list[torch.Tensor], err: float, *, rank: int, label: str
) -> None:
    """Warn (at the caller of :func:`cp_als`) about diverging components or a stalled run."""
    shape = tuple(target.shape)
    term = torch.stack([f.norm(dim=0) for f in factors]).prod(dim=0)
    if float(term.max()) > DIVERGENCE_RATIO:
        warnings.warn(
            f"CP-ALS of {label} (shape {shape}, rank {rank}) is degenerate: rank-1 terms up to "
            f"{float(term.max()):.3g}x the kernel norm cancel each other (diverging components); "
            f"rel_error={err:.4f}. Try a lower rank, more restarts or another seed.",
            UserWarning,
            stacklevel=3,
        )
    else:
        bound = slice_svd_upper_bound(target, rank)
        if err > 1.1 * bound + 1e-3:
            warnings.warn(
                f"CP-ALS of {label} (shape {shape}, rank {rank}) stalled at rel_error={err:.4f}, "
                f"far above {bound:.4f} that a per-tap SVD model of the same rank reaches. "
                "Try more iterations, n_restarts > 1 or init='svd'.",
                UserWarning,
                stacklevel=3,
            )


def _rescaled(factors: list[torch.Tensor], norm: float, *, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Balanced factors of the unit-norm fit scaled back to ``norm``, in ``like``'s dtype and device."""
    scale = norm ** (1.0 / 4)
    return tuple(
        (f * scale).to(dtype=like.dtype, device=like.device).contiguous()
        for f in balance_factors(factors)
    )


def cp_als(
    kernel: torch.Tensor,
    *,
    rank: int,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    init: InitName | CPDecomposition = "auto",
    n_restarts: int = 1,
    seed: int = 0,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> CPDecomposition:
    """Rank-``rank`` CP decomposition of a conv kernel by ALS (TensorLy ``parafac``).

    Parameters
    ----------
    kernel : torch.Tensor
        4-D kernel ``(C_out, C_in / groups, kh, kw)``, finite values. Not modified.
    rank : int
        Number of rank-1 terms ``R >= 1``.
    n_iter_max : int, default 100
        Maximum ALS iterations per restart.
    tol : float, default 1e-6
        Stop a run once an ALS sweep improves the relative error ``e`` by less than ``tol``
        relative to the previous error: ``(e_prev - e) / e_prev < tol`` (``0``: run all
        ``n_iter_max`` sweeps). Large kernels at high rank improve slowly; ``tol=1e-3`` there
        stops long before ``n_iter_max`` at a nearly equal error (``docs/benchmarks.md``,
        "Decomposition time").
    init : {"auto", "svd", "random"}, default "auto"
        ``"svd"``: leading left singular vectors of each unfolding (TensorLy's SVD start; columns
        beyond a mode's size are seeded random). ``"random"``: seeded uniform factors.
        ``"auto"``: ``"svd"`` when its work space fits in :data:`SVD_INIT_MAX_BYTES`, else
        ``"random"``. (Measured on 64x64x3x3 kernels at ranks 4..128, the SVD start with random
        extra columns ends at an equal or lower error than a random start, also for ranks above
        the channel counts, so ``"auto"`` keeps it there.) A :class:`CPDecomposition` of this
        kernel's shape and ``rank`` (e.g. the result of a shorter run) is a warm start: ALS
        continues from its factors, so a run of ``n`` sweeps followed by one of ``m`` sweeps from
        its result follows the same iterates as one run of ``n + m`` sweeps.
    n_restarts : int, default 1
        Number of ALS runs; the first uses ``init``, the others seeded random starts
        (``seed + k``). The run with the lowest error is returned.
    seed : int, default 0
        Seed of all random starts: a fixed seed gives the same result on the same device.
    name : str, optional
        Layer name used in warnings.
    progress : callable, optional
        Called with a :class:`CPProgress` at the start of each run and after every ALS sweep
        (iteration, ``n_iter_max``, error, relative improvement, restart, elapsed seconds), e.g.
        to drive a progress bar with an ETA. It must not modify anything it is given. Default:
        the callback set by an enclosing :func:`cp_progress` block, if any.

    Returns
    -------
    CPDecomposition
        Factors (kernel dtype and device, weights absorbed), rank, ``rel_error``, ``n_iter``.

    Warns
    -----
    UserWarning
        When the best run is degenerate: a rank-1 term larger than ``10 * ||K||`` (diverging
        components cancelling each other, [3]_) or an error stalled far above the error of the
        explicit per-tap SVD model of the same rank.

    Notes
    -----
    Computation is in float64 on the kernel's device; the result is cast back. See the module
    docstring for the memory-lean MTTKRP. References: Lebedev et al. 2015 [1]_ (CP of conv
    kernels), Kolda & Bader 2009 [2]_ (ALS).
    """
    _validate(kernel, rank, n_iter_max, tol, init, n_restarts, seed)
    label = f"layer {name!r}" if name else "kernel"
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError(f"{label} has NaN or Inf weights; cannot decompose it")
    k64 = kernel.detach().to(torch.float64)
    norm = float(k64.norm())
    if norm == 0.0:
        zeros = tuple(torch.zeros(n, rank, dtype=kernel.dtype, device=kernel.device) for n in k64.shape)
        return CPDecomposition(factors=zeros, rank=rank, rel_error=0.0, n_iter=0)  # type: ignore[arg-type]
    target = k64 / norm
    if isinstance(init, CPDecomposition):  # a warm start: its factors on the unit-norm target's scale
        scale = norm ** (-1.0 / 4)
        init = [f.detach().to(device=k64.device, dtype=torch.float64) * scale for f in init.factors]
    if progress is None:
        progress = _PROGRESS.get()
    options = dict(init=init, n_restarts=n_restarts, seed=seed, n_iter_max=n_iter_max, tol=tol, progress=progress)
    err, factors, n_iter = _best_run(target, rank, label=label, **options)
    _warn_if_degenerate(target, factors, err, rank=rank, label=label)
    out = _rescaled(factors, norm, like=kernel)
    return CPDecomposition(factors=out, rank=rank, rel_error=err, n_iter=n_iter)  # type: ignore[arg-type]
