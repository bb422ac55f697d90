"""Forward+backward time of TTLinear vs nn.Linear and peers (issues 2 and 15).

Setup: 4096 x 4096, modes 8*8*8*8, ranks 4/8/16, batch 64/256, CPU float32, all in one run.
Prints one Markdown table: time ratios to dense (median of ``--repeats`` timing rounds, each round
timing every layer one after the other) beside the FLOP limit (TTLinear's forward + backward FLOPs
over dense's, ``torch.utils.flop_counter``). Peers: the seed's single ``torch.einsum`` TT layer and
tensorly-torch's ``FactorizedLinear`` (blocktt, factorized implementation) when the ``bench`` extra
is installed (``pip install -e .[bench]``).

Usage::

    python benchmarks/bench_tt_linear.py [--min-run-time 1.0] [--repeats 3] [--threads N] [--clock cpu]
"""

from __future__ import annotations

import argparse
import math
import datetime
import os
import platform
import statistics
import string
from collections.abc import Sequence
import time

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from ttcompress.layers.tt_linear import TTLinear

try:
    import tltorch
except ImportError:  # optional peer: pip install -e .[bench]
    tltorch = None


class EinsumTT(nn.Module):
    """The common TT-layer implementation: one ``torch.einsum`` over the input and all cores."""

    def __init__(self, layer: TTLinear) -> None:
        super().__init__()
        self.cores = nn.ParameterList(nn.Parameter(c.detach().clone()) for c in layer.cores)
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.in_modes, self.out_modes = layer.in_modes, layer.out_modes
        d = len(self.in_modes)
        letters = iter(string.ascii_letters)
        ins = [next(letters) for _ in range(d)]
        outs = [next(letters) for _ in range(d)]
        rs = [next(letters) for _ in range(d + 1)]
        terms = ["Z" + "".join(ins)] + [rs[k] + outs[k] + ins[k] + rs[k + 1] for k in range(d)]
        self.equation = ",".join(terms) + "->Z" + "".join(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum(self.equation, x.reshape(x.shape[0], *self.in_modes), *self.cores)
        return y.reshape(x.shape[0], -1) + self.bias


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


# The flop counter knows addmm and baddbmm but not their in-place forms, which TTLinear's backward
# uses to accumulate the weight gradients over row chunks: 2 FLOPs per multiply-add, as for mm/bmm.
def _matmul_acc_flops(acc_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int],
                      *args: object, **kwargs: object) -> int:
    return 2 * math.prod(a_shape) * b_shape[-1]


_INPLACE_FLOPS = {torch.ops.aten.addmm_: _matmul_acc_flops, torch.ops.aten.baddbmm_: _matmul_acc_flops}


def _flops(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    with FlopCounterMode(display=False, custom_mapping=_INPLACE_FLOPS) as counter:
        _step(module, x, grad)
    return counter.get_total_flops()


#: The clock the timings read: wall time, or with ``--clock cpu`` this process's CPU time (all its
#: threads), which a machine shared with other jobs disturbs far less than wall time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer("step(m, x, g)", globals={"step": _step, "m": module, "x": x, "g": grad},
                            timer=_clock, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds; the median ratio is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", default=["64/4", "64/8", "256/8", "256/16"],
                        help="batch/rank pairs (default: the issue-15 table)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, modes = 4096, (8, 8, 8, 8)
    print(f"# {datetime.date.today()} | torch {torch.__version__} | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads | float32 fwd+bwd "
          f"| {args.clock} clock | load average {os.getloadavg()[0]:.1f}")
    print("| batch | rank | TT params | dense ms | FLOP limit | TTLinear / dense (spread) | tltorch / dense "
          "| einsum / dense | FLOPs einsum / dense | TTLinear plan |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    dense = nn.Linear(size, size)
    for case in args.cases:
        batch, rank = (int(v) for v in case.split("/"))
        x = torch.randn(batch, size, requires_grad=True)
        grad = torch.randn(batch, size)
        tt = TTLinear(size, size, ranks=rank, in_modes=modes, out_modes=modes)
        ein = EinsumTT(tt)
        peer = None if tltorch is None else tltorch.FactorizedLinear(
            modes, modes, factorization="blocktt", rank=tt.ranks, implementation="factorized")
        ratios_tt, ratios_ein, ratios_peer, dense_ms = [], [], [], []
        for _ in range(args.repeats):
            t_dense = _time(dense, x, grad, args.min_run_time)
            ratios_tt.append(_time(tt, x, grad, args.min_run_time) / t_dense)
            ratios_ein.append(_time(ein, x, grad, args.min_run_time) / t_dense)
            if peer is not None:
                ratios_peer.append(_time(peer, x, grad, args.min_run_time) / t_dense)
            dense_ms.append(t_dense * 1e3)
        peer_cell = f"{statistics.median(ratios_peer):.3f}" if ratios_peer else "n/a"
        f_dense = _flops(dense, x, grad)
        plan = tt.forward_plan(batch)
        groups = "+".join(f"{b - a}" for a, b in plan.groups) + f", chunk {plan.chunk_rows}"
        print(f"| {batch} | {rank} | {sum(p.numel() for p in tt.parameters())} "
              f"| {statistics.median(dense_ms):.1f} | {_flops(tt, x, grad) / f_dense:.3f} "
              f"| {statistics.median(ratios_tt):.3f} ({min(ratios_tt):.3f}–{max(ratios_tt):.3f}) | {peer_cell} | {statistics.median(ratios_ein):.3f} "
              f"| {_flops(ein, x, grad) / f_dense:.3f} "
              f"| cores {groups} |", flush=True)


if __name__ == "__main__":
    main()
