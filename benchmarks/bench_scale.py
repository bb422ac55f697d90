"""Real models at real size (issue 25): wall time, peak RSS and load of ``ttcompress decompose``.

Each case runs the command a user would type, ``python -m ttcompress decompose MODEL ...``, on a
model file saved here, in a child process of its own; the row reports that child's wall time, its
peak resident memory (``ru_maxrss`` of exactly that child, from ``os.wait4``) and the 1-minute load
average before and after. One Markdown table row per case, on stdout (progress on stderr)::

    | case | device | threads | wall | CPU (user + sys) | peak RSS | load before → after | exit | command |

Cases (``--case NAME``, repeatable; default: all):

* ``crepe-tiny-calib`` / ``crepe-full-calib``: the CREPE pitch tracker built from its published
  shapes (Kim et al. 2018; torchcrepe's ``tiny`` (0.49 M params) and ``full`` (22.2 M) capacities:
  six (k, 1)-kernel convs, the first 1 -> 32·c channels with kernel (512, 1) stride (4, 1), then
  (64, 1) kernels, each with ReLU, BatchNorm and MaxPool (2, 1); classifier Linear(2048, 360) for
  ``full``), random weights, ``--target-ratio 4`` calibrated on 256 random 1024-sample frames
  (``--data tensors:FILE``, shaped (N, 1, 1024, 1));
* ``crepe-tiny-free`` / ``crepe-full-free``: the same, data-free;
* ``up-tt`` / ``up-svd``: ``Linear(4096, 11008)`` (an LLM MLP's up-projection), calibrated on
  16,384 token rows (32 sequences of 512), ``--tt-ranks 16`` or ``--format svd`` (4x);
* ``down-tt`` / ``down-svd``: ``Linear(11008, 4096)``, the same;
* ``resnet50-cp4``: torchvision's resnet50 (random weights) at ``--cp-ratio 4``.

Run from the repository root::

    python benchmarks/bench_scale.py [--case NAME ...] [--device auto|cpu|cuda] [--threads N]
        [--timeout SECONDS] [--list]

Results go into docs/benchmarks.md ("Real models at real size").
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: torchcrepe's capacities (channel multiplier of the published "full" model's 32).
CREPE_CAPACITY = {"tiny": 4, "full": 32}


def crepe(capacity: int) -> nn.Sequential:
    """CREPE from its published shapes (as torchcrepe builds it): conv -> ReLU -> BatchNorm -> MaxPool(2, 1)."""
    filters = [n * capacity for n in (32, 4, 4, 4, 8, 16)]
    widths, strides = [512, 64, 64, 64, 64, 64], [4, 1, 1, 1, 1, 1]
    layers: list[nn.Module] = []
    channels = 1
    for f, w, s in zip(filters, widths, strides):
        layers += [nn.ZeroPad2d((0, 0, (w - 1) // 2, w // 2)), nn.Conv2d(channels, f, (w, 1), stride=(s, 1)),
                   nn.ReLU(), nn.BatchNorm2d(f, eps=0.0010000000474974513), nn.MaxPool2d((2, 1), (2, 1))]
        channels = f
    layers += [nn.Flatten(), nn.Linear(channels * 4, 360)]
    return nn.Sequential(*layers)


def crepe_tiny() -> nn.Sequential:
    """``--arch bench_scale:crepe_tiny``."""
    return crepe(CREPE_CAPACITY["tiny"])


def crepe_full() -> nn.Sequential:
    """``--arch bench_scale:crepe_full``."""
    return crepe(CREPE_CAPACITY["full"])


def linear_up() -> nn.Linear:
    """``--arch bench_scale:linear_up``: a 7B model's MLP up-projection."""
    return nn.Linear(4096, 11008)


def linear_down() -> nn.Linear:
    """``--arch bench_scale:linear_down``: a 7B model's MLP down-projection (k = 11,008)."""
    return nn.Linear(11008, 4096)


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50()


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # the --arch the command gets
    build: Callable[[], nn.Module]
    options: tuple[str, ...]
    #: (samples, per-sample shape) of the calibration file, or None (data-free)
    data: tuple[int, tuple[int, ...]] | None = None


def _calib(arch: str, build: Callable[[], nn.Module], name: str, options: tuple[str, ...],
           samples: int, shape: tuple[int, ...]) -> Case:
    return Case(name, arch, build, (*options, "--calib-samples", str(samples)), (samples, shape))


