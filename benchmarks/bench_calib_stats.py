"""Calibration statistics alone: wall time and peak RSS of collecting (and fitting on) one wide layer.

Each case runs in a fresh subprocess so that its peak RSS (``VmHWM``) is its own::

    python benchmarks/bench_calib_stats.py conv      # Conv2d(1024, 128, (64, 1)), 256 inputs (16,384 rows, K = 65,536)
    python benchmarks/bench_calib_stats.py linear    # Linear(4096, 11008), 16,384 token rows, SVD rank 16 fit
    python benchmarks/bench_calib_stats.py all

The statistics are kept as :class:`ttcompress.calibration.collector.StatsCollector` chooses under
the default budget (a quarter of the available memory). Results: docs/benchmarks.md (issue 25).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _case(name: str) -> dict:
    import torch
    from torch import nn

    from ttcompress.calibration.collector import StatsCollector
    from ttcompress.calibration.fit import output_error, whitened_lowrank

    torch.manual_seed(0)
    if name == "conv":
        layer = nn.Conv2d(1024, 128, (64, 1), padding="same")
        data = torch.randn(256, 1024, 64, 1)
        rank = 128
    else:
        layer = nn.Linear(4096, 11008)
        data = torch.randn(32, 512, 4096) @ (torch.randn(4096, 4096) / 64)  # correlated token rows
        rank = 16
    model = nn.Sequential(layer)
    start = time.perf_counter()
    coll = StatsCollector(list(data.split(32)))
    stats, choice = coll.layer_stats(model, model, "0", rank=rank)
    t_stats = time.perf_counter() - start
    out = {"case": name, "choice": choice.kind, "sketch_rows": choice.rows, "stats_bytes": choice.bytes,
           "rows": stats.count, "stats_s": round(t_stats, 1)}
    if name == "linear":
        start = time.perf_counter()
        w = layer.weight.detach()
        a, b = whitened_lowrank(w, stats.centered(), rank)
        out["fit_s"] = round(time.perf_counter() - start, 1)
        out["out_error"] = round(output_error(w, a @ b, stats), 4)
    out["peak_rss_mb"] = round(_peak_rss_mb())
    return out


def main(argv: list[str]) -> None:
    which = argv[1] if len(argv) > 1 else "all"
    if which in ("conv", "linear") and len(argv) > 2 and argv[2] == "--child":
        print(json.dumps(_case(which)))
        return
    for case in (("conv", "linear") if which == "all" else (which,)):
        start = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, case, "--child"], capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv)
