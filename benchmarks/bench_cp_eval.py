"""Eval-mode latency of CPConv2d vs nn.Conv2d on real layer shapes (issue 13, section 2).

Every layer is compressed 4x (``cp_rank_for_ratio``, weights only) and timed in eval mode under
``torch.no_grad()`` at batch 1 and 64, interleaved with the dense conv in one process: each round
times dense, ours (``evaluation="auto"``: cached dense kernel or factorized passes, chosen per input
shape) and ours forced factorized, in rotating order, each over a block of calls of about 50 ms;
the table shows the median over rounds of the per-round time ratios. ``path`` is what ``auto``
chose.

Usage::

    python benchmarks/bench_cp_eval.py [--rounds 9] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ttcompress.decompose.cp import cp_rank_for_ratio
from ttcompress.layers.cp_conv import CPConv2d

# (label, conv kwargs, input height, input width)
SHAPES = [
    ("square 3x3 128->128", {"in_channels": 128, "out_channels": 128, "kernel_size": 3, "padding": 1}, 32, 32),
    ("(64,1) 1024->128", {"in_channels": 1024, "out_channels": 128, "kernel_size": (64, 1),
                          "padding": "same"}, 128, 1),
    ("1x1 256->256", {"in_channels": 256, "out_channels": 256, "kernel_size": 1}, 16, 16),
    ("3x3 stride 2 128->256", {"in_channels": 128, "out_channels": 256, "kernel_size": 3, "stride": 2,
                               "padding": 1}, 32, 32),
    ("3x3 groups 4 256->256", {"in_channels": 256, "out_channels": 256, "kernel_size": 3, "groups": 4,
                               "padding": 1}, 16, 16),
]


def _seconds(fn: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def interleaved_ratios(fns: list[Callable[[], object]], rounds: int, block: float = 0.05) -> list[float]:
    """Median over ``rounds`` of ``time(fns[i]) / time(fns[0])``, the order rotating per round.

    Each sample times a block of calls lasting about ``block`` seconds (one call for slow layers),
    so that sub-millisecond layers are not measured one timer-resolution-sized call at a time.
    """
    for fn in fns:
        fn()
    calls = max(1, int(block / max(_seconds(fns[0]), 1e-7)))
    fns = [lambda fn=fn: _seconds(fn, calls) for fn in fns]
    ratios: list[list[float]] = [[] for _ in fns]
    for k in range(rounds):
        order = list(range(len(fns)))
        order = order[k % len(order):] + order[: k % len(order)]
        times = {i: _seconds(fns[i]) for i in order}
        for i in range(len(fns)):
            ratios[i].append(times[i] / times[0])
    return [statistics.median(r) for r in ratios]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__} | "
          f"{platform.processor() or platform.machine()} | threads {torch.get_num_threads()} | eval, no_grad")
    print("| layer | batch | rank | dense ms | ours / dense | factorized / dense | path |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, kwargs, height, width in SHAPES:
        dense = nn.Conv2d(**kwargs).eval()
        groups = kwargs.get("groups", 1)
        kh, kw = dense.kernel_size
        rank = cp_rank_for_ratio(dense.out_channels // groups, dense.in_channels // groups, kh, kw, 4)
        ours = CPConv2d(rank=rank, **kwargs).eval()
        forced = CPConv2d(rank=rank, **kwargs).eval()
        forced.evaluation = "factorized"
        for batch in (1, 64):
            x = torch.randn(batch, dense.in_channels, height, width)
            with torch.no_grad():
                dense_s = statistics.median(_seconds(lambda: dense(x)) for _ in range(3))
                _, r_ours, r_fact = interleaved_ratios([lambda: dense(x), lambda: ours(x), lambda: forced(x)],
                                                       args.rounds)
            path = "dense kernel" if ours._measured_dense(x) else "factorized"  # the remembered choice
            print(f"| {label} | {batch} | {rank} | {dense_s * 1e3:.2f} | {r_ours:.3f} | {r_fact:.3f} | {path} |",
                  flush=True)


if __name__ == "__main__":
    main()
