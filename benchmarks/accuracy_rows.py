"""Issue-10 evidence rows: accuracy before/after fine-tuning, with and without calibration, side by side.

Usage (from the repository root)::

    python benchmarks/accuracy_rows.py --case ratio10 --dense base.pt            # a trained seed-cnn
    python benchmarks/accuracy_rows.py --case cp3-conv --dense-epochs 20 --finetune-epochs 10 --seeds 0 1
    python benchmarks/accuracy_rows.py --case tt-thesis --dense-epochs 10 --finetune-epochs 10 --seeds 0 1
    python benchmarks/accuracy_rows.py --case ratio4 --data fashion-mnist --dense-epochs 3 --no-finetune

Cases: ``ratio10`` / ``ratio4`` (``Plan(target_ratio=…)``, whole model, auto formats),
``cp3-conv`` (the CP paper's rank-3 CP of the two convs only, as ``--cp-ranks 3 --layers
'features.*'``), ``tt-thesis`` (the TT thesis' TT-TT-TT net, 30,574 params, by TT-SVD of a trained
``seed-fc3`` at the modes of ``benchmarks/reproduce_tt_thesis.py``). The dense model is compressed
twice (no calibration; calibrated on ``--calib-samples`` balanced training samples, seed 0, as
``decompose --data``), each evaluated on the test split, then (unless ``--no-finetune``)
fine-tuned with :class:`~ttcompress.training.FinetuneConfig`'s defaults (``--finetune-epochs``
overrides its 3 epochs) distilled from the dense model, as ``finetune`` does by default, and
evaluated again (the checkpoint ``finetune -o`` writes: best on the held-out part of the training
split). Prints one Markdown row per seed of ``--seeds`` (default 0), which sets the calibration
samples, the CP-ALS start and the fine-tuning seed, then the mean and range of the calibrated drop.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ttcompress.checkpoint import io as tio
from ttcompress.data import DatasetBundle, balanced_subset, load_dataset
from ttcompress.report.evaluation import evaluate
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import CPSettings, Plan
from ttcompress.compression.pipeline import compress_with_report
from ttcompress.training import FinetuneConfig, TrainConfig, finetune, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_tt_thesis import tt_plan  # noqa: E402  (a sibling script, not a package)

CASES: dict[str, tuple[str, Plan]] = {
    "ratio10": ("seed-cnn", Plan(target_ratio=10.0)),
    "ratio4": ("seed-cnn", Plan(target_ratio=4.0)),
    "cp3-conv": ("seed-cnn", Plan(cp=CPSettings(rank=3), layers=("features.*",))),
    # min_saving=0: every layer the thesis puts in TT stays TT (the keep-dense rule would keep the
    # 2048 -> 10 output layer dense when calibrated, giving TT-TT-FC's 50,622 params instead).
    "tt-thesis": ("seed-fc3", dataclasses.replace(tt_plan("TT-TT-TT"), min_saving=0.0)),
}


def dense_model(arch: str, bundle: DatasetBundle, *, epochs: int, out: Path) -> nn.Module:
    """``arch`` trained from seed 0: Adam 1e-3 (seed-cnn) or the thesis' SGD 1e-3, momentum 0.9 (seed-fc3)."""
    torch.manual_seed(0)
    model = build_arch(arch, kwargs={"num_classes": bundle.num_classes})
    config = TrainConfig(epochs=epochs, seed=0, device="cpu")
    if arch == "seed-fc3":
        config = TrainConfig(epochs=epochs, seed=0, device="cpu", optimizer="sgd", lr=1e-3, momentum=0.9)
    train(model, bundle, output=out, config=config)
    return tio.load(out)


def seeded(plan: Plan, seed: int) -> Plan:
    """``plan`` with CP-ALS started from ``seed`` (TT-SVD is deterministic; plans without CP are unchanged)."""
    if plan.cp is None:
        return plan
    return dataclasses.replace(plan, cp=dataclasses.replace(plan.cp, options=(*plan.cp.options, ("seed", seed))))


def one_side(dense: nn.Module, plan: Plan, bundle: DatasetBundle, *, calib: object, tune: bool,
             config: FinetuneConfig) -> dict[str, object]:
    """Compress a copy of ``dense`` (calibrated when ``calib`` is not None), evaluate, fine-tune, evaluate."""
    t0 = time.perf_counter()
    result = compress_with_report(copy.deepcopy(dense), plan, calib_data=calib)
    seconds = time.perf_counter() - t0
    row: dict[str, object] = {"ratio": result.ratio, "before": evaluate(result.model, bundle).accuracy,
                              "after": None, "params": sum(p.numel() for p in result.model.parameters()),
                              "compress_s": seconds}
    if tune:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ft.pt"
            finetune(result.model, bundle, output=out, config=config, teacher=copy.deepcopy(dense))
            row["after"] = evaluate(tio.load(out), bundle).accuracy
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--data", default="mnist-5k")
    ap.add_argument("--dense", default=None, help="a trained dense checkpoint (else one is trained)")
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="fine-tuning epochs (default: FinetuneConfig's, 3)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one row per seed: calibration samples, CP-ALS start and fine-tuning")
    ap.add_argument("--calibrated-only", action="store_true", help="skip the uncalibrated side")
    ap.add_argument("--output", type=Path, default=Path("runs/accuracy-rows"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    arch, plan = CASES[args.case]
    bundle = load_dataset(args.data)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.dense:
        dense = tio.load(args.dense)
    else:
        dense = dense_model(arch, bundle, epochs=args.dense_epochs, out=args.output / f"{args.case}-{args.data}-dense.pt")
    base = evaluate(dense, bundle).accuracy
    print(f"dense: {base:.2%}", file=sys.stderr, flush=True)
    tune = not args.no_finetune
    none = {"ratio": float("nan"), "before": float("nan"), "after": None, "params": 0, "compress_s": 0.0}
    print("| case | data | seed | dense | ratio | before FT | after FT | ratio (calibrated) | before FT (calibrated) "
          "| after FT (calibrated) | drop (calibrated) |")
    drops = []
    for seed in args.seeds:
        config = FinetuneConfig(seed=seed, **({"epochs": args.finetune_epochs} if args.finetune_epochs else {}))
        seed_plan = seeded(plan, seed)
        plain = none if args.calibrated_only else one_side(dense, seed_plan, bundle, calib=None, tune=tune,
                                                           config=config)
        calib = balanced_subset(bundle.train, args.calib_samples, seed=seed)
        fitted = one_side(dense, seed_plan, bundle, calib=calib, tune=tune, config=config)
        best = fitted["after"] if fitted["after"] is not None else fitted["before"]
        drops.append(100 * (base - best))
        print(f"| {args.case} | {args.data} | {seed} | {base:.2%} | {cells(plain)} | {cells(fitted)} "
              f"| {drops[-1]:.1f} pp |", flush=True)
        print(f"params {plain['params']} / {fitted['params']}; compress {plain['compress_s']:.0f} s / "
              f"{fitted['compress_s']:.0f} s; wall {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(f"drop (calibrated) over seeds {args.seeds}: mean {sum(drops) / len(drops):.2f} pp, "
          f"min {min(drops):.1f}, max {max(drops):.1f}")


def cells(r: dict[str, object]) -> str:
    after = "–" if r["after"] is None else f"{r['after']:.2%}"
    return f"{r['ratio']:.1f}× | {r['before']:.2%} | {after}"


if __name__ == "__main__":
    main()
