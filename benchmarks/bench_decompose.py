"""Decomposition time: TT-SVD of a 4096 x 4096 matrix and CP-ALS of every resnet50 conv.

Usage::

    python benchmarks/bench_decompose.py                # both parts
    python benchmarks/bench_decompose.py --part tt      # TT-SVD only
    python benchmarks/bench_decompose.py --part cp      # resnet50 CP only
    python benchmarks/bench_decompose.py --part cp --workers 2   # layers in 2 processes

TT part: ``tt_svd`` of a Gaussian 4096 x 4096 float32 matrix (default modes 8^4) at rank caps 16
and 64, each time divided by the time of one 4096^3 float32 matmul measured in the same process,
interleaved (matmul, tt_svd, matmul, ...), median of ``--repeats``. The error is compared with
TensorLy's exact ``tensor_train_matrix`` (full SVDs, float64) on the same matrix.

CP part: every ``nn.Conv2d`` of ``torchvision.models.resnet50()`` (random weights) at CP ratio 4
(rank from ``ttcompress.plan.cp_rank_for``), ``cp_als`` defaults except ``tol`` (``--tol``); wall time per layer, the
total, and the ten slowest layers.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from ttcompress.decompose.tt import tt_svd


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _tensorly_error(weight: torch.Tensor, modes: tuple[int, ...], rank: int) -> float:
    import tensorly
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    w = weight.double()
    ranks = [1] + [rank] * (len(modes) - 1) + [1]
    with tensorly.backend_context("pytorch"):
        tt = tensor_train_matrix(w.reshape(*modes, *modes), ranks)
        w_hat = tt_matrix_to_tensor(tt).reshape(w.shape)
    return float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w))


def bench_tt(*, repeats: int, reference: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 4096, generator=gen)
    b = torch.randn(4096, 4096, generator=gen)
    weight = torch.randn(4096, 4096, generator=gen) / 64
    print(f"TT-SVD of a 4096 x 4096 float32 matrix, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| rank cap | tt_svd s | matmul 4096^3 s | ratio | rel. error | TensorLy exact error | error ratio |")
    print("|---|---|---|---|---|---|---|")
    for rank in (16, 64):
        ratios, times, mms = [], [], []
        result = None
        for _ in range(repeats):
            t_mm, _ = _timed(lambda: a @ b)
            t_tt, result = _timed(lambda: tt_svd(weight, ranks=rank))
            t_mm2, _ = _timed(lambda: a @ b)
            mm = (t_mm + t_mm2) / 2
            ratios.append(t_tt / mm)
            times.append(t_tt)
            mms.append(mm)
        exact = _tensorly_error(weight, result.in_modes, rank) if reference else math.nan
        print(f"| {rank} | {statistics.median(times):.2f} | {statistics.median(mms):.2f} | "
              f"{statistics.median(ratios):.2f} | {result.rel_error:.6f} | {exact:.6f} | "
              f"{result.rel_error / exact:.5f} |", flush=True)


def bench_cp(*, workers: int, tol: float) -> None:
    import torchvision
    from torch import nn

    from ttcompress.decompose.cp_batch import cp_als_many
    from ttcompress.plan import cp_rank_for

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    jobs = [(name, m.weight.detach(), cp_rank_for(m, 4.0)) for name, m in convs]
    print(f"\nCP-ALS of every resnet50 conv at ratio 4: {len(jobs)} layers, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, workers={workers}, tol={tol}", flush=True)
    start = time.perf_counter()
    rows = []
    for (name, kernel, rank), (result, seconds) in zip(
        jobs, cp_als_many([(k, r) for _, k, r in jobs], names=[n for n, _, _ in jobs], workers=workers, tol=tol)
    ):
        rows.append((seconds, name, tuple(kernel.shape), rank, result.n_iter, result.rel_error))
        print(f"  {name:28s} {str(tuple(kernel.shape)):20s} rank {rank:4d}  {seconds:7.2f} s  "
              f"{result.n_iter:3d} it  err {result.rel_error:.4f}", flush=True)
    total = time.perf_counter() - start
    print(f"\ntotal wall time {total:.1f} s (sum of layer times {sum(r[0] for r in rows):.1f} s)")
    print("\n| layer | kernel | rank | s | iterations | rel. error |\n|---|---|---|---|---|---|")
    for seconds, name, shape, rank, n_iter, err in sorted(rows, reverse=True)[:10]:
        print(f"| {name} | {'x'.join(map(str, shape))} | {rank} | {seconds:.2f} | {n_iter} | {err:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("tt", "cp", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the TensorLy reference")
    parser.add_argument("--tol", type=float, default=1e-3, help="cp_als relative-improvement tol")
    parser.add_argument("--workers", type=int, default=1, help="processes for the CP layers")
    args = parser.parse_args()
    if args.part in ("tt", "all"):
        bench_tt(repeats=args.repeats, reference=not args.no_reference)
    if args.part in ("cp", "all"):
        bench_cp(workers=args.workers, tol=args.tol)


if __name__ == "__main__":
    main()
