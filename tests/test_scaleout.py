"""Decomposition under torchrun: shares per rank, and the same checkpoint as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ttcompress.formats import LayerDecision
from ttcompress.checkpoint.io import read_header, save
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.scaleout import assign_shares, build_all


def _decision(name: str, params: int) -> LayerDecision:
    return LayerDecision(name, "Linear", (1, 1), "tt", {}, params, None)


def test_shares_are_balanced_deterministic_and_cover_every_layer() -> None:
    decisions = [_decision(f"l{i}", p) for i, p in enumerate([100, 90, 10, 10, 10, 80, 5])]
    owner = assign_shares(decisions, 2)
    assert owner == assign_shares(decisions, 2) and set(owner) == {0, 1}
    # largest first, each to the lighter rank: 100→0, 90→1, 80→1, 10→0, 10→0, 10→0, 5→0
    assert owner == [0, 1, 0, 0, 0, 1, 0]
    assert assign_shares(decisions, 1) == [0] * len(decisions)
    with pytest.raises(ValueError, match="world_size"):
        assign_shares(decisions, 0)


def test_single_process_builds_everything_in_order() -> None:
    calls = []
    built = build_all([_decision("a", 3), _decision("b", 5)], lambda d: calls.append(d.name) or torch.nn.Identity())
    assert calls == ["a", "b"] and list(built) == ["a", "b"]


def test_two_gloo_processes_write_the_same_checkpoint_as_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save(build_arch("seed-cnn", kwargs={"hidden": 64}), tmp_path / "base.pt")
    common = ["decompose", str(base), "--tt-ranks", "4", "--cp-ranks", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "ttcompress", *common, "-o", str(tmp_path / "one.tt.pt")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ttcompress", *common, "-o", str(tmp_path / "two.tt.pt")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") <= 1 and two.stderr.count("wrote") == 1  # rank 0 alone reports
    a, b = load_file(str(tmp_path / "one.tt.pt")), load_file(str(tmp_path / "two.tt.pt"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    ha, hb = read_header(tmp_path / "one.tt.pt"), read_header(tmp_path / "two.tt.pt")
    assert {n: r["config"] for n, r in ha["layers"].items()} == {n: r["config"] for n, r in hb["layers"].items()}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
