"""``decompose --device`` / ``compress(device=...)``: only the layer in flight moves; bad devices are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.errors import UserInputError
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
import ttcompress.compression.surgery as surgery
from ttcompress.compression.pipeline import compress, compress_with_report

runner = CliRunner()
PLAN = Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=3, options={"n_iter_max": 3}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16))


def test_cpu_device_gives_the_same_layers_as_none() -> None:
    a, b = compress(_model(), PLAN), compress(_model(), PLAN, device="cpu")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_cuda_without_cuda_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UserInputError, match="CUDA is not available"):
        compress(model, PLAN, device="cuda")
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    with pytest.raises(UserInputError, match="auto, cpu, cuda"):
        compress(_model(), PLAN, device="tpu")


def test_cli_device_cuda_without_cuda(cnn_file, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out.pt"
    result = runner.invoke(app, ["decompose", str(cnn_file), "--arch", "seed-cnn", "-o", str(out), "--device", "cuda"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "CUDA is not available" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()



def test_only_the_layer_in_flight_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    # each layer is handed to the device on its own, right before its decomposition
    moved: list[str] = []
    real = surgery._on_device

    def on_device(module: nn.Module, device: torch.device | None) -> nn.Module:
        moved.append(type(module).__name__)
        assert device == torch.device("cpu")
        return real(module, device)

    monkeypatch.setattr(surgery, "_on_device", on_device)
    model = _model()
    result = compress_with_report(model, PLAN, device="cpu")
    assert moved == ["Conv2d", "Linear"]
    assert all(p.device.type == "cpu" for p in result.model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("calibrated", [False, True])
def test_cuda_decomposition_returns_layers_where_the_model_lives(calibrated: bool) -> None:
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    on_cpu = compress(_model(), PLAN, device="cpu", calib_data=x if calibrated else None)
    on_gpu = compress(_model(), PLAN, device="cuda", calib_data=x if calibrated else None)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    assert torch.cuda.memory_allocated() < 1 << 20  # nothing left behind on the GPU
    # same algorithms, different BLAS: close, not bit-identical
    torch.testing.assert_close(on_gpu(x), on_cpu(x), rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
def test_cli_device_cuda(cnn_file, tmp_path) -> None:
    out = tmp_path / "out.pt"
    result = runner.invoke(app, ["decompose", str(cnn_file), "--arch", "seed-cnn", "-o", str(out), "--device", "cuda",
                                 "--tt-ranks", "4", "--cp-ranks", "3"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert out.exists()


# ---- --threads: one option, every command ----------------------------------------------------------
from ttcompress.cli import COMMANDS, load_command  # noqa: E402


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_threads(name: str) -> None:
    params = [p for p in load_command(name).params if p.name == "threads"]
    assert len(params) == 1 and "--threads" in params[0].opts


@pytest.mark.parametrize("value", ["0", "-3"])
@pytest.mark.parametrize("name", ["decompose", "inspect"])
def test_threads_below_one_is_refused(name: str, value: str, tmp_path) -> None:
    result = runner.invoke(app, [name, str(tmp_path / "missing.pt"), "--threads", value])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.strip() == f"error: --threads must be a positive integer, got {value}"


def test_threads_applies_during_the_command_and_is_restored(cnn_file, monkeypatch: pytest.MonkeyPatch) -> None:
    import ttcompress.cli.inspect as inspect_cli

    seen: list[int] = []
    real = inspect_cli.inspect_file

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect_cli, "inspect_file", spy)
    before = torch.get_num_threads()
    result = runner.invoke(app, ["inspect", str(cnn_file), "--arch", "seed-cnn", "--threads", "3"])
    assert result.exit_code == 0, result.stderr
    assert seen == [3] and torch.get_num_threads() == before


# ---- progress of the calibration passes ------------------------------------------------------------
from ttcompress.calibration.progress import calib_progress  # noqa: E402


def test_progress_fires_for_every_calibration_pass() -> None:
    events: list[tuple[str, int, int]] = []
    layers: list[tuple[int, int, str]] = []
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    plan = Plan(target_ratio=2.0, formats=("svd", "tucker2"))
    with calib_progress(lambda stage, done, total: events.append((stage, done, total))):
        compress(_model(), plan, calib_data=[x[:4], x[4:8], x[8:]],
                 progress=lambda done, total, name: layers.append((done, total, name)))
    # the allocator's pass over all layers, then one pass per fitted layer, every batch reported
    assert [e for e in events if e[0] == "statistics"] == [("statistics", 1, 3), ("statistics", 2, 3), ("statistics", 3, 3)]
    for name in ("0", "3"):
        assert [e[1:] for e in events if e[0] == f"statistics {name}"] == [(1, 3), (2, 3), (3, 3)]
    assert [name for _d, _t, name in layers] == ["0", "3", ""]


def test_decompose_progress_bars_draw_the_statistics_pass() -> None:
    import io

    from rich.console import Console

    from ttcompress.cli.progress import DecomposeProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with DecomposeProgress(console) as bars:
        bars.layer(0, 2, "conv1")
        bars.stats("statistics conv1", 1, 4)
        task = bars._bar.tasks[bars._stats]
        assert task.visible and task.completed == 1 and task.total == 4 and "conv1" in task.description
        bars.stats("statistics conv1", 4, 4)
        assert not bars._bar.tasks[bars._stats].visible


# ---- eval-mode path choice: decided once, cheaply, on large inputs ---------------------------------
from ttcompress.layers import cp_eval  # noqa: E402
from ttcompress.layers.cp_conv import CPConv2d  # noqa: E402


def test_clear_choice_needs_a_large_input_and_a_clear_margin() -> None:
    big = cp_eval.MODEL_MIN_MACS
    assert cp_eval.clear_choice(big, big / cp_eval.CLEAR_FACTOR) is False
    assert cp_eval.clear_choice(big, big * cp_eval.CLEAR_FACTOR) is True
    assert cp_eval.clear_choice(big, big / 2) is None  # close call: timing decides
    assert cp_eval.clear_choice(big - 1, 0.0) is None  # small input: timing is cheap there


def test_a_wide_conv_on_a_large_input_is_decided_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    # the Conv2d(1024, 128, (64, 1)) at 4x: the cost model is clear, so neither path is timed
    # and the dense kernel (14 G multiply-adds to build) is never reconstructed
    def never(*_args: object) -> bool:
        raise AssertionError("timed a clear call")

    monkeypatch.setattr("ttcompress.layers.cp_conv.dense_wins", never)
    layer = CPConv2d(1024, 128, (64, 1), rank=1723, padding=(32, 0)).eval()
    x = torch.randn(1, 1024, 128, 1)
    with torch.no_grad():
        assert layer._measured_dense(x) is False
    assert layer._kernel_cache is None and list(layer._eval_choice.values()) == [False]


def test_long_calls_are_timed_once_not_in_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"dense": 0, "factorized": 0}
    monkeypatch.setattr(cp_eval, "LONG_CALL_SECONDS", 0.0)

    def path(name: str):
        def run() -> None:
            calls[name] += 1
        return run

    assert cp_eval.dense_wins(path("dense"), path("factorized")) in (True, False)
    assert calls == {"dense": 2, "factorized": 2}  # the warm-up and one timed call each
