"""Reproduce the MNIST experiment of the CP-decomposition paper (Lebedev et al. 2015).

Setup: the paper's MNIST CNN (built-in ``seed-cnn``: two 3×3 convs with 10 filters, then two
fully connected layers), trained dense; then only the two convs are replaced by rank-R CP
convolutions (CP-ALS of the trained kernels, :class:`ttcompress.layers.cp_conv.CPConv2d`), the
fully connected layers stay dense; accuracy is measured before and after fine-tuning the whole
net for 5 epochs at lr 1e-4, as in the paper.

Published (Lebedev et al. 2015, MNIST): baseline 98.34 %; CP rank 3 → ≈97.1 % at 7.7× conv
compression; rank 6 → 97.95 % at 3.8×; rank 9 → ≈97.6 % at 2.6×. The compression is that of the
conv weights: ``sum dense kernel sizes / sum CP factor sizes`` over both convs (biases excluded),
which :func:`conv_compression` computes from the shapes alone.

Choices that the paper does not fix (documented in ``docs/results.md``): optimizer Adam (lr 1e-3
for the baseline, 1e-4 for fine-tuning), batch 64, the hidden width 128 and 2×2 max pooling of
``seed-cnn``. Reported accuracy is that of the **last** epoch (no selection on the test split;
the best epoch is recorded in the JSON as well).

Usage::

    python benchmarks/reproduce_cp_paper.py --data mnist-5k --output runs/cp-mnist5k
    python benchmarks/reproduce_cp_paper.py --data fashion-mnist --output runs/cp-fashion

Prints a Markdown table (ours beside published) on stdout, progress on stderr, and writes
``results.json`` and ``results.md`` into the output directory.

References
----------
.. [1] V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up Convolutional
   Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015. arXiv:1412.6553.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Train on the whole training split, as the paper does. The reported accuracy is the last
#: epoch's, so no checkpoint is selected on the test split even though validation runs on it.
VAL_FRACTION = 0.0

#: Published MNIST figures of [1]: accuracy (fraction) and conv compression per CP rank.
PUBLISHED_BASELINE = 0.9834
PUBLISHED: dict[int, dict[str, float]] = {
    3: {"accuracy": 0.971, "conv_compression": 7.7},
    6: {"accuracy": 0.9795, "conv_compression": 3.8},
    9: {"accuracy": 0.976, "conv_compression": 2.6},
}
DEFAULT_RANKS: tuple[int, ...] = (3, 6, 9)


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def conv_compression(model: nn.Module, rank: int) -> float:
    """Conv-weight compression of rank-``rank`` CP for every ``nn.Conv2d`` of ``model``.

    ``sum_l C_out C_in kh kw / sum_l R (C_out + C_in + kh + kw)`` (per group for grouped convs),
    biases excluded on both sides, as in [1]_ (7.7× / 3.8× / 2.6× at ranks 3 / 6 / 9 for
    ``seed-cnn``).

    Parameters
    ----------
    model : nn.Module
        A model with dense ``nn.Conv2d`` layers (e.g. ``build_arch("seed-cnn")``).
    rank : int
        CP rank (>= 1).
    """
    from ttcompress.decompose.cp import cp_param_count

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    convs = _convs(model)
    if not convs:
        raise ValueError("model has no nn.Conv2d layer")
    dense = sum(c.weight.numel() for _, c in convs)
    cp = sum(cp_param_count(c.out_channels, c.in_channels // c.groups, *c.kernel_size, rank, c.groups)
             for _, c in convs)
    return dense / cp


def measured_conv_compression(dense_model: nn.Module, compressed: nn.Module) -> float:
    """The same ratio measured on the built layers: dense kernel sizes / CP factor sizes (no bias)."""
    dense = sum(c.weight.numel() for _, c in _convs(dense_model))
    factors = 0
    for name, _ in _convs(dense_model):
        layer = compressed.get_submodule(name)
        factors += sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    return dense / factors


def decompose_convs(model: nn.Module, *, rank: int, seed: int = 0) -> dict[str, float | None]:
    """Replace every ``nn.Conv2d`` of ``model`` in place by a rank-``rank`` CP convolution.

    Unlike :func:`ttcompress.compression.pipeline.compress`, a conv is replaced even when CP makes it larger:
    the paper decomposes both convs, and the first one (1 input channel, 90 weights) has
    ``17 R`` CP parameters, more than 90 from rank 6 on, so the planner would keep it dense
    (giving 4.02× and 2.69× instead of the paper's 3.8× and 2.6×). Each replacement is recorded in
    ``model.ttcompress_meta["layers"]`` as :func:`ttcompress.compression.pipeline.compress_with_report` does,
    so checkpoints of the model can be reloaded.

    Returns
    -------
    dict
        Layer name -> relative reconstruction error of its kernel.
    """
    from ttcompress.checkpoint.io import update_meta
    from ttcompress.layers.cp_conv import CPConv2d
    from ttcompress.modtree import set_submodule

    errors: dict[str, float | None] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, conv in _convs(model):
        start = time.perf_counter()
        new = CPConv2d.from_conv(conv, rank=rank, seed=seed, name=name)
        seconds = time.perf_counter() - start
        set_submodule(model, name, new)
        errors[name] = None if new.rel_error is None else float(new.rel_error)
        layers[name] = {"format": "cp", "config": json.loads(json.dumps(new.config())),
                        "rel_error": errors[name], "seconds": seconds,
                        "params_before": sum(p.numel() for p in conv.parameters()),
                        "params_after": sum(p.numel() for p in new.parameters())}
    update_meta(model, layers=layers)
    return errors


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(
    *,
    data: str = "mnist-5k",
    data_root: str | None = None,
    output: Path,
    ranks: Sequence[int] = DEFAULT_RANKS,
    baseline_epochs: int = 5,
    finetune_epochs: int = 5,
    finetune_lr: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Train the baseline, CP-decompose the convs at each rank, fine-tune; return the results.

    Parameters
    ----------
    data : str
        Dataset name for :func:`ttcompress.data.load_dataset` (``mnist-5k`` or ``fashion-mnist``).
    data_root : str, optional
        Its ``root`` (needed for ``mnist``; Debian's Fashion-MNIST is found without it).
    output : Path
        Directory for checkpoints and ``results.json`` / ``results.md``.
    ranks : sequence of int
        CP ranks of the conv layers.
    baseline_epochs, finetune_epochs : int
        Epochs of baseline training (Adam, lr 1e-3) and of each fine-tuning (Adam, ``finetune_lr``).
    batch_size, seed, threads : int
        Batch size, seed of every run, ``torch.set_num_threads``.
    """
    from ttcompress.data import load_dataset
    from ttcompress.checkpoint.models import build_arch
    from ttcompress.report.evaluation import evaluate
    from ttcompress.training import FinetuneConfig, TrainConfig, finetune, train

    torch.set_num_threads(threads)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = load_dataset(data, root=data_root)
    _log(f"{data}: {len(bundle.train)} train / {len(bundle.test)} test samples")

    torch.manual_seed(seed)
    base = build_arch("seed-cnn", kwargs={"num_classes": bundle.num_classes})
    t0 = time.perf_counter()
    run_b = train(base, bundle, output=output / "baseline.pt",
                  config=TrainConfig(epochs=baseline_epochs, batch_size=batch_size, optimizer="adam",
                                     lr=1e-3, seed=seed, device="cpu", val_fraction=VAL_FRACTION))
    base_seconds = time.perf_counter() - t0
    base_acc = evaluate(base, bundle.test, device="cpu").accuracy
    _log(f"baseline: {100 * base_acc:.2f}% after {baseline_epochs} epochs ({base_seconds:.0f} s)")
    rows: list[dict[str, Any]] = [{
        "model": "baseline (dense)", "rank": None, "params": _params(base),
        "conv_compression": 1.0, "accuracy_before": None, "accuracy": base_acc,
        "best_epoch_accuracy": run_b.best_accuracy, "seconds": base_seconds,
        "published_accuracy": PUBLISHED_BASELINE, "published_conv_compression": 1.0,
    }]

    for rank in ranks:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rel_errors = decompose_convs(model, rank=rank, seed=seed)
        decompose_seconds = time.perf_counter() - t0
        before = evaluate(model, bundle.test, device="cpu").accuracy
        ratio = measured_conv_compression(base, model)
        expected = conv_compression(base, rank)
        if abs(ratio - expected) > 1e-9:
            raise RuntimeError(f"rank {rank}: measured conv compression {ratio} != predicted {expected}")
        _log(f"CP rank {rank}: {ratio:.2f}x conv compression, {100 * before:.2f}% before fine-tuning")
        t1 = time.perf_counter()
        run_f = finetune(model, bundle, output=output / f"cp-r{rank}.pt",
                         config=FinetuneConfig(epochs=finetune_epochs, batch_size=batch_size,
                                               optimizer="adam", lr=finetune_lr, seed=seed, device="cpu",
                                               val_fraction=VAL_FRACTION))
        ft_seconds = time.perf_counter() - t1
        after = evaluate(model, bundle.test, device="cpu").accuracy
        _log(f"CP rank {rank}: {100 * after:.2f}% after {finetune_epochs} epochs of fine-tuning ({ft_seconds:.0f} s)")
        pub = PUBLISHED.get(rank, {})
        rows.append({
            "model": f"CP rank {rank} (convs)", "rank": rank, "params": _params(model),
            "conv_compression": ratio, "accuracy_before": before, "accuracy": after,
            "best_epoch_accuracy": run_f.best_accuracy, "rel_errors": rel_errors,
            "decompose_seconds": decompose_seconds, "seconds": ft_seconds,
            "published_accuracy": pub.get("accuracy"), "published_conv_compression": pub.get("conv_compression"),
        })

    return {
        "experiment": "Lebedev et al. 2015, MNIST CNN, CP-decomposed convs",
        "data": data, "train_samples": len(bundle.train), "test_samples": len(bundle.test),
        "settings": {"arch": "seed-cnn", "baseline": {"epochs": baseline_epochs, "optimizer": "adam", "lr": 1e-3},
                     "finetune": {"epochs": finetune_epochs, "optimizer": "adam", "lr": finetune_lr},
                     "batch_size": batch_size, "seed": seed, "threads": threads,
                     "accuracy": "last epoch, test split"},
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
    }


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def to_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, ours beside the published figures."""
    lines = [
        (f"CP conv paper (Lebedev et al. 2015) on `{results['data']}` "
        f"({results['train_samples']:,} train / {results['test_samples']:,} test), "
        f"wall time {results['wall_seconds']:.0f} s"),
        "",
        ("| model | params | conv compression (ours / published) | acc. before fine-tuning | "
        "acc. after (ours) | published acc. |"),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        pub_ratio = row["published_conv_compression"]
        ratio = f"{row['conv_compression']:.2f}× / {pub_ratio:.1f}×" if pub_ratio else f"{row['conv_compression']:.2f}× / —"
        lines.append(
            f"| {row['model']} | {row['params']:,} | {ratio} | {_pct(row['accuracy_before'])} | "
            f"{_pct(row['accuracy'])} | {_pct(row['published_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist-5k", help="mnist-5k (default) or fashion-mnist")
    parser.add_argument("--data-root", default=None,
                        help="data directory for mnist / fashion-mnist (Debian's Fashion-MNIST is found without it)")
    parser.add_argument("--output", type=Path, default=Path("runs/reproduce-cp"), help="output directory")
    parser.add_argument("--ranks", default="3,6,9", help="comma-separated CP ranks (default 3,6,9)")
    parser.add_argument("--baseline-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    ranks = tuple(int(r) for r in args.ranks.split(",") if r.strip())
    results = run(data=args.data, data_root=args.data_root, output=args.output,
                  ranks=ranks, baseline_epochs=args.baseline_epochs,
                  finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                  batch_size=args.batch_size, seed=args.seed, threads=args.threads)
    from ttcompress.checkpoint.io import atomic_write

    table = to_markdown(results)
    with atomic_write(args.output / "results.json", "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with atomic_write(args.output / "results.md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
