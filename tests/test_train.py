"""The training loop: end-to-end, determinism, resume, Ctrl-C, NaN, distillation, fine-tuning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from ttcompress.data import DatasetBundle, load_dataset
from ttcompress.errors import CheckpointError, TrainingError
from ttcompress.checkpoint.io import read_header, update_meta
from ttcompress.checkpoint.models import build_arch
from ttcompress.report.evaluation import evaluate, resolve_device
from ttcompress.training import (
    EpochRecord,
    FinetuneConfig,
    TrainCallback,
    TrainConfig,
    finetune,
    run_paths,
    train,
)




@pytest.fixture(scope="module")
def tiny() -> DatasetBundle:
    """Every 8th mnist-5k training digit (500) and every 4th test digit (250), all classes."""
    full = load_dataset("mnist-5k")
    return dataclasses.replace(
        full, train=Subset(full.train, range(0, 4000, 8)), test=Subset(full.test, range(0, 1000, 4))
    )


CPU = dict(device="cpu", batch_size=32)


def seeded(name: str = "seed-cnn", seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_arch(name, kwargs=kwargs or None)


def mlp_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def baseline(tiny: DatasetBundle, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    model = seeded()
    train(model, tiny, output=tmp_path_factory.mktemp("base") / "base.pt", config=TrainConfig(epochs=3, **CPU))
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ end to end


def test_short_train_end_to_end(tiny: DatasetBundle, tmp_path: Path) -> None:
    model = seeded()
    before = evaluate(model, tiny).accuracy
    out = tmp_path / "run" / "model.pt"
    result = train(model, tiny, output=out, config=TrainConfig(epochs=2, **CPU))
    paths = run_paths(out)
    assert result.best_accuracy is not None and result.best_accuracy > before + 0.3
    assert [r.epoch for r in result.history] == [1, 2] and not result.interrupted
    assert paths.best.exists() and paths.last.exists() and paths.resume.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["model.pt", "model.last.pt", "model.resume.pt", "model.metrics.jsonl"]
    )
    lines = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and lines[0]["mode"] == "train"
    assert set(EpochRecord.__dataclass_fields__) <= set(lines[0])
    state = torch.load(paths.resume, weights_only=True)
    assert state["epoch"] == 2 and set(state["model"]) == set(model.state_dict())
    header = read_header(paths.best)
    assert header is not None and header["arch"]["name"] == "seed-cnn"
    info = header["info"]
    assert info["dataset"] == "mnist-5k" and info["num_classes"] == 10 and info["input_shape"] == [1, 28, 28]
    assert info["history"][-1]["op"] == "train" and info["history"][-1]["best_epoch"] == result.best_epoch
    assert model.ttcompress_meta["info"]["history"][-1]["epochs"] == 2
    # evaluation is eval-mode and leaves the mode alone
    model.train()
    final = evaluate(model, tiny)
    assert model.training and final.n == 250 and final.top5 is not None and final.top5 >= final.accuracy


def test_same_seed_same_weights(tiny: DatasetBundle, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, max_batches=4, seed=5, **CPU)
    runs = []
    for i in range(2):
        model = mlp_with_dropout()
        train(model, tiny, output=tmp_path / f"{i}.pt", config=cfg)
        runs.append(model)
    assert same_weights(*runs)
    other = mlp_with_dropout()
    train(other, tiny, output=tmp_path / "other.pt", config=dataclasses.replace(cfg, seed=6))
    assert not same_weights(runs[0], other)


class _InterruptAt(TrainCallback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, *, epoch: int, steps: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_ctrl_c_then_resume_equals_uninterrupted(tiny: DatasetBundle, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=3, max_batches=5, optimizer="sgd", lr=0.05, schedule="cosine", **CPU)
    full = mlp_with_dropout()
    train(full, tiny, output=tmp_path / "a.pt", config=cfg)

    part = mlp_with_dropout()
    first = train(part, tiny, output=tmp_path / "b.pt", config=cfg, progress=_InterruptAt(3))
    assert first.interrupted and [r.epoch for r in first.history] == [1, 2]
    paths = run_paths(tmp_path / "b.pt")
    assert paths.last.exists() and torch.load(paths.resume, weights_only=True)["epoch"] == 2

    resumed = mlp_with_dropout()  # fresh weights: everything must come from the resume state
    second = train(resumed, tiny, output=tmp_path / "b.pt", config=cfg, resume=True)
    assert second.start_epoch == 2 and [r.epoch for r in second.history] == [1, 2, 3]
    assert same_weights(full, resumed)
    assert len(paths.metrics.read_text().splitlines()) == 3


def test_resume_without_state(tiny: DatasetBundle, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no resume state"):
        train(seeded(), tiny, output=tmp_path / "x.pt", config=TrainConfig(**CPU), resume=True)
    assert list(tmp_path.iterdir()) == []


class _NaNAfter(nn.Module):
    """Returns NaN logits from the ``after``-th training forward on."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        y = self.net(x)
        return y * float("nan") if self.training and self.calls > self.after else y


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny: DatasetBundle, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=3, max_batches=3, **CPU)
    with pytest.raises(TrainingError, match="NaN.*epoch 1.*no checkpoint"):
        train(_NaNAfter(1), tiny, output=tmp_path / "a" / "m.pt", config=cfg)
    assert not (tmp_path / "a").exists()
    with pytest.raises(TrainingError, match="NaN.*epoch 2.*epoch 1"):
        train(_NaNAfter(4), tiny, output=tmp_path / "b" / "m.pt", config=cfg)
    paths = run_paths(tmp_path / "b" / "m.pt")
    assert paths.best.exists() and paths.last.exists()
    assert len(paths.metrics.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 7}, "7 outputs but the dataset has 10 classes"), ({"in_channels": 3}, "cannot take")],
)
def test_model_that_does_not_fit_the_data(tiny: DatasetBundle, tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(seeded(**kwargs), tiny, output=tmp_path / "m.pt", config=TrainConfig(**CPU))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ devices/config


def test_auto_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for bad in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(bad)
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(ValueError, match="auto, cpu, cuda"):
            resolve_device(bad)


def test_amp_needs_cuda(tiny: DatasetBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="amp='bf16' needs a CUDA device"):
        train(seeded(), tiny, output=tmp_path / "m.pt", config=TrainConfig(amp="bf16", device="auto"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("optimizer", "rmsprop"), ("schedule", "linear"),
     ("amp", "fp8"), ("train_only", "some"), ("distill_alpha", 1.5), ("max_batches", 0), ("seed", -1)],
)  # fmt: skip
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(("optimizer", "schedule"), [("sgd", "step"), ("adamw", "cosine"), ("adadelta", "none")])
def test_optimizers_and_schedules(tiny: DatasetBundle, tmp_path: Path, optimizer: str, schedule: str) -> None:
    lr = 1.0 if optimizer == "adadelta" else 0.01
    cfg = TrainConfig(epochs=2, max_batches=2, optimizer=optimizer, schedule=schedule, lr=lr, weight_decay=1e-4, **CPU)
    result = train(seeded(), tiny, output=tmp_path / "m.pt", config=cfg)
    lrs = [r.lr for r in result.history]
    assert lrs[0] == pytest.approx(lr)
    if schedule == "step":
        assert lrs[1] == pytest.approx(lr * 0.1)
    elif schedule == "cosine":
        assert lrs[1] == pytest.approx(lr * 0.5)


def test_evaluate_small_class_count_has_no_top5() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    data = torch.utils.data.TensorDataset(x, y)
    model.train()
    res = evaluate(model, data, batch_size=8)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert res.top5 is None and res.n == 20
    assert res.accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert res.loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="topk"):
        evaluate(model, data, topk=(0,))


