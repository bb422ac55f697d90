"""Benchmark CPConv2d against nn.Conv2d (CPU, forward+backward) and time CP-ALS.

Usage::

    python benchmarks/bench_cp_conv.py                 # layer table + CP-ALS table
    python benchmarks/bench_cp_conv.py --variants      # also every evaluation strategy
    python benchmarks/bench_cp_conv.py --skip-als      # layer table only
    python benchmarks/bench_cp_conv.py --tucker        # also Tucker2Conv2d at the same ratios

Layer rows (issue 15): C -> C 3x3 convs, 32x32 maps, batch 32, CP ranks that give ``--ratios``
fewer weights (``cp_rank_for_ratio``, weights only), forward + backward. Every ratio is a time over
nn.Conv2d's, all timed in the same run with ``torch.utils.benchmark`` (median of blocked runs),
``--repeats`` rounds interleaving the layers, median shown. ``FLOP limit`` is CPConv2d's factorized
FLOPs over dense (``torch.utils.flop_counter``, forward + backward; its conv-backward formula is
replaced by one that counts groups, see ``_conv_backward_flops``). Peers: a plain 4-conv CP
(``nn.Sequential`` of 1x1, kx1 depthwise, 1xk depthwise, 1x1: the seed's layer) and
tensorly-torch's ``FactorizedConv`` (cp, factorized) when the ``bench`` extra is installed. CP-ALS rows: wall time of ``cp_als`` (default
options) on a Gaussian kernel and the peak resident memory it adds on top of the process after
``import torch`` (RSS sampled every 5 ms), each in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ttcompress.decompose.cp import cp_rank_for_ratio
from ttcompress.decompose.tucker2 import tucker2_param_count
from ttcompress.layers.cp_conv import CPConv2d
from ttcompress.layers.tucker2_conv import Tucker2Conv2d

try:
    import tltorch
except ImportError:  # optional peer: pip install -e .[bench]
    tltorch = None

VARIANTS = {
    "four convs": (False, False),
    "fused dw": (True, False),
    "four convs, channels_last": (False, True),
    "fused dw, channels_last": (True, True),
}


class _CopiedChannelsLast(nn.Module):
    """The pre-issue-15 evaluation for an NCHW caller: copy the input to channels_last, run the
    chain there, copy the output back (autograd copies both gradients the same way)."""

    def __init__(self, layer: CPConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.contiguous(memory_format=torch.channels_last)).contiguous()


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).sum().backward()


def _conv_backward_flops(grad_out_shape: Sequence[int], x_shape: Sequence[int], w_shape: Sequence[int],
                        bias: object, stride: object, padding: object, dilation: object,
                        transposed: bool, output_padding: object, groups: int,
                        output_mask: Sequence[bool], out_shape: object = None, **kwargs: object) -> int:
    """``convolution_backward`` FLOPs, with groups counted.

    torch's own formula computes the weight gradient as an ungrouped conv over the batch, so for
    a depthwise conv it counts ``groups`` times the work done (a 142-channel depthwise pass showed
    up as 142x its forward). For a (non-transposed) conv each of the two gradients costs exactly
    what the forward costs: the same multiply-adds, re-associated.
    """
    if transposed:
        return flop_counter.conv_backward_flop(
            grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
            output_padding, groups, output_mask, out_shape, **kwargs)
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops(module: nn.Module, x: torch.Tensor) -> int:
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fwd_bwd(module, x)
    return counter.get_total_flops()


#: The clock the timings read: wall time, or with ``--clock cpu`` this process's CPU time (all its
#: threads), which a machine shared with other jobs disturbs far less than wall time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def time_it(module: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer(
        stmt="fwd_bwd(m, x)", globals={"fwd_bwd": fwd_bwd, "m": module, "x": x}, timer=_clock,
        num_threads=torch.get_num_threads(),  # Timer's own default is 1 thread
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def plain_cp(channels: int, rank: int) -> nn.Module:
    """The seed's CP layer: four ``nn.Conv2d`` in a row, 3x3 kernel, padding 1."""
    return nn.Sequential(
        nn.Conv2d(channels, rank, 1, bias=False),
        nn.Conv2d(rank, rank, (3, 1), padding=(1, 0), groups=rank, bias=False),
        nn.Conv2d(rank, rank, (1, 3), padding=(0, 1), groups=rank, bias=False),
        nn.Conv2d(rank, channels, 1),
    )


def interleaved_ratios(dense: nn.Module, peers: dict[str, nn.Module], x: torch.Tensor,
                       args: argparse.Namespace) -> dict[str, object]:
    """Time dense and every peer back to back, ``args.repeats`` rounds: the row's timing columns
    (median dense ms, each peer's median time over dense, the spread of ``ours``)."""
    ratios: dict[str, list[float]] = {name: [] for name in peers}
    dense_ms = []
    for _ in range(args.repeats):
        t_dense = time_it(dense, x, args.min_run_time)
        dense_ms.append(t_dense * 1e3)
        for name, module in peers.items():
            ratios[name].append(time_it(module, x, args.min_run_time) / t_dense)
    cols: dict[str, object] = {"dense ms": round(statistics.median(dense_ms), 1)}
    cols.update({f"{name} / dense": round(statistics.median(r), 3) for name, r in ratios.items()})
    cols["ours spread"] = f"{min(ratios['ours']):.3f}–{max(ratios['ours']):.3f}"
    return cols


