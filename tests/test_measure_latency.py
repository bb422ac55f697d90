"""Latency measured like a benchmark: interleaved rounds, a spread, a flag when the spread is large."""

from __future__ import annotations

import time

import torch
from torch import nn

from ttcompress.report.measure import NOISY_SPREAD, LatencyStats, measure_latencies, measure_latency


class Sleeper(nn.Module):
    """A forward pass of a fixed duration (sleep), plus a tiny op so there is a graph."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.lin(x)


def test_interleaved_rounds_rank_models_and_agree_on_copies() -> None:
    # 20 ms calls: a busy machine's scheduling delays (~1 ms) stay well under the 10 % asked of copies
    slow_a, slow_b, fast = Sleeper(0.02), Sleeper(0.02), Sleeper(0.005)
    stats = measure_latencies([slow_a, fast, slow_b], (4,), batch_size=2, min_run_time=0.2)
    assert all(isinstance(s, LatencyStats) and s.rounds >= 7 for s in stats)
    a, f, b = (s.median_ms for s in stats)
    assert 19 < a < 30 and 4.5 < f < 12 and a > 1.5 * f
    assert abs(a - b) / min(a, b) < 0.10  # the same model twice in one measurement agrees within 10 %


def test_spread_is_reported_and_flagged() -> None:
    steady = measure_latencies([Sleeper(0.002)], (4,), batch_size=1, min_run_time=0.05)[0]
    assert steady.iqr_ms >= 0 and steady.spread == steady.iqr_ms / steady.median_ms
    assert LatencyStats(median_ms=2.0, iqr_ms=0.5, rounds=7, calls_per_round=1).noisy  # 25 %
    assert not LatencyStats(median_ms=2.0, iqr_ms=0.1, rounds=7, calls_per_round=1).noisy  # 5 %
    assert NOISY_SPREAD == 0.10
    median, iqr = measure_latency(Sleeper(0.002), (4,), batch_size=1, min_run_time=0.05)
    assert 1.5 < median < 5 and iqr >= 0
