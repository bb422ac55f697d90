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
(rank from ``ttcompress.compression.plan.cp_rank_for``), ``cp_als`` defaults except ``tol`` (``--tol``); wall time per layer, the
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
    from ttcompress.compression.plan import cp_rank_for

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


def _auto_model(name: str, capacity: int) -> "torch.nn.Module":
    import torchvision

    from bench_models import crepe

    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10)
    return crepe(capacity)


def bench_auto(*, model_name: str, capacity: int, target_ratio: float) -> None:
    """Per conv of ``model_name`` under ``Plan(target_ratio=...)`` (the ``auto`` format): Tucker-2, and
    the CP candidate as the old ``auto`` built it (a full fit at ``cp_als``'s ``tol=1e-6``) and as
    it is built now (a trial fit of at most ``TRIAL_SWEEPS`` sweeps, continued only when CP wins, at
    the CP format's ``DEFAULT_TOL``); the error of the layer each picks, and the time."""
    from ttcompress.formats import get_format
    from ttcompress.formats.auto import Trial, choose
    from ttcompress.compression.plan import Plan, plan_layers

    model = _auto_model(model_name, capacity)
    modules = dict(model.named_modules())
    t_plan, planned = _timed(lambda: plan_layers(model, Plan(target_ratio=target_ratio)))
    decisions = [d for d in planned if d.format == "auto"]
    cp, tucker2 = get_format("cp"), get_format("tucker2")
    print(f"\nauto at target ratio {target_ratio} on {model_name}"
          f"{f' (capacity {capacity})' if model_name == 'crepe' else ''}: {len(decisions)} layers, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; planning {t_plan:.1f} s", flush=True)
    print("| layer | kernel | CP rank | Tucker-2 s | err | CP full s | err | CP trial s | err | old pick | new pick "
          "| new s | err new/old |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for d in decisions:
        conv, trials = modules[d.name], d.options["trials"]
        if "cp" not in trials or "tucker2" not in trials:
            continue
        t_tk, tk = _timed(lambda: tucker2.build(conv, trials["tucker2"]).layer)
        t_full, full = _timed(lambda: cp.build(conv, {**trials["cp"], "tol": 1e-6}).layer)
        t_trial, trial_built = _timed(lambda: cp.build_trial(conv, trials["cp"]))
        trial = trial_built.layer
        facts = {"tucker2": Trial("tucker2", 0, tk.rel_error, tucker2.flops(tk)),
                 "cp": Trial("cp", 0, full.rel_error, cp.flops(full))}
        old = choose([facts["cp"], facts["tucker2"]], tie_tol=1e-3)[0]
        new = choose([Trial("cp", 0, trial.rel_error, cp.flops(trial)), facts["tucker2"]], tie_tol=1e-3)[0]
        t_new, err_new = t_tk + t_trial, tk.rel_error
        if new.format == "cp":
            t_fin, done = _timed(lambda: cp.finish_trial(conv, trial_built, trials["cp"]).layer)
            t_new, err_new = t_new + t_fin, done.rel_error
        t_old = t_tk + t_full
        totals[0] += t_old
        totals[1] += t_new
        print(f"| {d.name} | {'x'.join(map(str, conv.weight.shape))} | {trials['cp']['rank']} | {t_tk:.2f} | "
              f"{tk.rel_error:.4f} | {t_full:.2f} | {full.rel_error:.4f} | {t_trial:.2f} | {trial.rel_error:.4f} | "
              f"{old.format} | {new.format} | {t_new:.2f} | {err_new / facts[old.format].rel_error:.4f} |", flush=True)
    print(f"\nconvs: old auto {totals[0]:.1f} s, new auto {totals[1]:.1f} s ({totals[0] / totals[1]:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("tt", "cp", "auto", "all"), default="all")
    parser.add_argument("--model", choices=("resnet18", "crepe"), default="resnet18", help="for --part auto")
    parser.add_argument("--capacity", type=int, default=32, help="CREPE capacity (32: the full 22M-param net)")
    parser.add_argument("--target-ratio", type=float, default=4.0, help="for --part auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the TensorLy reference")
    parser.add_argument("--tol", type=float, default=1e-3, help="cp_als relative-improvement tol")
    parser.add_argument("--workers", type=int, default=1, help="processes for the CP layers")
    args = parser.parse_args()
    if args.part in ("tt", "all"):
        bench_tt(repeats=args.repeats, reference=not args.no_reference)
    if args.part in ("cp", "all"):
        bench_cp(workers=args.workers, tol=args.tol)
    if args.part == "auto":
        bench_auto(model_name=args.model, capacity=args.capacity, target_ratio=args.target_ratio)


if __name__ == "__main__":
    main()
