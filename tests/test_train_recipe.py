"""Fine-tuning recipe options: per-step warm-up cosine schedule, per-group learning rates, the lone last batch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from ttcompress.data import DatasetBundle, load_dataset
from ttcompress.errors import UserInputError
from ttcompress.training import FinetuneConfig, TrainConfig, train
from ttcompress.training.loop import lone_last_batch
from ttcompress.training.optim import make_optimizer, make_scheduler, param_groups


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model.ttcompress_meta = {"layers": {"1": {}}}  # type: ignore[assignment]
    return model


def test_warmup_cosine_rises_linearly_then_anneals_to_zero() -> None:
    model = two_layer()
    config = TrainConfig(lr=1.0, epochs=2, schedule="warmup-cosine", warmup=0.2)
    opt = make_optimizer(list(model.parameters()), config)
    sched = make_scheduler(opt, config, steps_per_epoch=10)  # 20 steps, 4 of warm-up
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 16)) for k in range(16)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert make_scheduler(opt, TrainConfig(schedule="warmup-cosine", warmup=0.0), steps_per_epoch=3) is not None


def test_decomposed_layers_get_their_own_learning_rate() -> None:
    model = two_layer()
    params = list(model.parameters())
    assert param_groups(model, params, TrainConfig(lr=0.1)) == [{"params": params}]
    opt = make_optimizer(param_groups(model, params, TrainConfig(lr=0.1, decomposed_lr_scale=0.5)), TrainConfig(lr=0.1))
    rest, ours = opt.param_groups
    assert rest["lr"] == pytest.approx(0.1) and ours["lr"] == pytest.approx(0.05)
    assert {id(p) for p in ours["params"]} == {id(p) for p in model[1].parameters()}
    assert {id(p) for p in rest["params"]} == {id(p) for p in model[0].parameters()}


@pytest.mark.parametrize("bad", [{"decomposed_lr_scale": 0.0}, {"warmup": 1.0}, {"warmup": -0.1}, {"schedule": "x"}])
def test_bad_recipe_options_name_the_parameter(bad: dict[str, object]) -> None:
    with pytest.raises(UserInputError, match=next(iter(bad))):
        FinetuneConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "batch", "world", "drop"),
    [(65, 64, 1, True), (64, 64, 1, False), (66, 64, 1, False), (1, 64, 1, False), (129, 64, 2, True),
     (130, 64, 2, True), (131, 64, 2, False), (33, 32, 1, True)],
)  # fmt: skip
def test_lone_last_batch(n: int, batch: int, world: int, drop: bool) -> None:
    assert lone_last_batch(n, batch_size=batch, world_size=world) is drop


def test_batchnorm_model_trains_when_the_last_batch_would_hold_one_sample(tmp_path: Path) -> None:
    full = load_dataset("mnist-5k")
    # 37 training samples after the 10% hold-out of 41: batches of 4 leave a lone last sample.
    bundle = dataclasses.replace(full, train=Subset(full.train, range(41)), test=Subset(full.test, range(20)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    result = train(model, bundle, output=tmp_path / "m.pt", config=TrainConfig(epochs=1, batch_size=4, device="cpu"))
    assert len(result.history) == 1 and math.isfinite(result.history[0].train_loss)