def layer_rows(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for channels in args.channels:
        dense = nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(args.batch, channels, 32, 32, requires_grad=True)
        f_dense = flops(dense, x)
        for ratio in args.ratios:
            rank = cp_rank_for_ratio(channels, channels, 3, 3, ratio)
            layer = CPConv2d(channels, channels, 3, rank=rank, padding=1)
            peers: dict[str, nn.Module] = {"ours": layer, "plain 4-conv": plain_cp(channels, rank)}
            if tltorch is not None:
                peers["tltorch"] = tltorch.FactorizedConv(
                    channels, channels, 3, order=2, factorization="cp", rank=rank,
                    implementation="factorized", padding=1)
            if args.variants:
                for label, (fuse, cl) in VARIANTS.items():
                    variant = CPConv2d(channels, channels, 3, rank=rank, padding=1)
                    variant.fuse_spatial, variant.channels_last = fuse, cl
                    variant.evaluation = "factorized"
                    peers[label] = variant
                before = CPConv2d(channels, channels, 3, rank=rank, padding=1)
                before.evaluation = "factorized"
                peers["fused dw, channels_last by copies (before)"] = _CopiedChannelsLast(before)
            timing = interleaved_ratios(dense, peers, x, args)
            layer.evaluation = "factorized"
            flop_limit = flops(layer, x) / f_dense
            layer.evaluation = "auto"
            row = {
                "layer": f"{channels}->{channels} 3x3",
                "ratio": ratio,
                "rank": rank,
                "dense ms": timing.pop("dense ms"),
                "FLOP limit": round(flop_limit, 3),
                **timing,
            }
            row["our path"] = "dense kernel" if layer.uses_dense_kernel(args.batch, 32, 32) else "factorized"
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


class _TuckerModulePath(nn.Module):
    """The pre-issue-15 Tucker-2 evaluation: its three ``nn.Conv2d`` stages called in NCHW."""

    def __init__(self, layer: Tucker2Conv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.last(self.layer.core(self.layer.first(x)))


def tucker_rows(args: argparse.Namespace) -> list[dict]:
    """Tucker2Conv2d (equal ranks, the largest within ``ratio`` fewer weights) vs dense, fwd+bwd."""
    torch.manual_seed(0)
    rows = []
    for channels in args.channels:
        dense = nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(args.batch, channels, 32, 32, requires_grad=True)
        f_dense = flops(dense, x)
        for ratio in args.ratios:
            budget = channels * channels * 9 / ratio
            rank = max(r for r in range(1, channels + 1)
                       if tucker2_param_count(channels, channels, 3, 3, r, r) <= budget)
            layer = Tucker2Conv2d(channels, channels, 3, in_rank=rank, out_rank=rank, padding=1)
            peers = {"ours": layer, "three nn.Conv2d, NCHW (before)": _TuckerModulePath(layer)}
            timing = interleaved_ratios(dense, peers, x, args)
            row = {
                "layer": f"Tucker-2 {channels}->{channels} 3x3",
                "ratio": ratio,
                "ranks": f"{rank}, {rank}",
                "dense ms": timing.pop("dense ms"),
                "FLOP limit": round(flops(layer, x) / f_dense, 3),
                **timing,
            }
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


ALS_CHILD = """
import json, os, sys, threading, time, torch
from ttcompress.decompose.cp import cp_als

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

c_out, c_in, k, rank = map(int, sys.argv[1:5])
kernel = torch.randn(c_out, c_in, k, k, generator=torch.Generator().manual_seed(0))
cp_als(torch.randn(4, 4, 3, 3), rank=2, n_iter_max=2)  # imports and lazy setup out of the way
base = rss_mb()
peak = [base]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t = time.perf_counter()
res = cp_als(kernel, rank=rank)
dt = time.perf_counter() - t
done.set()
sampler.join()
print(json.dumps({"seconds": dt, "extra_mb": peak[0] - base, "before_mb": base,
                  "rel_error": res.rel_error, "n_iter": res.n_iter}))
"""


def als_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for c_out, c_in, k, rank in args.als_cases:
        out = subprocess.run(
            [sys.executable, "-c", ALS_CHILD, str(c_out), str(c_in), str(k), str(rank)],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "kernel": f"{c_out}x{c_in}x{k}x{k}",
                "rank": rank,
                "seconds": round(res["seconds"], 1),
                "ALS iters": res["n_iter"],
                "s / iter": round(res["seconds"] / max(res["n_iter"], 1), 3),
                "peak extra RSS MB": round(res["extra_mb"]),
                "RSS before MB": round(res["before_mb"]),
                "rel_error": round(res["rel_error"], 4),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--ratios", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--variants", action="store_true", help="time every evaluation strategy"
    )
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--tucker", action="store_true", help="also time Tucker2Conv2d at the same ratios")
    parser.add_argument("--skip-als", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.als_cases = [
        (64, 64, 3, 32),
        (128, 128, 3, 64),
        (256, 256, 3, 128),
        (512, 512, 3, 256),
    ]

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__} | "
        f"{platform.processor() or platform.machine()} | threads {torch.get_num_threads()} | "
        f"{args.clock} clock"
    )
    print(f"# command: python {' '.join(sys.argv)}\n")
    if not args.skip_layers:
        print(markdown(layer_rows(args)) + "\n")
    if args.tucker:
        print(markdown(tucker_rows(args)) + "\n")
    if not args.skip_als:
        print(markdown(als_rows(args)))


if __name__ == "__main__":
    main()
