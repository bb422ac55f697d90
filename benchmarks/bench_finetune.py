"""Epoch time of fine-tuning a compressed seed-cnn vs training the dense seed-cnn (issue 5, section 7).

Setup: mnist-5k (3,600 training digits after the 10 % validation hold-out), batch 64, Adam, CPU
float32, ``--threads`` intra-op threads. Trains the dense baseline for ``--epochs`` epochs, compresses it with
:func:`ttcompress.compression.pipeline.compress` (CP rank ``--cp-rank`` on the convs, TT rank ``--tt-rank`` on the
Linear layers), then fine-tunes it for ``--epochs`` epochs. Prints the median training time per
epoch (validation excluded), throughput, test accuracy before and after, and the ratio, as a
Markdown table (results: ``docs/benchmarks.md``).

Usage::

    python benchmarks/bench_finetune.py [--epochs 3] [--threads 1] [--tt-rank 4] [--cp-rank 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from ttcompress.data import load_dataset
from ttcompress.checkpoint.models import build_arch
from ttcompress.report.evaluation import evaluate
from ttcompress.training import FinetuneConfig, TrainConfig, finetune, train


def _compress(model: torch.nn.Module, *, tt_rank: int, cp_rank: int) -> tuple[torch.nn.Module, str]:
    from ttcompress.compression.plan import CPSettings, Plan, TTSettings
    from ttcompress.compression.pipeline import compress

    plan = Plan(tt=TTSettings(ranks=tt_rank), cp=CPSettings(rank=cp_rank))
    return compress(model, plan), f"CP rank {cp_rank} (convs) + TT rank {tt_rank} (Linear)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tt-rank", type=int, default=4)
    parser.add_argument("--cp-rank", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_dataset("mnist-5k")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dense = build_arch("seed-cnn")
        n_dense = sum(p.numel() for p in dense.parameters())
        r_dense = train(dense, bundle, output=Path(tmp) / "dense.pt",
                        config=TrainConfig(epochs=args.epochs, device="cpu"))  # fmt: skip
        acc_dense = evaluate(dense, bundle).accuracy  # test split, last epoch
        model, what = _compress(dense, tt_rank=args.tt_rank, cp_rank=args.cp_rank)
        n_comp = sum(p.numel() for p in model.parameters())
        acc_before = evaluate(model, bundle).accuracy
        r_ft = finetune(model, bundle, output=Path(tmp) / "ft.pt",
                        config=FinetuneConfig(epochs=args.epochs, lr=1e-3, device="cpu"))  # fmt: skip
        acc_after = evaluate(model, bundle).accuracy

    def median(r: object, key: str) -> float:
        return statistics.median(getattr(e, key) for e in r.history)  # type: ignore[attr-defined]

    t_dense, t_ft = median(r_dense, "seconds"), median(r_ft, "seconds")
    rows = [
        ("train dense seed-cnn", n_dense, t_dense, median(r_dense, "samples_per_s"), None, acc_dense),
        (f"fine-tune compressed ({what})", n_comp, t_ft, median(r_ft, "samples_per_s"), acc_before, acc_after),
    ]  # fmt: skip
    lines = [
        "| run | params | epoch time (s, median) | samples/s | test acc before | test acc after |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, n, t, sps, before, after in rows:
        b = "-" if before is None else f"{100 * before:.2f}%"
        lines.append(f"| {name} | {n:,} | {t:.2f} | {sps:,.0f} | {b} | {100 * after:.2f}% |")
    lines.append("")
    lines.append(f"Ratio fine-tune / dense epoch time: **{t_ft / t_dense:.2f}×**")
    table = "\n".join(lines)
    print(table)


if __name__ == "__main__":
    main()
