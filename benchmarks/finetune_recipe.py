"""Grid over fine-tuning recipes for compressed models: how :class:`FinetuneConfig`'s defaults were chosen.

Usage (from the repository root; dense checkpoints e.g. from
``ttcompress train --arch seed-cnn --epochs 3 --seed S -o baseS.pt``)::

    python benchmarks/finetune_recipe.py base0.pt base1.pt --case readme \\
        --recipe "default" --recipe "lr=3e-3,schedule=warmup-cosine" ...

Each dense model is compressed once (calibrated on ``--calib-samples`` balanced training samples,
seed 0, as ``decompose --data``), then fine-tuned from that same compressed model with each
recipe, distilled from the dense model (as ``finetune`` does by default). A recipe is
``key=value`` pairs overriding :class:`~ttcompress.training.FinetuneConfig` fields; ``default``
is the defaults as they stand. The fine-tuning seed is the dense model's index in the list.
Prints one Markdown row per recipe: test top-1 of each model before and after fine-tuning (the
best checkpoint by validation accuracy on the held-out part of the training split, as
``finetune -o`` writes it), the mean drop from the dense models and the worst one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ttcompress.checkpoint import io as tio
from ttcompress.data import balanced_subset, load_dataset
from ttcompress.report.evaluation import evaluate
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.compression.pipeline import compress_with_report
from ttcompress.training import FinetuneConfig, finetune

CASES = {
    "readme": Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=3)),
    "ratio10": Plan(target_ratio=10.0),
    "tt8cp3": Plan(tt=TTSettings(ranks=8), cp=CPSettings(rank=3)),
    "cp3conv": Plan(cp=CPSettings(rank=3), layers=("features.*",)),
}


def parse_recipe(text: str) -> dict[str, Any]:
    """``"key=value,..."`` as FinetuneConfig overrides (values typed like the defaults); ``default`` is {}."""
    if text.strip() == "default":
        return {}
    types = {f.name: type(getattr(FinetuneConfig, f.name)) for f in dataclasses.fields(FinetuneConfig)}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in types:
            raise SystemExit(f"unknown FinetuneConfig field {key!r}")
        kind = types[key]
        out[key] = value if kind is str else (int(value) if kind is int else float(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="mnist-5k")
    ap.add_argument("--case", default="readme", choices=sorted(CASES))
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--recipe", action="append", default=[], help="key=value,... (repeatable); 'default'")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_dataset(args.data)
    calib = balanced_subset(bundle.train, args.calib_samples, seed=0) if args.calib_samples else None
    denses, compressed, dense_acc, before = [], [], [], []
    for path in args.models:
        dense = tio.load(path)
        denses.append(dense)
        dense_acc.append(evaluate(dense, bundle).accuracy)
        result = compress_with_report(copy.deepcopy(dense), CASES[args.case], calib_data=calib)
        compressed.append(result.model)
        before.append(evaluate(result.model, bundle).accuracy)
        print(f"{path}: dense {dense_acc[-1]:.2%}, compressed {result.ratio:.1f}x {before[-1]:.2%}", file=sys.stderr)
    print("| recipe | " + " | ".join(f"model {i}: dense → before → after" for i in range(len(denses)))
          + " | mean drop | worst drop | s |")
    print("|---" * (len(denses) + 4) + "|")
    for text in args.recipe or ["default"]:
        overrides = parse_recipe(text)
        cells, drops = [], []
        t0 = time.perf_counter()
        for i, (dense, model) in enumerate(zip(denses, compressed)):
            config = FinetuneConfig(**{"seed": i, **overrides})
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "ft.pt"
                try:
                    finetune(copy.deepcopy(model), bundle, output=out, config=config, teacher=copy.deepcopy(dense))
                    after = evaluate(tio.load(out), bundle).accuracy
                except Exception as exc:  # a diverged recipe is a result, not a crash of the grid
                    print(f"{text}: {exc}", file=sys.stderr)
                    after = float("nan")
            drops.append(dense_acc[i] - after)
            cells.append(f"{dense_acc[i]:.1%} → {before[i]:.1%} → {after:.1%}")
        mean = statistics.fmean(drops)
        print(f"| {text} | " + " | ".join(cells)
              + f" | {100 * mean:.2f} pp | {100 * max(drops):.2f} pp | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
