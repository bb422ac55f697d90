"""Ties in the greedy rank allocation (issue 25: data-free compression at real size)."""

from __future__ import annotations

import torch
from torch import nn

from ttcompress.compression.allocate import Slot, allocate, greedy
from ttcompress.formats import get_format
from ttcompress.formats.base import Ladder


def test_zero_gains_spread_the_rest_of_the_budget():
    # two equal (k, 1) convs: CP's error estimate is 0 from rank 16 on (every mode's rank); the
    # budget left after that used to go to the first conv alone
    torch.manual_seed(4)
    first = nn.Conv2d(16, 16, (16, 1), bias=False)
    second = nn.Conv2d(16, 16, (16, 1), bias=False)
    second.weight.data.copy_(first.weight.data)
    fmt = get_format("cp")
    slots = [Slot(m, fmt.decide(m, n, None, lowest=True)) for n, m in (("a", first), ("b", second))]
    total = 2 * first.weight.numel()
    a, b = allocate(slots, total=total, target_ratio=4.0)
    assert a.options["rank"] >= 16 and b.options["rank"] >= 16
    assert abs(a.options["rank"] - b.options["rank"]) <= 1
    assert a.params_after + b.params_after <= total / 4


def test_zero_gains_go_to_the_layer_smallest_for_its_size():
    # flat ladders (no gain anywhere): the layer at the smallest fraction of its top level grows first
    small = Ladder((10, 20, 30, 40), (0.0, 0.0, 0.0, 0.0), ({}, {}, {}, {}))
    large = Ladder((10, 110, 210, 310, 410), (0.0,) * 5, ({},) * 5)
    levels = greedy({0: small, 1: large}, spent=20, budget=20 + 10 + 100)
    assert levels == {0: 1, 1: 1}  # before: {0: 3, 1: 0}, the first layer took every step it could
    # positive gains still decide first
    steep = Ladder((10, 20, 30), (1.0, 0.1, 0.0), ({},) * 3)
    assert greedy({0: small, 1: steep}, spent=20, budget=30) == {0: 0, 1: 1}


def test_the_objective_never_starves_a_layer_to_rank_one() -> None:
    # Two equal layers whose squared error falls linearly with parameters: under sum(e^2) every
    # step has the same gain, and ties could leave one layer at its lowest level; under
    # -log(1 - e^2) the gain of a step grows as a layer nears losing everything, so both grow.
    from ttcompress.compression.allocate import greedy, lost_energy
    from ttcompress.formats.base import Ladder

    ladder = Ladder(params=tuple(range(10, 110, 10)), errors=tuple(1.0 - k / 10 for k in range(10)),
                    options=tuple({} for _ in range(10)))
    levels = greedy({0: ladder, 1: ladder}, spent=20, budget=120)
    assert levels[0] >= 3 and levels[1] >= 3 and abs(levels[0] - levels[1]) <= 1
    assert lost_energy(0.0) == 0.0 and lost_energy(1.0) > 20 and lost_energy(0.5) > 0.5
