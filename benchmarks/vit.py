"""Compress a small Vision Transformer with TT-matrices: attention and MLP separately (issue 11 §7).

A torchvision :class:`~torchvision.models.VisionTransformer` (28×28 images, 7×7 patches, so 16
patch tokens plus the class token) is trained on ``mnist-5k`` (or Fashion-MNIST), then its
encoder's Linear layers are replaced by TT-matrices (:class:`ttcompress.layers.TTLinear`) at
several TT ranks, in three ways chosen by plan rules:

``attention``
    the q, k, v and output projections of every self-attention (``nn.MultiheadAttention`` is
    converted to :class:`~ttcompress.layers.attention.FactorizedMultiheadAttention`, whose
    projections are addressable as ``encoder.layers.*.self_attention.q`` etc.);
``mlp``
    the two Linear layers of every MLP block (``encoder.layers.*.mlp.0`` and ``.mlp.3``);
``both``
    all of them, at the same rank (and, with ``--mixed``, attention at one rank and the MLP at
    another).

The patch embedding (a convolution), the class head and the LayerNorms stay dense. Every
configuration is measured three times on the test split: the TT-SVD of the trained weights
(``uncalibrated``); the same layers fitted to their outputs on calibration images
(``ttcompress.compress(..., calib_data=...)``, ``calibrated``); and after fine-tuning that
calibrated model with the library's defaults (:class:`ttcompress.training.FinetuneConfig`) with
knowledge distillation from the dense model (``after FT``).

Finally the forward time of one encoder block (attention + MLP, batch 64 and batch 1, eval mode,
no grad) of each compressed model is compared with the dense block's, in one process with
``torch.utils.benchmark``, the variants interleaved, and the median ratio over the repeats
reported; beside them a dense block whose attention is a
:class:`~ttcompress.layers.attention.FactorizedMultiheadAttention` with dense projections (the
cost of that module apart from TT's). ``--timing-only`` times the same blocks built from an
untrained ViT (same shapes and ranks), without training.

The input has one channel: the ViT's patch embedding ``conv_proj`` is built for 1 input channel
(:func:`small_vit`) instead of repeating the grey channel three times.

Usage::

    python benchmarks/vit.py --output runs/vit                 # the full run (docs/results.md)
    python benchmarks/vit.py --timing-only --output runs/vit-timing
    python benchmarks/vit.py --quick --output /tmp/vit-quick    # seconds: a tiny ViT, one rank

References
----------
.. [1] A. Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
   at Scale", ICLR 2021 (the ViT).
.. [2] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks",
   NeurIPS 2015 (TT-matrix layers).
.. [3] G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
   arXiv:1503.02531, 2015.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils import benchmark

import ttcompress
from ttcompress.layers.attention import FactorizedMultiheadAttention
from ttcompress.compression.plan import Plan, Rule, TTSettings
from ttcompress.training import FinetuneConfig, TrainConfig, finetune, train

#: Name patterns of the compressed parts (plan rules address the attention projections by name).
ATTENTION = "encoder.layers.*.self_attention.*"
MLP = "encoder.layers.*.mlp.*"


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (recorded in ``results.json``)."""

    data: str = "mnist-5k"
    image_size: int = 28
    patch_size: int = 7
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 64
    mlp_dim: int = 256
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 64
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    mixed: tuple[tuple[int, int], ...] = ((16, 4), (4, 16))
    calib_samples: int = 512
    finetune_max_batches: int | None = None
    train_max_batches: int | None = None
    time_repeats: int = 7
    time_min_run: float = 0.2
    threads: int = 1
    seed: int = 0