CASES: dict[str, Case] = {c.name: c for c in (
    _calib("bench_scale:crepe_tiny", crepe_tiny, "crepe-tiny-calib", ("--target-ratio", "4"), 256, (1, 1024, 1)),
    Case("crepe-tiny-free", "bench_scale:crepe_tiny", crepe_tiny, ("--target-ratio", "4")),
    _calib("bench_scale:crepe_full", crepe_full, "crepe-full-calib", ("--target-ratio", "4"), 256, (1, 1024, 1)),
    Case("crepe-full-free", "bench_scale:crepe_full", crepe_full, ("--target-ratio", "4")),
    _calib("bench_scale:linear_up", linear_up, "up-tt", ("--tt-ranks", "16"), 32, (512, 4096)),
    _calib("bench_scale:linear_up", linear_up, "up-svd", ("--format", "svd"), 32, (512, 4096)),
    _calib("bench_scale:linear_down", linear_down, "down-tt", ("--tt-ranks", "16"), 32, (512, 11008)),
    _calib("bench_scale:linear_down", linear_down, "down-svd", ("--format", "svd"), 32, (512, 11008)),
    Case("resnet50-cp4", "torchvision:resnet50", resnet50, ("--cp-ratio", "4")),
)}


def _samples_for_train(wanted: int) -> int:
    """Samples to write so that the 90/10 split of ``tensors:FILE`` leaves ``wanted`` for training."""
    n = math.ceil(wanted / 0.9) + 1
    while n - min(max(1, round(n * 0.1)), n - 1) < wanted:
        n += 1
    return n


def prepare(case: Case, work: Path) -> list[str]:
    """Write the case's model (and calibration data) under ``work``; the decompose arguments."""
    torch.manual_seed(0)
    model_path = work / f"{case.name}.pt"
    model = case.build()
    params = sum(p.numel() for p in model.parameters())
    torch.save(model.state_dict(), model_path)
    del model
    args = [str(model_path), "--arch", case.arch, "-o", str(work / f"{case.name}.tt.pt"), "--overwrite", *case.options]
    if case.data is not None:
        samples, shape = case.data
        data_path = work / f"{case.name}.data.pt"
        gen = torch.Generator().manual_seed(1)
        torch.save({"inputs": torch.randn(_samples_for_train(samples), *shape, generator=gen)}, data_path)
        args += ["--data", f"tensors:{data_path}"]
    print(f"[{case.name}] {params / 1e6:.2f} M params", file=sys.stderr)
    return args


def run_case(case: Case, *, device: str, threads: int | None, timeout: float, work: Path) -> str:
    """Run one case in a child process; its Markdown row."""
    args = prepare(case, work)
    cmd = [sys.executable, "-m", "ttcompress", "decompose", *args, "--device", device, "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    log = (work / f"{case.name}.log").open("w+b")  # a file, not a pipe: a chatty child never blocks
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    status, usage = None, None
    while status is None:
        pid, raw, ru = os.wait4(child.pid, os.WNOHANG)
        if pid:
            status, usage = raw, ru
        elif time.perf_counter() - start > timeout:
            child.kill()
            _pid, raw, usage = os.wait4(child.pid, 0)
            status = -9
        else:
            time.sleep(0.2)
    wall = time.perf_counter() - start
    child.returncode = 0  # reaped above: keep Popen from waiting again
    log.seek(0)
    stderr = log.read().decode(errors="replace")
    log.close()
    code = "timeout" if status == -9 else str(os.waitstatus_to_exitcode(status))
    if code != "0":
        print(f"[{case.name}] exit {code}: {stderr.strip().splitlines()[-1:] or ''}", file=sys.stderr)
    peak_gb = usage.ru_maxrss / 2**20  # KiB on Linux
    shown = " ".join(shlex.quote(a) for a in ["decompose", case.arch, *case.options, "--device", device])
    cpu = usage.ru_utime + usage.ru_stime  # the child's own CPU seconds: comparable across loads
    return (f"| {case.name} | {device} | {threads or 'default'} | {wall:.1f} s | {cpu:.1f} s | {peak_gb:.2f} GB | "
            f"{load_before:.1f} → {os.getloadavg()[0]:.1f} | {code} | `{shown}` |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="case to run (repeatable)")
    parser.add_argument("--device", default="auto", help="decompose --device (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="decompose --threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it is killed")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(CASES)))
        return 0
    names = args.case or list(CASES)
    print("| case | device | threads | wall | CPU (user + sys) | peak RSS | load before → after | exit | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        for name in names:
            row = run_case(CASES[name], device=args.device, threads=args.threads, timeout=args.timeout,
                           work=Path(tmp))
            print(row, flush=True)
            failed += "| 0 |" not in row
            for leftover in Path(tmp).glob(f"{name}.*"):
                leftover.unlink()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
