"""CP-ALS sweeps per fit: error, sweeps, CPU time and minor page faults, optionally against a baseline.

Fits the convs of CREPE (capacity 32, ``benchmarks/bench_models.crepe``) and resnet18 (random
weights, ``torch.manual_seed(0)`` before each model) with ``als_sweeps`` from the same SVD start,
under ``cp_als``'s thread policy and stopping rule (relative improvement below ``--tol``). With
``--baseline REV`` the ``cp_sweeps`` / ``cp_lean`` modules of git revision ``REV`` run too, in the
same process, interleaved (baseline, current, baseline, current, ...), and the largest factor
difference is printed. CPU = user + sys of the process (``getrusage``): comparable across loads.

Usage (repository root)::

    python benchmarks/bench_cp_sweeps.py --set small --baseline 405e728
    python benchmarks/bench_cp_sweeps.py --set big --rounds 2 --baseline 405e728

``small``: resnet18 ``conv1`` (rank 64), ``layer2.0.conv2`` (129), ``layer4.0.conv1`` (420) and
CREPE's ``13`` (128x128x64x1, rank 668) to ``--tol`` (default 1e-3); ``big``: CREPE's ``7``
(128x1024x64x1, rank 1,411) and ``31`` (512x256x64x1, rank 2,060), 3 sweeps each (``tol`` 0).
Results: docs/benchmarks.md ("Third pass").
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from ttcompress.decompose import cp_sweeps
from ttcompress.decompose._threads import few_threads
from ttcompress.decompose.cp_lean import svd_start


def _baseline(rev: str, folder: Path) -> ModuleType:
    """``cp_sweeps`` of git revision ``rev``, importing that revision's ``cp_lean``."""
    for name in ("cp_lean", "cp_sweeps"):
        text = subprocess.run(["git", "show", f"{rev}:ttcompress/decompose/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from ttcompress.decompose.cp_lean import", "from baseline_cp_lean import")
        (folder / f"baseline_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("baseline_cp_sweeps", folder / "baseline_cp_sweeps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def _fit(module: ModuleType, target: torch.Tensor, start: list[torch.Tensor], n_iter: int, tol: float) -> dict:
    errors: list[float] = []

    def watch(_iteration: int, error: float) -> bool:
        errors.append(error)
        if len(errors) < 2:
            return False
        gain = (errors[-2] - errors[-1]) / errors[-2] if errors[-2] > 0 else 0.0
        return gain < tol or error == 0.0

    cpu0, sys0, faults0 = _usage()
    wall = time.perf_counter()
    with few_threads(target.numel() * start[0].shape[1]):
        factors, sweeps, error = module.als_sweeps(target, start, n_iter, watch)
    cpu1, sys1, faults1 = _usage()
    dense = float((cp_sweeps.cp_reconstruct(factors) - target).norm() / target.norm())
    return dict(error=error, dense=dense, sweeps=sweeps, cpu=cpu1 - cpu0, sys=sys1 - sys0,
                faults=faults1 - faults0, wall=time.perf_counter() - wall, factors=factors)


def _cases(which: str, tol: float) -> list[tuple[str, torch.Tensor, int, int, float]]:
    import torchvision

    from benchmarks.bench_models import crepe

    torch.manual_seed(0)
    net = crepe(32)
    if which == "big":
        return [("crepe 7", net[7].weight, 1411, 3, 0.0), ("crepe 31", net[31].weight, 2060, 3, 0.0)]
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(num_classes=10)
    return [("resnet18 conv1", r18.conv1.weight, 64, 100, tol),
            ("resnet18 layer2.0.conv2", r18.layer2[0].conv2.weight, 129, 100, tol),
            ("resnet18 layer4.0.conv1", r18.layer4[0].conv1.weight, 420, 100, tol),
            ("crepe 13", net[13].weight, 668, 100, tol)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("small", "big"), default="small")
    parser.add_argument("--baseline", help="git revision whose ALS loop runs too, interleaved")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        versions = [("current", cp_sweeps)]
        if args.baseline:
            versions.insert(0, (f"baseline {args.baseline}", _baseline(args.baseline, Path(folder))))
        for name, weight, rank, n_iter, tol in _cases(args.set, args.tol):
            target = weight.detach().to(torch.float64)
            target = target / target.norm()
            start = svd_start(target, rank, seed=0)
            first: dict[str, list[torch.Tensor]] = {}
            for _round in range(args.rounds):
                for label, module in versions:
                    r = _fit(module, target, start, n_iter, tol)
                    first.setdefault(label, r["factors"])
                    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
                    print(f"{name} {tuple(target.shape)} rank {rank} [{label}]: error {r['error']:.6f} "
                          f"(dense {r['dense']:.6f}), {r['sweeps']} sweeps, CPU {r['cpu']:.1f} s "
                          f"(sys {r['sys']:.1f}), {r['faults']:,} minor faults, wall {r['wall']:.1f} s, load {load}",
                          flush=True)
            if len(first) == 2:
                a, b = first.values()
                diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
                print(f"  largest factor difference: {diff:.3g}" if math.isfinite(diff) else "  non-finite", flush=True)


if __name__ == "__main__":
    main()
