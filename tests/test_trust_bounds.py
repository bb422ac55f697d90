"""Numbers in files and on the command line that would size allocations (issue 20, round two).

Each hostile input is crafted here, in ``tmp_path``, and run where it matters in a subprocess under
a memory cap (``RLIMIT_AS``: what the interpreter maps after importing ttcompress, plus a small
budget) and a time cap: the answer must be one ``error:`` line and exit code 2, quickly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from test_trust import assert_one_line_error, invoke, rewrite_header  # noqa: E402  (tests/ is on sys.path)
from ttcompress.decompose.modes import choose_modes, max_num_cores
from ttcompress.errors import CheckpointError
from ttcompress.checkpoint.io import load, save
from ttcompress.layers import TTLinear
from ttcompress.layers.tt_embedding import TTEmbedding
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.compression.pipeline import compress

ROOT = Path(__file__).resolve().parents[1]

CAPPED = textwrap.dedent(r"""
    import resource, sys
    import torch
    from ttcompress.cli import app
    torch.set_num_threads(1)
    budget = int(sys.argv[1])
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + budget, resource.getrlimit(resource.RLIMIT_AS)[1]))
    app(sys.argv[2:], prog_name="ttcompress")
""")


def run_capped(*args: Any, budget_gb: float = 1.0, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``ttcompress ARGS`` in a subprocess allowed ``budget_gb`` of address space beyond its imports."""
    cmd = [sys.executable, "-c", CAPPED, str(int(budget_gb * 2**30)), *map(str, args)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_refused(proc: subprocess.CompletedProcess[str], *matches: str) -> None:
    """Exit 2 and exactly one ``error:`` line on stderr, holding every one of ``matches``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert all(m in lines[0] for m in matches), lines[0]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = compress(build_arch("seed-cnn", kwargs={"hidden": 32}), Plan(tt=TTSettings(ranks=2), cp=CPSettings(rank=2)))
    return save(model, tmp_path_factory.mktemp("bounds") / "small.tt.pt")


def _tt(h: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in h["layers"].values() if r["format"] == "tt")["config"]


# ---------------------------------------------------------------- defect 2: a TT layer's d


def test_d_is_bounded_by_the_layer_sizes() -> None:
    assert [max_num_cores(*sizes) for sizes in [(490, 32), (4096, 4096), (1, 1), (7, 1)]] == [14, 24, 2, 3]
    assert max_num_cores(2**31 - 1, 2**31 - 1) == 62
    ins, outs = choose_modes(490, 32, d=14)  # the bound itself is accepted
    assert len(ins) == len(outs) == 14
    start = time.perf_counter()
    for d in (15, 1000, 2**31):
        with pytest.raises(ValueError, match=f"d \\(number of TT cores\\) = {d} is more than a 490 -> 32 layer"):
            choose_modes(490, 32, d=d)
        with pytest.raises(ValueError, match="at most 14"):
            TTLinear(490, 32, ranks=2, d=d)
        with pytest.raises(ValueError, match="at most 14"):
            TTEmbedding(32, 490, ranks=2, d=d)
    assert time.perf_counter() - start < 1.0  # refused before any list of d entries is built


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.pop("in_modes") and c.pop("out_modes"), "config lacks in_modes and out_modes"),
        (lambda c: c.update(d=2**31), "must have d = 2147483648 modes"),
        (lambda c: c.pop("out_modes"), "config lacks out_modes"),
    ],
    ids=["no-modes", "d-with-modes", "no-out-modes"],
)
def test_header_tt_record_with_huge_d_is_refused(mutate: Any, match: str, compressed: Path, tmp_path: Path) -> None:
    bad = rewrite_header(compressed, tmp_path / "bad.tt.pt", lambda h: mutate(_tt(h)))
    with pytest.raises(CheckpointError, match=match):
        load(bad)
    assert_one_line_error(invoke("inspect", bad), "cannot rebuild layer", match)


def test_header_tt_record_with_huge_d_is_refused_under_a_memory_cap(compressed: Path, tmp_path: Path) -> None:
    """Before: 4.4 GB in 21 s building a 2**31-entry list of rank caps."""

    def huge_d(h: dict[str, Any]) -> None:
        config = _tt(h)
        del config["in_modes"], config["out_modes"]
        config["d"] = 2**31

    bad = rewrite_header(compressed, tmp_path / "bad.tt.pt", huge_d)
    assert_refused(run_capped("inspect", bad, budget_gb=1), "cannot rebuild layer", "config lacks in_modes")


def test_header_tt_embedding_record_with_huge_d_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 4))
    good = save(compress(model, Plan.from_dict({"rules": [{"pattern": "0", "format": "tt_embedding", "ranks": 2}]})),
                tmp_path / "emb.tt.pt")
    assert load(good, arch=model)(torch.tensor([[1, 2]])).shape == (1, 2, 4)

    def drop_modes(h: dict[str, Any]) -> None:
        config = h["layers"]["0"]["config"]
        del config["vocab_modes"], config["dim_modes"]
        config["d"] = 2**31

    bad = rewrite_header(good, tmp_path / "bad.tt.pt", drop_modes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="config lacks vocab_modes and dim_modes"):
        load(bad, arch=model)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("value", ["2147483648", "1000", "65", "1"])
def test_tt_d_flag_is_bounded(value: str, compressed: Path) -> None:
    assert_one_line_error(invoke("inspect", compressed, "--tt-d", value), "--tt-d", "from 2 to 64")


def test_plan_d_too_large_for_a_layer_keeps_it_dense() -> None:
    model = compress(build_arch("seed-cnn", kwargs={"hidden": 32}), Plan(tt=TTSettings(ranks=2, d=9)))
    assert isinstance(model.classifier[1], TTLinear) and len(model.classifier[1].cores) == 9  # 490 -> 32: up to 14
    assert isinstance(model.classifier[3], nn.Linear)  # 32 -> 10: at most 8 cores


# ---------------------------------------------------------------- defect 3: architectures built for real


def _regnet_file(tmp_path: Path, name: str, arch: str, kwargs: dict[str, Any], params_before: int) -> Path:
    """A ~1 KB file: one empty tensor of shape [2**31, 0] and two layer records claiming
    ``params_before`` dense parameters each (numbers that once inflated the allocation cap)."""
    import json

    from safetensors.torch import save_file

    record = {"format": "cp", "config": {"in_channels": 3, "out_channels": 32, "kernel_size": [3, 3], "rank": 5,
                                         "stride": [2, 2], "padding": [1, 1], "bias": False},
              "params_before": params_before, "params_after": 205}  # fmt: skip
    header = {"format": "ttcompress", "version": 1, "arch": {"name": arch, "kwargs": kwargs},
              "layers": {"stem.0": record, "fc": record}}
    path = tmp_path / name
    save_file({"z": torch.zeros(2**31, 0)}, path, metadata={"format": "ttcompress", "ttcompress": json.dumps(header)})
    assert path.stat().st_size < 2000
    return path


def test_empty_tensor_shapes_and_header_counts_do_not_size_a_real_build(tmp_path: Path) -> None:
    """RegNet is built for real: an int in its kwargs may not exceed a dimension of a tensor that
    holds elements (the empty [2**31, 0] one does not count); before, this asked for 16 GB."""
    bad = _regnet_file(tmp_path, "k.tt.pt", "torchvision:regnet_x_400mf", {"num_classes": 2**31}, 2**31)
    with pytest.raises(CheckpointError, match="num_classes = 2147483648 exceeds every dimension .* \\(largest 1\\)"):
        load(bad)


def test_real_build_allocates_only_small_tensors_before_the_shapes_are_compared(tmp_path: Path) -> None:
    """regnet_y_128gf has 645M parameters (2.6 GB); a 1 KB file naming it is refused by the shape
    comparison with at most 1 GB of address space: its large tensors stay on ``meta``."""
    bad = _regnet_file(tmp_path, "big.tt.pt", "torchvision:regnet_y_128gf", {}, 10**6)
    assert_refused(run_capped("inspect", bad, budget_gb=1, timeout=120), "needs tensor 'stem.0", "not in the file")


def test_large_on_meta_keeps_small_tensors_real() -> None:
    from ttcompress.checkpoint.rebuild import SMALL_TENSOR, _LargeOnMeta

    with _LargeOnMeta():
        small, large = nn.Linear(16, 16), nn.Linear(SMALL_TENSOR, 2)
        values = torch.arange(5)
    assert not small.weight.is_meta and large.weight.is_meta and not large.bias.is_meta
    assert values.tolist() == [0, 1, 2, 3, 4]  # what RegNet's __init__ reads


# ---------------------------------------------------------------- defect 12: numeric header fields

BAD_NUMBERS = [
    ("params_before", "x", "params_before must be a non-negative int or null"),
    ("params_after", "x", "params_after must be a non-negative int or null"),
    ("params_before", 1.5, "params_before must be a non-negative int"),
    ("params_after", -1, "params_after must be a non-negative int"),
    ("params_before", True, "params_before must be a non-negative int"),
    ("params_before", 2**40, "out of range"),
    ("seconds", "fast", "seconds must be a non-negative number or null"),
    ("rel_error", -0.5, "rel_error must be a non-negative number"),
    ("out_error_after", [1], "out_error_after must be a non-negative number"),
    ("note", 3, "note must be a string or null"),
]


@pytest.mark.parametrize(("key", "value", "match"), BAD_NUMBERS, ids=[f"{k}={v!r}" for k, v, _ in BAD_NUMBERS])
def test_header_numbers_are_type_checked(key: str, value: Any, match: str, compressed: Path, tmp_path: Path) -> None:
    def mutate(h: dict[str, Any]) -> None:
        next(iter(h["layers"].values()))[key] = value

    bad = rewrite_header(compressed, tmp_path / "bad.tt.pt", mutate)
    with pytest.raises(CheckpointError, match=match.replace("(", r"\(")):
        load(bad)
    assert_one_line_error(invoke("inspect", bad), match)


def test_header_kept_dense_reasons_are_type_checked(compressed: Path, tmp_path: Path) -> None:
    bad = rewrite_header(compressed, tmp_path / "bad.tt.pt", lambda h: h["info"].update(kept_dense=["x"]))
    assert_one_line_error(invoke("inspect", bad), "info.kept_dense must be an object of strings")


# ---------------------------------------------------------------- defect 13: sizes given on the command line


def test_allocator_errors_are_worded() -> None:
    from ttcompress.memory import out_of_memory_message

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 256000000000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory_message(cpu) == "out of memory: an allocation needs 238,418,579.1 GB, more than is available"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity ...")
    assert out_of_memory_message(cuda) == "out of memory: an allocation needs 20.0 GB, more than is available"
    assert out_of_memory_message(RuntimeError("shapes cannot be multiplied")) is None
    assert out_of_memory_message(ValueError("can't allocate memory")) is None


def test_huge_input_shape_is_refused_before_allocating(tmp_path: Path) -> None:
    base = save(build_arch("seed-cnn", kwargs={"hidden": 8}), tmp_path / "base.tt.pt")
    result = invoke("report", base, base, "--data", "none", "--input-shape", "100000,100000,100000")
    assert_one_line_error(result, "out of memory: an input batch of", "[100000, 100000, 100000] needs", "GB")


def test_huge_arch_kwargs_give_one_out_of_memory_line(tmp_path: Path) -> None:
    torch.save(build_arch("seed-cnn", kwargs={"hidden": 8}).state_dict(), tmp_path / "sd.pth")
    proc = run_capped("inspect", tmp_path / "sd.pth", "--arch", "seed-cnn", "--arch-kwargs", '{"hidden": 2000000000}')
    assert_refused(proc, "out of memory: an allocation needs", "GB")
