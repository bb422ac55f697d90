"""The default calibration budget: a quarter of the free memory, capped (issue 25)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttcompress.calibration import budget
from ttcompress.calibration.budget import (
    DEFAULT_MAX_CALIB_MEMORY,
    MIN_CALIB_MEMORY,
    check_calib_memory,
    default_calib_memory,
)
from ttcompress.calibration.collector import StatsCollector


@pytest.mark.parametrize(("available", "expected"), [
    (24 * 2**30, DEFAULT_MAX_CALIB_MEMORY),  # a quarter would be 6 GiB: capped
    (4 * 2**30, 2**30),  # a quarter
    (32 * 2**20, MIN_CALIB_MEMORY),  # never below the minimum
])
def test_default_budget_is_a_quarter_of_free_memory_capped(monkeypatch: pytest.MonkeyPatch, available: int,
                                                           expected: int) -> None:
    monkeypatch.setattr(budget, "available_memory", lambda device=None: available)
    assert default_calib_memory() == expected
    assert check_calib_memory(None) == expected


def test_an_explicit_budget_is_not_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "available_memory", lambda device=None: 64 * 2**30)
    assert check_calib_memory("6G") == 6 * 2**30


def test_the_cap_leaves_exact_statistics_and_the_widest_full_sketch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact Grams (chosen up to K = 4,096) and a 1,024-row sketch up to K = 52,428 fit the capped default."""
    monkeypatch.setattr(budget, "available_memory", lambda device=None: 64 * 2**30)
    coll = StatsCollector([torch.randn(2, 8)])
    assert coll.memory == DEFAULT_MAX_CALIB_MEMORY
    exact = coll.choose(nn.Linear(4096, 11008, device="meta"), rank=10**6)
    assert exact.kind == "exact" and exact.bytes <= coll.memory
    wide = coll.choose(nn.Linear(52_428, 4096, device="meta"), rank=10**6)
    assert (wide.kind, wide.rows) == ("sketch", 1024)
    wider = coll.choose(nn.Linear(65_536, 4096, device="meta"), rank=10**6)
    assert wider.kind == "sketch" and wider.rows == 512 and wider.bytes <= coll.memory