# --------------------------------------------------------------------------- fine-tuning


def compressed_copy(baseline: nn.Module) -> nn.Module:
    import copy

    from ttcompress.layers.tt_linear import TTLinear

    model = copy.deepcopy(baseline)
    dense = model.classifier[1]
    tt = TTLinear.from_linear(dense, ranks=8)
    model.classifier[1] = tt
    layers = {
        "classifier.1": {"format": "tt", "config": tt.config(), "rel_error": tt.rel_error, "seconds": None,
                         "params_before": dense.weight.numel() + dense.bias.numel(),
                         "params_after": sum(p.numel() for p in tt.parameters())},
    }  # fmt: skip
    try:
        from ttcompress.layers.cp_conv import CPConv2d
    except ImportError:
        pass
    else:
        conv = model.features[3]
        cp = CPConv2d.from_conv(conv, rank=3)
        model.features[3] = cp
        layers["features.3"] = {"format": "cp", "config": cp.config(), "rel_error": cp.rel_error, "seconds": None,
                                "params_before": sum(p.numel() for p in conv.parameters()),
                                "params_after": sum(p.numel() for p in cp.parameters())}  # fmt: skip
    update_meta(model, layers=layers)
    return model


def test_finetune_recovers_accuracy_training_only_decomposed(
    tiny: DatasetBundle, baseline: nn.Module, tmp_path: Path
) -> None:
    pytest.importorskip("ttcompress.layers.tt_linear")
    model = compressed_copy(baseline)
    frozen_before = {k: v.clone() for k, v in model.named_parameters() if not k.startswith(("classifier.1", "features.3"))}
    before = evaluate(model, tiny).accuracy
    cfg = FinetuneConfig(epochs=2, lr=2e-3, train_only="decomposed", **CPU)
    result = finetune(model, tiny, output=tmp_path / "ft.pt", config=cfg)
    assert result.best_accuracy is not None and result.best_accuracy > before + 0.2
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(model.classifier[1].cores, compressed_copy(baseline).classifier[1].cores))
    header = read_header(tmp_path / "ft.pt")
    assert header is not None and "classifier.1" in header["layers"] and header["info"]["history"][-1]["op"] == "finetune"