#: ``--quick``: a tiny ViT, one rank, a few batches of training; checks the script end to end.
QUICK = Settings(num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, epochs=1, ranks=(2,), mixed=((4, 2),),
                 calib_samples=64, finetune_max_batches=3, train_max_batches=10, time_repeats=1,
                 time_min_run=0.01)  # fmt: skip


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def small_vit(settings: Settings, *, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A torchvision ViT with its patch embedding built for ``in_channels`` input channels."""
    model = torchvision.models.VisionTransformer(
        image_size=settings.image_size, patch_size=settings.patch_size, num_layers=settings.num_layers,
        num_heads=settings.num_heads, hidden_dim=settings.hidden_dim, mlp_dim=settings.mlp_dim,
        num_classes=num_classes,
    )  # fmt: skip
    old = model.conv_proj
    model.conv_proj = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride)
    # torchvision's own init of conv_proj (truncated normal, fan-in of the new layer)
    nn.init.trunc_normal_(model.conv_proj.weight, std=(1.0 / model.conv_proj.weight[0].numel()) ** 0.5)
    nn.init.zeros_(model.conv_proj.bias)
    return model


def vit_plan(attention_rank: int | None, mlp_rank: int | None) -> Plan:
    """TT at max rank ``attention_rank`` for the attention projections, ``mlp_rank`` for the MLPs.

    ``None`` leaves that part dense. Only the encoder's attention and MLP layers are selected
    (``layers``), each part getting its rank from a rule.
    """
    parts = [(ATTENTION, attention_rank), (MLP, mlp_rank)]
    chosen = [(pattern, rank) for pattern, rank in parts if rank is not None]
    if not chosen:
        raise ValueError("attention_rank and mlp_rank cannot both be None")
    return Plan(tt=TTSettings(), layers=tuple(p for p, _ in chosen),
                rules=tuple(Rule(pattern=p, format="tt", ranks=r) for p, r in chosen))  # fmt: skip


def configurations(settings: Settings) -> list[tuple[str, int | None, int | None]]:
    """``(label, attention rank, mlp rank)`` of every compressed model measured."""
    out: list[tuple[str, int | None, int | None]] = []
    for part in ("attention", "mlp", "both"):
        for r in settings.ranks:
            out.append((part, r if part != "mlp" else None, r if part != "attention" else None))
    out += [("mixed", a, m) for a, m in settings.mixed]
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _accuracy(model: nn.Module, bundle: Any) -> float:
    return float(ttcompress.evaluate(model, bundle, device="cpu", topk=(1,)).accuracy)


def _calib_images(bundle: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn at random (seeded) from the training split."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(bundle.train), generator=g)[:n]
    return torch.stack([bundle.train[int(i)][0] for i in idx])


def train_dense(settings: Settings, bundle: Any, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Train the dense ViT (Adam, cosine schedule) and return it with its accuracy and time."""
    torch.manual_seed(settings.seed)
    model = small_vit(settings, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0])
    config = TrainConfig(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                                    schedule="cosine", device="cpu", seed=settings.seed,
                                    max_batches=settings.train_max_batches)  # fmt: skip
    t0 = time.perf_counter()
    train(model, bundle, output=out / "dense.pt", config=config)
    seconds = time.perf_counter() - t0
    model.eval()
    return model, {"params": _params(model), "top1": _accuracy(model, bundle), "train_seconds": seconds}


def compress_one(dense: nn.Module, plan: Plan, *, calib: torch.Tensor | None, check: torch.Tensor) -> Any:
    """Compress a copy of ``dense`` per ``plan`` (fitted to ``calib`` when given), checked on ``check``."""
    return ttcompress.compress_with_report(copy.deepcopy(dense), plan, calib_data=calib, check_input=check)


def _part_sizes(result: Any) -> tuple[int, int]:
    before = sum(r.params_before for r in result.compressed)
    after = sum(r.params_after for r in result.compressed)
    return before, after


def measure_config(
    dense: nn.Module, bundle: Any, plan: Plan, *, calib: torch.Tensor, settings: Settings, out: Path, label: str
) -> tuple[dict[str, Any], nn.Module]:
    """Uncalibrated, calibrated and fine-tuned accuracy of one configuration; returns the row and the
    calibrated, fine-tuned model."""
    t0 = time.perf_counter()
    plain = compress_one(dense, plan, calib=None, check=calib[:8])
    acc_plain = _accuracy(plain.model, bundle)
    fitted = compress_one(dense, plan, calib=calib, check=calib[:8])
    acc_calib = _accuracy(fitted.model, bundle)
    t_compress = time.perf_counter() - t0
    config = FinetuneConfig(device="cpu", seed=settings.seed, max_batches=settings.finetune_max_batches)
    t0 = time.perf_counter()
    finetune(fitted.model, bundle, output=out / f"{label}.pt", config=config, teacher=dense)
    t_ft = time.perf_counter() - t0
    fitted.model.eval()
    acc_ft = _accuracy(fitted.model, bundle)
    part_before, part_after = _part_sizes(fitted)
    kept = {r.name: r.skipped for r in fitted.records if r.format == "dense" and r.skipped
            and any(fnmatch.fnmatchcase(r.name, p) for p in plan.layers)}  # fmt: skip
    uncal_before, uncal_after = _part_sizes(plain)
    row = {
        "params": fitted.params_after,
        "params_uncalibrated": plain.params_after,
        "compression": fitted.params_before / fitted.params_after,
        "part_params_before": part_before,
        "part_params_after": part_after,
        "part_compression": part_before / part_after if part_after else None,
        "layers": len(fitted.compressed),
        "layers_uncalibrated": len(plain.compressed),
        "same_layers": (uncal_before, uncal_after) == (part_before, part_after),
        "kept_dense_calibrated": kept,
        "top1_uncalibrated": acc_plain,
        "top1_calibrated": acc_calib,
        "top1_finetuned": acc_ft,
        "output_error_calibrated": fitted.output_error,
        "compress_seconds": t_compress,
        "finetune_seconds": t_ft,
        "finetune_config": config.to_dict(),
    }
    return row, fitted.model


