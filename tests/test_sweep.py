"""Sweeps: settings, the per-setting cache, resuming an interrupted sweep, calibration."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.data import DatasetBundle
from ttcompress.checkpoint.io import load, save
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import plan_layers
from ttcompress.sweep import SweepSetting, run_sweep, sweep_settings
from ttcompress.training import FinetuneConfig, TrainCallback


@pytest.fixture
def bundle() -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    ds = TensorDataset(x, y)
    return DatasetBundle(name="toy", train=ds, test=ds, num_classes=4, input_shape=(1, 8, 8), classes=tuple("abcd"))


@pytest.fixture
def baseline(tmp_path):
    torch.manual_seed(0)
    model = build_arch("seed-cnn", kwargs={"input_size": 8, "num_classes": 4, "hidden": 16})
    return save(model, tmp_path / "base.pt")


def test_settings_are_the_cross_product_of_the_axes() -> None:
    settings = sweep_settings(tt_ranks=[2, 4], tt_eps=[0.5], cp_ranks=[3, 6])
    assert [s.key for s in settings] == [
        "tt-r2_cp-r3", "tt-r2_cp-r6", "tt-r4_cp-r3", "tt-r4_cp-r6", "tt-e0.5_cp-r3", "tt-e0.5_cp-r6",
    ]  # fmt: skip
    assert [s.label for s in sweep_settings(cp_ranks=[3])] == ["CP r3"]
    # None on an axis: that layer type stays dense; the all-dense combination is left out.
    assert [s.label for s in sweep_settings(tt_ranks=[None, 8], cp_ranks=[None, 3])] == ["CP r3", "TT r8", "TT r8 + CP r3"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({}, "at least one"), ({"cp_ranks": [0]}, "positive"), ({"tt_eps": [1.5]}, r"\(0, 1\)"), ({"tt_ranks": [2, 2]}, "duplicate")],
)
def test_bad_settings_are_value_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sweep_settings(**kwargs)


def test_an_axis_left_out_keeps_that_layer_type_dense() -> None:
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(256, 256))

    def formats(setting: SweepSetting) -> list[str]:
        return [d.format for d in plan_layers(net, setting.plan())]

    assert formats(SweepSetting(cp_rank=3)) == ["cp", "dense"]
    assert formats(SweepSetting(tt_ranks=2)) == ["dense", "tt"]
    assert formats(SweepSetting(tt_ranks="none", cp_ratio=2.0)) == ["cp", "dense"]
    # a target ratio covers every layer type (auto); the allocator may still keep a layer dense, and
    # then says why in its own words (here: the budget leaves the small conv almost uncompressed)
    decisions = plan_layers(net, SweepSetting(target_ratio=2.0).plan())
    assert decisions[1].format == "auto"
    assert decisions[0].format == "auto" or "budget" in (decisions[0].skipped or "")


def test_every_axis_takes_lists_and_none() -> None:
    settings = sweep_settings(tt_d=[2, "none"], cp_ratio=[2.0, "none"], tt_ranks=[4], target_ratios=["none"])
    assert [s.label for s in settings] == ["TT r4 + TT d2 + CP ×2", "TT r4 + TT d2", "TT r4 + CP ×2", "TT r4"]
    assert [s.key for s in sweep_settings(target_ratios=[2, 4.5])] == ["target-x2", "target-x4.5"]
    with pytest.raises(ValueError, match="target_ratio"):
        sweep_settings(target_ratios=[4], cp_ranks=[3])  # fixed ranks and a target ratio
    with pytest.raises(ValueError, match="compresses nothing"):
        sweep_settings(tt_ranks=["none"])


class _StopAfter(TrainCallback):
    """Simulates Ctrl-C at the end of the n-th epoch seen."""

    def __init__(self, epochs: int) -> None:
        self.left = epochs

    def on_epoch_end(self, record) -> None:  # noqa: ANN001
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_resumes_where_it_stopped(bundle, baseline, tmp_path) -> None:
    settings = sweep_settings(tt_ranks=[2], cp_ranks=[2, 3])
    config = FinetuneConfig(epochs=2, lr=1e-3, device="cpu", batch_size=16)
    out = tmp_path / "sweep"
    # Interrupt during the second epoch of the second setting.
    with pytest.raises(KeyboardInterrupt):
        run_sweep(baseline, bundle=bundle, settings=settings, output_dir=out, config=config, progress=_StopAfter(3))
    done = sorted(p.parent.name for p in out.glob("*/result.json"))
    assert len(done) == 1 and done[0].startswith("tt-r2_cp-r2")

    lines: list[str] = []
    results = run_sweep(baseline, bundle=bundle, settings=settings, output_dir=out, config=config, log=lines.append)
    assert [r.cached for r in results] == [True, False]
    assert any("cached" in line for line in lines) and any("reusing the decomposed model" in line for line in lines)
    # The resumed setting ran both epochs: 1 before the interruption, 1 after.
    metrics = (results[1].model_path.parent / "model.metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in metrics] == [1, 2]
    for result in results:
        model = load(result.model_path)
        n = sum(p.numel() for p in model.parameters())
        assert result.params == n and 0.0 <= result.accuracy_after <= 1.0
    # Nothing left to do on a third run.
    assert all(r.cached for r in run_sweep(baseline, bundle=bundle, settings=settings, output_dir=out, config=config))


def test_changing_the_finetune_options_does_not_reuse_the_cache(bundle, baseline, tmp_path) -> None:
    settings = [SweepSetting(cp_rank=2)]
    out = tmp_path / "sweep"
    first = run_sweep(baseline, bundle=bundle, settings=settings, output_dir=out,
                      config=FinetuneConfig(epochs=1, device="cpu", batch_size=32))  # fmt: skip
    second = run_sweep(baseline, bundle=bundle, settings=settings, output_dir=out,
                       config=FinetuneConfig(epochs=1, device="cpu", batch_size=32, lr=1e-2))  # fmt: skip
    assert not second[0].cached and first[0].model_path != second[0].model_path


def test_sweep_cli_bad_list_exits_2(baseline) -> None:
    result = CliRunner().invoke(app, ["sweep", str(baseline), "--cp-ranks", "3,x"])
    assert result.exit_code == 2 and "--cp-ranks" in result.stderr and "Traceback" not in result.stderr


def test_a_sweep_calibrates_on_the_training_split_by_default(bundle, baseline, tmp_path) -> None:
    from ttcompress.checkpoint.io import read_header

    settings = [SweepSetting(cp_rank=2)]
    config = FinetuneConfig(epochs=1, device="cpu", batch_size=32)
    calibrated = run_sweep(baseline, bundle=bundle, settings=settings, output_dir=tmp_path / "s", config=config,
                           calib_samples=16)  # fmt: skip
    free = run_sweep(baseline, bundle=bundle, settings=settings, output_dir=tmp_path / "s", config=config,
                     calib_samples=None)  # fmt: skip
    assert calibrated[0].model_path != free[0].model_path  # the calibration is part of the cache key
    info = read_header(calibrated[0].model_path.parent / "decomposed.pt")["info"]["calibration"]
    assert info == {"used": True, "dataset": "toy", "samples": 16, "seed": 0, "split": "train", "balanced": True}
    assert read_header(free[0].model_path.parent / "decomposed.pt")["info"]["calibration"] == {"used": False}
    layer = load(calibrated[0].model_path.parent / "decomposed.pt").ttcompress_meta["layers"]["features.0"]
    assert layer["out_error_after"] is not None  # fitted to the dense layer's outputs


@pytest.mark.parametrize("args, flag", [(["--calib-samples", "0"], "--calib-samples"),
                                        (["--min-saving", "-1"], "--min-saving")])
def test_sweep_cli_bad_calibration_options_exit_2(baseline, tmp_path, args, flag) -> None:
    result = CliRunner().invoke(app, ["sweep", str(baseline), "--cp-ranks", "2", "-o", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and flag in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, teacher", [([], "baseline"), (["--no-distill"], None), (["--teacher", "T"], "T")])
def test_a_sweep_distills_from_the_baseline_by_default(tmp_path, monkeypatch, args, teacher) -> None:
    # decompose + finetune distil from the source model by default, so a sweep point does too.
    import ttcompress.sweep as sweep_module

    torch.manual_seed(0)
    baseline = save(build_arch("seed-cnn"), tmp_path / "mnist-base.pt")
    seen = []

    def fake_finetune(model, bundle, *, teacher=None, **kwargs):
        seen.append(teacher)
        raise KeyboardInterrupt  # stop after recording (the rest is tested elsewhere)

    monkeypatch.setattr(sweep_module, "finetune", fake_finetune)
    other = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    save(build_arch("seed-cnn"), other)
    args = [str(other) if a == "T" else a for a in args]
    CliRunner().invoke(app, ["sweep", str(baseline), "--tt-ranks", "4", "--no-calib", "--epochs", "1",
                             "-o", str(tmp_path / "s"), *args])
    assert len(seen) == 1
    if teacher is None:
        assert seen[0] is None
    else:
        ref = load(baseline if teacher == "baseline" else other)
        assert seen[0] is not None and all(torch.equal(a, b) for a, b in zip(seen[0].state_dict().values(),
                                                                              ref.state_dict().values()))


def test_a_sweep_takes_the_calibration_budget(bundle, baseline, tmp_path) -> None:
    from ttcompress.checkpoint.io import read_header

    config = FinetuneConfig(epochs=1, device="cpu", batch_size=32)
    done = run_sweep(baseline, bundle=bundle, settings=[SweepSetting(cp_rank=2)], output_dir=tmp_path / "s",
                     config=config, calib_samples=16, calib_memory="64M")  # fmt: skip
    info = read_header(done[0].model_path.parent / "decomposed.pt")["info"]["calibration"]
    assert info["used"] is True and info["memory"] == 64 * 2**20  # part of the setting's fingerprint
    with pytest.raises(ValueError, match="calib_memory"):
        run_sweep(baseline, bundle=bundle, settings=[SweepSetting(cp_rank=2)], output_dir=tmp_path / "t",
                  config=config, calib_samples=16, calib_memory="1K")
    assert not (tmp_path / "t").exists()


def test_a_sweep_model_is_checked_and_recorded_like_a_decompose_output(bundle, tmp_path) -> None:
    """sweep and decompose run the one pipeline: the same forward check, plan, calibration and source record."""
    from ttcompress.checkpoint.io import read_header
    from ttcompress.checkpoint.meta import update_meta
    from ttcompress.compression.pipeline import decompose_file

    torch.manual_seed(0)
    model = build_arch("seed-cnn", kwargs={"input_size": 8, "num_classes": 4, "hidden": 16})
    update_meta(model, info={"input_shape": [1, 8, 8]})  # what the forward check runs on
    base = save(model, tmp_path / "base.pt")
    setting = SweepSetting(cp_rank=2)
    config = FinetuneConfig(epochs=1, device="cpu", batch_size=32, max_batches=1)
    [swept] = run_sweep(base, bundle=bundle, settings=[setting], output_dir=tmp_path / "s", config=config,
                        calib_samples=None)
    swept_info = read_header(swept.model_path.parent / "decomposed.pt")["info"]
    done = decompose_file(base, output=tmp_path / "base.tt.pt", plan=setting.plan())
    decompose_info = read_header(done.output)["info"]
    recorded = ("plan", "calibration", "forward_check", "source", "source_path", "source_sha256")
    assert {k: swept_info.get(k) for k in recorded} == {k: decompose_info.get(k) for k in recorded}
    assert swept_info["forward_check"]["checked"] and swept_info["forward_check"]["output_error"] is not None
    assert swept_info["source_path"] == str(base.resolve()) and swept_info["sweep_setting"]["cp_rank"] == 2
