"""Calibration holds one layer's statistics at a time (issue 25): the allocator's statistics of every
layer are released before the first layer's paired statistics are collected, and each layer's
before the next layer's."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from ttcompress.calibration.collector import StatsCollector
from ttcompress.compression.pipeline import compress_with_report
from ttcompress.compression.plan import Plan


def test_statistics_are_released_before_the_next_layers_are_collected(monkeypatch: pytest.MonkeyPatch) -> None:
    alive: list[tuple[str, weakref.ref]] = []
    collected: list[str] = []
    input_stats, layer_stats = StatsCollector.input_stats, StatsCollector.layer_stats

    def recorded_input_stats(self, model, names):  # type: ignore[no-untyped-def]
        stats, notes = input_stats(self, model, names)
        alive.extend((f"allocator {n}", weakref.ref(s)) for n, s in stats.items())
        return stats, notes

    def recorded_layer_stats(self, dense_model, model, name, **kwargs):  # type: ignore[no-untyped-def]
        held = [label for label, ref in alive if ref() is not None]
        assert not held, f"still held while collecting layer {name!r}: {held}"
        stats, choice = layer_stats(self, dense_model, model, name, **kwargs)
        collected.append(name)
        if stats is not None:
            alive.append((f"layer {name}", weakref.ref(stats)))
        return stats, choice

    monkeypatch.setattr(StatsCollector, "input_stats", recorded_input_stats)
    monkeypatch.setattr(StatsCollector, "layer_stats", recorded_layer_stats)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8))
    result = compress_with_report(model, Plan(target_ratio=2.0, formats=("svd",)), calib_data=torch.randn(96, 64))
    assert any(alive) and len(collected) >= 2  # the allocator ran, and several layers were fitted
    assert any(r.fit_method for r in result.records)