def converted_block(block: nn.Module) -> nn.Module:
    """A copy of a dense encoder block whose ``nn.MultiheadAttention`` is a dense
    :class:`FactorizedMultiheadAttention` (separates the cost of the module from that of TT)."""
    block = copy.deepcopy(block)
    block.self_attention = FactorizedMultiheadAttention.from_mha(block.self_attention)
    return block


def timing_blocks(settings: Settings) -> dict[str, nn.Module]:
    """Encoder block 0 of a freshly initialized ViT, dense and compressed in every configuration.

    TT-SVD of the random weights, no calibration, no fine-tuning: the forward time depends on the
    layers' shapes and ranks only (``--timing-only``).
    """
    torch.manual_seed(settings.seed)
    dense = small_vit(settings).eval()
    blocks = {"dense": dense.encoder.layers[0], "dense, attention converted": converted_block(dense.encoder.layers[0])}
    for part, ra, rm in configurations(settings):
        model = ttcompress.compress(copy.deepcopy(dense), vit_plan(ra, rm))
        blocks[config_label(part, ra, rm)] = model.encoder.layers[0]
    return blocks


def config_label(part: str, attention_rank: int | None, mlp_rank: int | None) -> str:
    if part == "mixed":
        return f"mixed-a{attention_rank}-m{mlp_rank}"
    return f"{part}-r{attention_rank if attention_rank is not None else mlp_rank}"


def time_blocks(blocks: dict[str, nn.Module], *, batch: int, tokens: int, dim: int, settings: Settings) -> dict[str, Any]:
    """Median forward time of each block and its median ratio to ``blocks["dense"]``.

    One process, eval mode, no grad; every repeat times every block in turn (interleaved) with
    ``torch.utils.benchmark.Timer.blocked_autorange``, so load on the machine hits all alike.
    """
    x = torch.randn(batch, tokens, dim)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    with torch.no_grad():
        for block in blocks.values():
            block.eval()
            block(x)  # warm-up (and any eval-time kernel choice)
        for _ in range(settings.time_repeats):
            for name, block in blocks.items():
                timer = benchmark.Timer(stmt="block(x)", globals={"block": block, "x": x},
                                        num_threads=torch.get_num_threads())  # fmt: skip
                times[name].append(timer.blocked_autorange(min_run_time=settings.time_min_run).median)
    dense = times["dense"]
    return {
        name: {"median_ms": 1e3 * statistics.median(ts),
               "ratio": statistics.median(t / d for t, d in zip(ts, dense))}
        for name, ts in times.items()
    }  # fmt: skip


def run(settings: Settings, *, output: Path, data_root: str | None = None) -> dict[str, Any]:
    """The whole experiment; returns every number (see ``results.json``)."""
    torch.set_num_threads(settings.threads)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bundle = ttcompress.load_dataset(settings.data, root=data_root)
    _log(f"training the dense ViT on {settings.data} ({settings.epochs} epochs)")
    dense, dense_row = train_dense(settings, bundle, output)
    _log(f"dense: {dense_row['params']:,} params, top-1 {dense_row['top1']:.4f}, {dense_row['train_seconds']:.0f} s")
    calib = _calib_images(bundle, settings.calib_samples, settings.seed)
    rows: list[dict[str, Any]] = []
    blocks = {"dense": dense.encoder.layers[0], "dense, attention converted": converted_block(dense.encoder.layers[0])}
    for part, ra, rm in configurations(settings):
        label = config_label(part, ra, rm)
        _log(f"{label}: compress, calibrate, fine-tune")
        row, model = measure_config(dense, bundle, vit_plan(ra, rm), calib=calib, settings=settings,
                                    out=output, label=label)  # fmt: skip
        rows.append({"label": label, "part": part, "attention_rank": ra, "mlp_rank": rm, **row})
        blocks[label] = model.encoder.layers[0]
        _log(f"{label}: {row['compression']:.2f}x, top-1 {row['top1_uncalibrated']:.4f} / "
             f"{row['top1_calibrated']:.4f} / {row['top1_finetuned']:.4f}")  # fmt: skip
    return {"dense": dense_row, "rows": rows, **timing_results(blocks, settings, start)}


