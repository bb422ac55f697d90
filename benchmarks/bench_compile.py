"""``torch.compile`` on TTLinear and CPConv2d: compile time, then steady-state fwd+bwd vs eager.

For each layer and backend: the wall time of the first forward + backward (tracing and compiling
included), then the median steady-state time of the compiled layer over the eager one, interleaved
in one process (``--rounds`` rounds).

Usage::

    python benchmarks/bench_compile.py [--backends aot_eager inductor] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ttcompress.layers.cp_conv import CPConv2d
from ttcompress.layers.tt_linear import TTLinear


def _step(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, torch.Tensor]] = [
        ("TTLinear 4096², rank 8, batch 256",
         TTLinear(4096, 4096, ranks=8, in_modes=(8,) * 4, out_modes=(8,) * 4),
         torch.randn(256, 4096, requires_grad=True)),
        ("CPConv2d 128→128 3×3 at 8×, batch 32", CPConv2d(128, 128, 3, rank=70, padding=1),
         torch.randn(32, 128, 32, 32, requires_grad=True)),
    ]
    print(f"# torch {torch.__version__} | threads {torch.get_num_threads()} | fwd+bwd, float32")
    print("| layer | backend | first call s | compiled / eager (steady) |")
    print("|---|---|---:|---:|")
    for label, layer, x in cases:
        for backend in args.backends:
            torch._dynamo.reset()
            compiled = torch.compile(layer, backend=backend)
            try:
                first = _step(compiled, x)
            except Exception as exc:  # noqa: BLE001 -- report the backend's failure in the table
                print(f"| {label} | {backend} | failed: {type(exc).__name__} | – |", flush=True)
                continue
            _step(layer, x)
            ratios = []
            for _ in range(args.rounds):
                eager_s, compiled_s = _step(layer, x), _step(compiled, x)
                ratios.append(compiled_s / eager_s)
            print(f"| {label} | {backend} | {first:.1f} | {statistics.median(ratios):.2f} |", flush=True)


if __name__ == "__main__":
    main()
