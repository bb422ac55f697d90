"""Whole models: decomposition time, eval latency (dense vs compressed) and size per export format.

For each model (random weights; what is measured does not depend on training):

* decompose: ``ttcompress.compress_with_report`` at ``--target-ratio`` (the ``auto`` format picks
  per layer), wall time;
* eval latency at batch 1 and 64: median of ``torch.utils.benchmark`` blocked_autorange, dense and
  compressed interleaved in one process (``--rounds`` rounds; the ratio is the median of the
  per-round ratios), eval mode, no grad;
* size on disk: the ttcompress checkpoint, ONNX, TorchScript and the dense merge-back.

Run: ``python benchmarks/bench_models.py [--models resnet18,resnet50,vit,crepe] [--threads 2]
[--rounds 3] [--min-run-time 0.3] [--crepe-capacity 32]``.
Results go into docs/benchmarks.md ("Whole models").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ttcompress
from ttcompress.export import export_model
from ttcompress.checkpoint.io import update_meta
from ttcompress.report.measure import count_params, measure_latency
from ttcompress.compression.plan import Plan


def crepe(capacity: int = 32) -> nn.Sequential:
    """The CREPE pitch tracker (Kim et al. 2018, "CREPE: A Convolutional Representation for Pitch
    Estimation"): six convs with (k, 1) kernels over a 1024-sample frame; capacity 32 ("full") has
    1024-channel first layer and 22M parameters."""
    filters = [n * capacity for n in (32, 4, 4, 4, 8, 16)]
    widths = [512, 64, 64, 64, 64, 64]
    strides = [4, 1, 1, 1, 1, 1]
    layers: list[nn.Module] = []
    channels = 1
    for f, w, s in zip(filters, widths, strides):
        layers += [nn.ZeroPad2d((0, 0, (w - 1) // 2, w // 2)), nn.Conv2d(channels, f, (w, 1), stride=(s, 1)),
                   nn.ReLU(), nn.BatchNorm2d(f), nn.MaxPool2d((2, 1)), nn.Dropout(0.25)]
        channels = f
    layers += [nn.Flatten(), nn.Linear(channels * 4, 360), nn.Sigmoid()]
    return nn.Sequential(*layers)


def build(name: str, *, crepe_capacity: int = 32) -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10), (3, 96, 96)
    if name == "resnet50":
        return torchvision.models.resnet50(num_classes=10), (3, 96, 96)
    if name == "vit":
        return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                    hidden_dim=256, mlp_dim=1024, num_classes=10), (3, 32, 32)
    if name == "crepe":
        return crepe(crepe_capacity), (1, 1024, 1)
    raise SystemExit(f"unknown model {name!r}")


def latency_ratio(dense: nn.Module, ours: nn.Module, shape: tuple[int, ...], batch: int, rounds: int,
                  min_run_time: float) -> tuple[float, float, float]:
    d, o, r = [], [], []
    for _ in range(rounds):
        dm, _ = measure_latency(dense, shape, batch_size=batch, min_run_time=min_run_time)
        om, _ = measure_latency(ours, shape, batch_size=batch, min_run_time=min_run_time)
        d.append(dm), o.append(om), r.append(om / dm)
    return statistics.median(d), statistics.median(o), statistics.median(r)


def sizes(model: nn.Module, shape: tuple[int, ...], tmp: Path) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    out["tt.pt"] = ttcompress.save(model, tmp / "m.tt.pt").stat().st_size
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.ts"), ("dense", "m.dense.tt.pt")):
        try:
            out[fmt] = export_model(model, tmp / name, format=fmt, input_shape=shape, batch_size=2).size_bytes
        except Exception as exc:  # a benchmark reports what failed rather than stopping
            out[fmt] = f"failed: {type(exc).__name__}"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit,crepe")
    parser.add_argument("--target-ratio", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--crepe-capacity", type=int, default=32,
                        help="CREPE width multiplier (32: the 22M-parameter 'full' model; 8 or 16: smaller)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, target ratio {args.target_ratio}", flush=True)
    header = ("| model | input | params dense → ours | decompose s | b1 dense ms | b1 ours/dense | b64 dense ms | "
              "b64 ours/dense | .tt.pt | onnx | torchscript | dense export |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.models.split(","):
        dense, shape = build(name, crepe_capacity=args.crepe_capacity)
        dense.eval()
        start = time.perf_counter()
        result = ttcompress.compress_with_report(copy.deepcopy(dense), Plan(target_ratio=args.target_ratio))
        seconds = time.perf_counter() - start
        ours = result.model.eval()
        update_meta(ours, info={"input_shape": list(shape)})
        b1 = latency_ratio(dense, ours, shape, 1, args.rounds, args.min_run_time)
        b64 = latency_ratio(dense, ours, shape, 64, args.rounds, args.min_run_time)
        with tempfile.TemporaryDirectory() as tmp:
            size = sizes(ours, shape, Path(tmp))

        def fmt(v: int | str) -> str:
            return f"{v / 1e6:.2f} MB" if isinstance(v, int) else v

        print(f"| {name} | {'×'.join(map(str, shape))} | {count_params(dense):,} → {count_params(ours):,} "
              f"({count_params(dense) / count_params(ours):.2f}×) | {seconds:.1f} | {b1[0]:.2f} | {b1[2]:.2f} | "
              f"{b64[0]:.1f} | {b64[2]:.2f} | {fmt(size['tt.pt'])} | {fmt(size['onnx'])} | "
              f"{fmt(size['torchscript'])} | {fmt(size['dense'])} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
