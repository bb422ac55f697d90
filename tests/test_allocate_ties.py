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
    assert lost_energy(0.0) == 0.0 and lost_energy(1.0) > 4.6 and lost_energy(0.5) > 0.5


def test_estimates_above_one_still_rank_the_steps() -> None:
    # A TT error estimate is a bound that may exceed 1 at low ranks (here e^2 from 1.9 down). When
    # -log(1 - e^2) was clipped there, every step among those levels gained nothing, and the budget
    # went to a small layer whose levels were all below 1, up to its top; the wide layer stayed at
    # its lowest level (a GPT-2 at 4x data-free: MLP layers at 36x, perplexity 430 instead of 329).
    from ttcompress.compression.allocate import LOG_LIMIT, greedy, lost_energy

    wide = Ladder(params=tuple(range(100, 2100, 100)), errors=tuple(1.9 - 0.1 * k for k in range(20)),
                  options=({},) * 20)
    small = Ladder(params=tuple(range(50, 1100, 50)), errors=tuple(0.5 - 0.025 * k for k in range(21)),
                   options=({},) * 21)
    levels = greedy({0: wide, 1: small}, spent=150, budget=150 + 1000)
    assert levels[0] >= 9  # before: {0: 0, 1: 20}, the wide layer stayed at its lowest level
    assert lost_energy(1.9) > lost_energy(1.5) > lost_energy(1.0) > lost_energy(LOG_LIMIT) > lost_energy(0.5)
    # continuous at the switch, and the log below it
    assert abs(lost_energy(LOG_LIMIT - 1e-12) - lost_energy(LOG_LIMIT)) < 1e-6
    assert lost_energy(0.75) == __import__("math").log(4.0)