def test_train_only_decomposed_needs_decomposed_layers(tiny: DatasetBundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no decomposed layers"):
        finetune(seeded(), tiny, output=tmp_path / "m.pt", config=FinetuneConfig(train_only="decomposed", **CPU))


def test_distillation_runs_and_teaches(tiny: DatasetBundle, baseline: nn.Module, tmp_path: Path) -> None:
    student = seeded(seed=1)
    cfg = FinetuneConfig(epochs=1, lr=2e-3, schedule="none", distill_alpha=0.7, distill_temperature=3.0, **CPU)
    result = finetune(student, tiny, output=tmp_path / "kd.pt", config=cfg, teacher=baseline)
    rec = result.history[0]
    assert torch.isfinite(torch.tensor(rec.train_loss)) and evaluate(student, tiny).accuracy > 0.3
    assert all(p.requires_grad for p in baseline.parameters())  # the teacher itself is left alone
    bad_teacher = seeded(num_classes=7)
    with pytest.raises(ValueError, match="teacher does not fit mnist-5k: it has 7 outputs"):
        finetune(seeded(), tiny, output=tmp_path / "kd2.pt", config=cfg, teacher=bad_teacher)


def test_holdout_split_is_fixed_disjoint_and_leaves_the_test_split_alone(tiny: DatasetBundle) -> None:
    from ttcompress.training import holdout_split

    train_a, val_a = holdout_split(tiny, fraction=0.1)
    train_b, val_b = holdout_split(tiny, fraction=0.1)
    n = len(tiny.train)
    assert len(val_a) == max(1, round(0.1 * n)) and len(train_a) + len(val_a) == n
    assert set(train_a.indices).isdisjoint(val_a.indices)
    assert val_a.indices == val_b.indices  # the same samples in every run
    assert holdout_split(tiny, fraction=0.0) == (tiny.train, tiny.test)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_finetune_never_returns_a_model_worse_than_its_start(
    tiny: DatasetBundle, baseline: nn.Module, tmp_path: Path
) -> None:
    # A learning rate this large wrecks the trained model in one epoch (SGD, no schedule): the
    # starting model, scored on the validation split as epoch 0, must be what -o holds.
    from ttcompress.checkpoint.io import load

    model = seeded()
    model.load_state_dict(baseline.state_dict())
    start = evaluate(model, tiny).accuracy
    cfg = FinetuneConfig(epochs=1, lr=5.0, optimizer="sgd", schedule="none", **CPU)
    result = finetune(model, tiny, output=tmp_path / "ft.pt", config=cfg)
    assert result.start is not None and result.start.epoch == 0 and result.start.val_accuracy is not None
    assert result.history[0].val_accuracy < result.start.val_accuracy  # the epoch did get worse
    assert result.best_epoch == 0 and result.kept_start and result.to_dict()["kept_start"] is True
    assert result.best_accuracy == result.start.val_accuracy
    kept = load(tmp_path / "ft.pt", arch=seeded())
    assert same_weights(kept, baseline) and evaluate(kept, tiny).accuracy == pytest.approx(start)


def test_finetune_that_improves_replaces_its_start(tiny: DatasetBundle, baseline: nn.Module, tmp_path: Path) -> None:
    model = compressed_copy(baseline)
    result = finetune(model, tiny, output=tmp_path / "ft.pt", config=FinetuneConfig(epochs=1, lr=2e-3, **CPU))
    assert result.start is not None and result.best_epoch == 1 and not result.kept_start
    assert result.best_accuracy > result.start.val_accuracy
