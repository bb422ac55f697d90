"""Accuracy of compressed seed-cnn models with and without calibration, before and after fine-tuning.

Usage (from the repository root; needs a dense checkpoint, e.g. from
``ttcompress train --arch seed-cnn --epochs 3 --seed 0 -o base.pt``)::

    python benchmarks/calibration.py base.pt --data mnist-5k [--finetune] [--samples 128,512,2048]

Prints a Markdown table: case, calibration, params ratio, val accuracy before fine-tuning and
(with ``--finetune``) after ``--epochs`` epochs with the given optimizer / lr / schedule, with
distillation from the dense model unless ``--no-distill``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from ttcompress.checkpoint import io as tio
from ttcompress.data import balanced_subset, load_dataset
from ttcompress.report.evaluation import evaluate
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.compression.pipeline import compress_with_report
from ttcompress.training import FinetuneConfig, finetune

CASES = {
    "readme (CP r3 + TT r4)": Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=3)),
    "TT r8 + CP r3": Plan(tt=TTSettings(ranks=8), cp=CPSettings(rank=3)),
    "target ratio 10": Plan(target_ratio=10.0),
    "target ratio 4": Plan(target_ratio=4.0),
    "CP r3 conv only": Plan(cp=CPSettings(rank=3), layers=("features.*",)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", default="mnist-5k")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--samples", default="512")
    ap.add_argument("--finetune", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--optimizer", default=FinetuneConfig.optimizer)
    ap.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    ap.add_argument("--schedule", default=FinetuneConfig.schedule)
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--uncalibrated", action="store_true", help="also run without calibration")
    args = ap.parse_args()
    bundle = load_dataset(args.data)
    dense = tio.load(args.model)
    base = evaluate(dense, bundle).accuracy
    print(f"dense: {base:.2%} test top-1 ({sum(p.numel() for p in dense.parameters())} params)", file=sys.stderr)
    print("| case | calibration | ratio | before fine-tuning | after fine-tuning |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        plan = CASES[case]
        runs = [None] if args.uncalibrated else []
        runs += [int(n) for n in args.samples.split(",")]
        for n in runs:
            model = copy.deepcopy(dense)
            calib = None if n is None else balanced_subset(bundle.train, n, seed=0)
            result = compress_with_report(model, plan, calib_data=calib)
            before = evaluate(result.model, bundle).accuracy
            after = "–"
            if args.finetune:
                cfg = FinetuneConfig(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr,
                                     schedule=args.schedule, seed=0)
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "ft.pt"
                    teacher = None if args.no_distill else copy.deepcopy(dense)
                    finetune(result.model, bundle, output=out, config=cfg, teacher=teacher)
                    after = f"{evaluate(tio.load(out), bundle).accuracy:.2%}"
            label = "none" if n is None else f"{n} samples"
            print(f"| {case} | {label} | {result.ratio:.1f}x | {before:.2%} | {after} |", flush=True)


if __name__ == "__main__":
    main()
