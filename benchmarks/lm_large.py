"""Issue 23 evidence: a Llama-style model larger than the memory it is compressed in.

Builds a ``LlamaForCausalLM`` with random weights from a ``LlamaConfig`` (by default 1.69 GB in
float32), saves it sharded with transformers' ``save_pretrained(max_shard_size=...)``, then runs
``ttcompress decompose`` on the directory in a child process under a memory limit of half the
model's size, enforced by an RSS watchdog: the child's resident set (``VmRSS`` of the process and
its children, read from ``/proc`` every 20 ms) above the limit kills it. (``prlimit --as`` /
``ulimit -v`` limit address space, not memory: PyTorch and the safetensors memory maps reserve far
more address space than they touch, so they fail under such a limit for reasons that have nothing
to do with memory use.) The peak RSS reported is the kernel's high-water mark of the child
(``ru_maxrss`` as GNU ``time -f %M`` reports it), which also catches a peak between two polls.

    python benchmarks/lm_large.py --workdir /tmp/lm_large            # data-free
    python benchmarks/lm_large.py --workdir /tmp/lm_large --calib 16 # calibrated on 16 x 128 tokens
    python benchmarks/lm_large.py --workdir /tmp/lm_large -- --dry-run --target-ratio 4   # a dry run
    python benchmarks/lm_large.py --workdir /tmp/lm_large --command inspect              # inspect

Prints one JSON line: model size, limit, peak RSS, wall and CPU time, exit status.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def build(path: Path, *, layers: int, hidden: int, intermediate: int, vocab: int, shard: str) -> int:
    """Save a random ``LlamaForCausalLM`` sharded at ``path``; return its size in bytes (float32)."""
    import torch
    import transformers

    if (path / "model.safetensors.index.json").is_file():
        return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 256, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size=shard)
    del model
    return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def calibration_file(path: Path, *, samples: int, tokens: int, vocab: int) -> Path:
    """``samples`` random token sequences with an attention mask (the last quarter of every other one padded)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, tokens), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, tokens - tokens // 4:] = 0
    torch.save({"input_ids": ids, "attention_mask": mask}, path)
    return path


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_limited(cmd: list[str], limit: int, stdout: Path) -> dict[str, object]:
    """Run ``cmd`` (its stdout to the file ``stdout``), killing it when its RSS exceeds ``limit``
    bytes; its peak RSS, times and status."""
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_file = stdout.with_suffix(".maxrss")
    peak_file.unlink(missing_ok=True)
    with open(stdout, "wb") as sink:  # GNU time reports the command's own high-water mark (%M, KiB)
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *cmd], start_new_session=True,
                                stdout=sink)
    polled, killed = 0, False
    while proc.poll() is None:
        rss = _tree_rss(proc.pid)
        polled = max(polled, rss)
        if rss > limit:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    code = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"exit": code, "killed_by_watchdog": killed, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_bytes": _peak(peak_file), "peak_rss_polled_bytes": polled}


def _peak(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[-1]) * 1024
    except (OSError, ValueError, IndexError):
        return None  # killed before GNU time could write it: see peak_rss_polled_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard", default="200MB", help="save_pretrained's max_shard_size")
    ap.add_argument("--limit-fraction", type=float, default=0.5, help="memory limit, a fraction of the model's size")
    ap.add_argument("--calib", type=int, default=0, help="calibration samples (0: data-free)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the compressed directory")
    ap.add_argument("--command", choices=("decompose", "inspect"), default="decompose",
                    help="the ttcompress command measured")
    ap.add_argument("decompose_args", nargs="*", help="more options for the command (after --)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, out = args.workdir / "llama", args.workdir / "llama.tt"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # the dense model is built and freed in a child
        size = pool.apply(build, (src,), dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                                              vocab=args.vocab, shard=args.shard))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ttcompress", "decompose", str(src), "-o", str(out), "--json", *args.decompose_args]
    if args.command == "inspect":
        cmd = [sys.executable, "-m", "ttcompress", "inspect", str(src), "--json", *args.decompose_args]
    elif args.calib:
        calib = calibration_file(args.workdir / "calib.pt", samples=args.calib, tokens=args.tokens, vocab=args.vocab)
        cmd += ["--data", f"tensors:{calib}", "--calib-samples", str(args.calib)]
    else:
        cmd += ["--no-calib"]
    limit = int(size * args.limit_fraction)
    device = ["--device", "cpu"] if args.command == "decompose" else []
    result = run_limited(cmd + device, limit, args.workdir / f"{args.command}.json")
    written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.is_dir() else None
    print(json.dumps({"model_bytes": size, "limit_bytes": limit, "written_bytes": written,
                      "layers": args.layers, "calib_samples": args.calib, "tokens": args.tokens, **result,
                      "loadavg": open("/proc/loadavg").read().split()[:3], "command": " ".join(cmd)}))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
