"""Epoch time of fine-tuning a compressed seed-cnn vs training the dense seed-cnn (issue 5, section 7).

Setup: mnist-5k (4,000 training digits), batch 64, Adam, CPU float32, ``--threads`` intra-op
threads. Trains the dense baseline for ``--epochs`` epochs, compresses it with
:func:`ttcompress.surgery.compress` (CP rank ``--cp-rank`` on the convs, TT rank ``--tt-rank`` on the
Linear layers; TT only when CPConv2d is not available), then fine-tunes it for ``--epochs``
epochs. Reports the median training time per epoch (validation excluded), throughput, accuracy
and the ratio, as a Markdown table on stdout, and with ``--write`` into
``docs/benchmarks-train.md``.

Usage::

    python benchmarks/bench_finetune.py [--epochs 3] [--threads 1] [--tt-rank 4] [--cp-rank 3] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from ttcompress.data import load_dataset
from ttcompress.models import build_arch
from ttcompress.train import FinetuneConfig, TrainConfig, evaluate, finetune, train


def _compress(model: torch.nn.Module, *, tt_rank: int, cp_rank: int) -> tuple[torch.nn.Module, str]:
    from ttcompress.plan import CPSettings, Plan, TTSettings
    from ttcompress.surgery import compress

    try:
        import ttcompress.layers.cp_conv  # noqa: F401

        plan = Plan(tt=TTSettings(ranks=tt_rank), cp=CPSettings(rank=cp_rank))
        what = f"CP rank {cp_rank} (convs) + TT rank {tt_rank} (Linear)"
    except ImportError:
        plan = Plan(tt=TTSettings(ranks=tt_rank), layers=("classifier.*",))
        what = f"TT rank {tt_rank} (Linear only: CPConv2d not available)"
    return compress(model, plan), what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tt-rank", type=int, default=4)
    parser.add_argument("--cp-rank", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks-train.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_dataset("mnist-5k")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dense = build_arch("seed-cnn")
        n_dense = sum(p.numel() for p in dense.parameters())
        r_dense = train(dense, bundle, output=Path(tmp) / "dense.pt",
                        config=TrainConfig(epochs=args.epochs, device="cpu"))  # fmt: skip
        model, what = _compress(dense, tt_rank=args.tt_rank, cp_rank=args.cp_rank)
        n_comp = sum(p.numel() for p in model.parameters())
        acc_before = evaluate(model, bundle).accuracy
        r_ft = finetune(model, bundle, output=Path(tmp) / "ft.pt",
                        config=FinetuneConfig(epochs=args.epochs, lr=1e-3, device="cpu"))  # fmt: skip

    def median(r: object, key: str) -> float:
        return statistics.median(getattr(e, key) for e in r.history)  # type: ignore[attr-defined]

    t_dense, t_ft = median(r_dense, "seconds"), median(r_ft, "seconds")
    rows = [
        ("train dense seed-cnn", n_dense, t_dense, median(r_dense, "samples_per_s"), None, r_dense.history[-1].val_accuracy),
        (f"fine-tune compressed ({what})", n_comp, t_ft, median(r_ft, "samples_per_s"), acc_before,
         r_ft.history[-1].val_accuracy),
    ]  # fmt: skip
    cmd = "python benchmarks/bench_finetune.py " + " ".join(sys.argv[1:])
    lines = [
        "| run | params | epoch time (s, median) | samples/s | acc before | acc after |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, n, t, sps, before, after in rows:
        b = "-" if before is None else f"{100 * before:.2f}%"
        lines.append(f"| {name} | {n:,} | {t:.2f} | {sps:,.0f} | {b} | {100 * after:.2f}% |")
    lines.append("")
    lines.append(f"Ratio fine-tune / dense epoch time: **{t_ft / t_dense:.2f}×**")
    table = "\n".join(lines)
    print(table)
    if args.write:
        machine = f"{platform.machine()}, {os.cpu_count()} shared CPU cores, torch {torch.__version__}, {args.threads} thread(s)"
        doc = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-train.md"
        doc.parent.mkdir(exist_ok=True)
        doc.write_text(
            "# Benchmark: fine-tuning vs training epoch time\n\n"
            f"Date: {datetime.date.today().isoformat()}  \n"
            f"Machine: {machine}  \n"
            f"Command: `{cmd}`  \n"
            f"Setup: mnist-5k (4,000 train / 1,000 test), batch 64, Adam (train lr 1e-3, fine-tune lr 1e-3), "
            f"{args.epochs} epochs each; epoch time = training loop only (validation excluded), median over epochs.\n\n"
            f"{table}\n\n"
            "GPU throughput: not measured (no GPU on this machine). On a CUDA box run e.g. "
            "`ttcompress finetune MODEL --device cuda --amp bf16 --data cifar10 --data-root DIR --json` and read "
            "`samples_per_s` from the metrics log.\n\n"
            "Note: the machine is shared by several jobs; timings are noisy (one intra-op thread keeps them "
            "steadier). Tiny models like seed-cnn are dominated by per-batch overhead (data, optimizer, Python), "
            "so the compressed model's epoch takes about as long as the dense one's; the TT/CP forward pays off "
            "for large layers (see the TT layer benchmark).\n"
        )
        print(f"wrote {doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
