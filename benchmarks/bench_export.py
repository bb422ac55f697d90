"""Exports that keep the compression (issue 21): sizes, fidelity and onnxruntime latency.

For each model: the ttcompress checkpoint's size, the ONNX (factors kept), TorchScript and, for
transformers models, Hugging Face directory sizes; the largest relative difference of the ONNX
export from the model (its own check, two batch sizes); and onnxruntime (CPU) latency of the
exported graph beside the dense-merged graph of the same model at batch 1 and 64, interleaved.

    PYTHONPATH=$PWD python benchmarks/bench_export.py [--cases seed-cnn,resnet18,vit,gpt2] [--threads 2]

Prints one Markdown row per model. Models are random-weight (no hub); compression is data-free.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import ttcompress
from ttcompress.export import export_model
from ttcompress.checkpoint.io import update_meta
from ttcompress.compression.plan import CPSettings, Plan, TTSettings


def _seed_cnn():
    from ttcompress.checkpoint.models import build_arch

    return ttcompress.compress(build_arch("seed-cnn"), Plan(tt=TTSettings(ranks=8), cp=CPSettings(rank=6))), (1, 28, 28)


def _resnet18():
    model = ttcompress.build_arch("torchvision:resnet18", kwargs={"num_classes": 10})
    plan = Plan.from_dict({"formats": ["tucker2", "svd"]})  # Tucker-2 convs and SVD fc at their default 4x
    return ttcompress.compress(model, plan), (3, 224, 224)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    from ttcompress.checkpoint.models import build_arch

    config = {"model_type": "vit", "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 768,
              "image_size": 64, "patch_size": 8, "num_labels": 10}
    model = build_arch("hf:ViTForImageClassification", kwargs={"config": config})
    return ttcompress.compress(model, Plan(tt=TTSettings(ranks=16))), (3, 64, 64)


def _gpt2():
    from ttcompress.checkpoint.models import build_arch

    config = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 8000, "n_positions": 128}
    model = build_arch("hf:GPT2LMHeadModel", kwargs={"config": config})
    return ttcompress.compress(model, Plan(tt=TTSettings(ranks=16))), (32,)


CASES = {"seed-cnn": _seed_cnn, "resnet18": _resnet18, "vit": _vit, "gpt2": _gpt2}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run(name: str, out: Path) -> str:
    torch.manual_seed(0)
    started = time.perf_counter()
    model, shape = CASES[name]()
    model.eval()
    update_meta(model, info={"input_shape": list(shape)})
    ckpt = ttcompress.save(model, out / f"{name}.tt.pt")
    onnx = export_model(model, out / f"{name}.onnx", format="onnx", latency_batches=(1, 64))
    script = export_model(model, out / f"{name}.ts.pt", format="torchscript")
    hf = "–"
    try:
        hf_dir = export_model(model, out / f"{name}-hf", format="hf")
        hf = f"{_size(hf_dir.path) / 1e6:.2f} MB"
    except Exception:  # not a transformers model
        hf = "–"
    lat = {t.batch_size: t for t in onnx.latency}
    cells = [name, f"{_size(ckpt) / 1e6:.2f} MB", f"{onnx.size_bytes / 1e6:.2f} MB ({onnx.size_bytes / _size(ckpt):.2f}×)",
             f"{script.size_bytes / 1e6:.2f} MB", hf, f"{lat[1].dense_size_bytes / 1e6:.2f} MB", f"{onnx.max_error:.1e}"]
    for b in (1, 64):
        t = lat[b]
        cells.append(f"{t.ms:.3f} vs {t.dense_ms:.3f} ({t.speedup:.2f}×)")
    cells.append(f"{time.perf_counter() - started:.0f} s")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | checkpoint | ONNX (vs checkpoint) | TorchScript | HF dir | dense ONNX | max rel. diff "
          "| ort ms, batch 1: ours vs dense | ort ms, batch 64: ours vs dense | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            print(run(name, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