def timing_results(blocks: dict[str, nn.Module], settings: Settings, start: float) -> dict[str, Any]:
    """Time ``blocks`` at batch 64 and 1; with the settings and the machine, as in ``results.json``."""
    tokens = (settings.image_size // settings.patch_size) ** 2 + 1
    _log("timing the encoder blocks")
    timing = {str(b): time_blocks(blocks, batch=b, tokens=tokens, dim=settings.hidden_dim, settings=settings)
              for b in (64, 1)}  # fmt: skip
    return {
        "settings": dict(settings.__dict__),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
        "timing": timing,
        "tokens": tokens,
        "wall_seconds": time.perf_counter() - start,
    }  # fmt: skip


def run_timing(settings: Settings) -> dict[str, Any]:
    """Only the encoder-block timing, on untrained blocks (:func:`timing_blocks`)."""
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    return timing_results(timing_blocks(settings), settings, start)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _rank(row: dict[str, Any]) -> str:
    a, m = row["attention_rank"], row["mlp_rank"]
    if row["part"] == "mixed":
        return f"attn {a} / MLP {m}"
    return str(a if a is not None else m)


def to_markdown(results: dict[str, Any]) -> str:
    """The accuracy table (unless timing only) and the timing table, as Markdown."""
    return (accuracy_markdown(results) + "\n" if "rows" in results else "") + timing_markdown(results)


def accuracy_markdown(results: dict[str, Any]) -> str:
    """Accuracy vs compression, one row per configuration."""
    d = results["dense"]
    lines = [
        "| compressed | TT rank | params | compression (model) | compression (part) | top-1 uncalibrated "
        "| top-1 calibrated | top-1 after FT |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| nothing (dense) | — | {d['params']:,} | 1× | — | — | — | {_pct(d['top1'])} |",
    ]
    for r in results["rows"]:
        part = "—" if r["part_compression"] is None else f"{r['part_compression']:.1f}×"
        note = "" if r["same_layers"] else " ¹"
        lines.append(f"| {r['part']} | {_rank(r)} | {r['params']:,}{note} | {r['compression']:.2f}× | {part} | "
                     f"{_pct(r['top1_uncalibrated'])} | {_pct(r['top1_calibrated'])} | {_pct(r['top1_finetuned'])} |")
    return "\n".join(lines) + "\n"


def timing_markdown(results: dict[str, Any]) -> str:
    """Median forward time of each encoder block and its ratio to the dense one."""
    lines = ["| encoder block | batch 64: ms | ratio to dense | batch 1: ms | ratio to dense |",
             "| --- | ---: | ---: | ---: | ---: |"]
    t64, t1 = results["timing"]["64"], results["timing"]["1"]
    for name in t64:
        lines.append(f"| {name} | {t64[name]['median_ms']:.3f} | {t64[name]['ratio']:.2f} | "
                     f"{t1[name]['median_ms']:.3f} | {t1[name]['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="mnist-5k (default) or fashion-mnist")
    parser.add_argument("--data-root", default=None, help="data directory for mnist / fashion-mnist")
    parser.add_argument("--output", type=Path, default=None,
                        help="output directory (default: a temporary one, removed at the end)")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default 40)")
    parser.add_argument("--ranks", default=None, help="comma-separated TT ranks (default 2,4,8,16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, one rank, a few batches (seconds)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only time the encoder blocks (untrained weights, same shapes and ranks)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.data is not None:
        changes["data"] = args.data
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.threads is not None:
        changes["threads"] = args.threads
    if args.ranks is not None:
        changes["ranks"] = tuple(int(r) for r in args.ranks.split(",") if r.strip())
    settings = replace(settings, **changes)
    with tempfile.TemporaryDirectory() as tmp:
        output = args.output if args.output is not None else Path(tmp)
        if args.timing_only:
            results = run_timing(settings)
        else:
            results = run(settings, output=output, data_root=args.data_root)
        table = to_markdown(results)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (output / "results.md").write_text(table)
    print(table)
    _log(f"wall time {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
