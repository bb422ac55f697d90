"""Issue 9, section 3: every bad input gets one line on stderr, exit code 2, and writes nothing.

Also the pieces behind it: the overwrite rule, internal errors, the balanced ``--eval-limit``
subset, resume checks, NaN stops, the sweep cache key and ``atomic_write``'s clean-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.cli._common import cli_errors, pipe_width
from ttcompress.data import DatasetBundle, balanced_subset, dataset_targets, load_dataset
from ttcompress.errors import DataError, TrainingError, UserInputError
from ttcompress.checkpoint.io import atomic_write, save
from ttcompress.checkpoint.models import build_arch
from ttcompress.training import TrainCallback, TrainConfig, run_paths, train

runner = CliRunner()
FAST = ["--device", "cpu", "--batch-size", "32", "--max-batches", "2"]
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, match: str, *, lines: int | None = 1) -> str:  # noqa: ANN001
    """Exit 2, ``error: ...`` naming ``match`` as the last stderr line (the only one unless ``lines`` is None)."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err_lines = result.stderr.strip().splitlines()
    if lines is not None:
        assert len(err_lines) == lines, result.stderr
    assert err_lines[-1].startswith("error: ") and match in err_lines[-1], result.stderr
    assert sum(line.startswith("error: ") for line in err_lines) == 1 and "Traceback" not in result.stderr
    return err_lines[-1]


@pytest.fixture(scope="module")
def mnist() -> DatasetBundle:
    return load_dataset("mnist-5k")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "cnn.pt"
    save(build_arch("seed-cnn"), path)
    return path


@pytest.fixture(scope="module")
def rgb_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model for 3-channel images: does not fit mnist-5k (like torchvision's resnet18)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "rgb.pt"
    save(build_arch("seed-cnn", kwargs={"in_channels": 3}), path)
    return path


# ------------------------------------------------------------------------- a model that does not fit


def test_report_on_a_model_that_does_not_fit_the_data(cnn: Path, rgb_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    result = invoke("report", cnn, rgb_cnn, "--no-latency", "--eval-limit", "20", "--format", "md", "-o", out)
    line = assert_one_line_error(result, "model 'rgb' does not fit mnist-5k")
    assert "(1, 28, 28)" in line and "3 channels" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["finetune", "sweep"])
def test_finetune_and_sweep_on_a_model_that_does_not_fit(rgb_cnn: Path, tmp_path: Path, command: str) -> None:
    out = tmp_path / "o"
    args = ["-o", out, "--epochs", "1", *FAST] if command == "finetune" else ["--cp-ranks", "2", "-o", out]
    result = invoke(command, rgb_cnn, *args)
    assert_one_line_error(result, "does not fit mnist-5k: it cannot take inputs of shape (1, 28, 28)")
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------- --eval-limit


def test_balanced_subset_is_seeded_and_balanced(mnist: DatasetBundle) -> None:
    labels = dataset_targets(mnist.test)
    assert (np.diff(labels) >= 0).all()  # the test split is sorted by class: a prefix is one class
    subset = balanced_subset(mnist.test, 100, seed=0)
    counts = np.bincount(dataset_targets(subset), minlength=10)
    assert counts.tolist() == [10] * 10
    assert subset.indices == balanced_subset(mnist.test, 100, seed=0).indices
    assert subset.indices != balanced_subset(mnist.test, 100, seed=1).indices
    odd = np.bincount(dataset_targets(balanced_subset(mnist.test, 25)), minlength=10)
    assert odd.sum() == 25 and odd.max() - odd.min() == 1
    assert len(balanced_subset(mnist.test, 10**6)) == len(mnist.test)
    with pytest.raises(UserInputError, match="n must be a positive int"):
        balanced_subset(mnist.test, 0)


def test_report_eval_limit_is_a_balanced_subset_and_says_so(cnn: Path, tmp_path: Path) -> None:
    result = invoke("report", cnn, cnn, "--no-latency", "--eval-limit", "50", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)["meta"]
    assert data["eval_samples"] == 50 and data["eval_subset"] is True
    md = invoke("report", cnn, cnn, "--no-latency", "--eval-limit", "50", "--format", "md")
    assert "a class-balanced subset of 50 test samples" in md.stdout
    full = json.loads(invoke("report", cnn, cnn, "--no-latency", "--format", "json").stdout)["meta"]
    assert full["eval_subset"] is False and full["eval_samples"] == 1000


# ------------------------------------------------------------------------------------ overwrite rule


def test_decompose_never_silently_replaces_an_output(cnn: Path, tmp_path: Path) -> None:
    sd = build_arch("seed-cnn").state_dict()
    pth, st = tmp_path / "r18.pth", tmp_path / "r18.safetensors"
    torch.save(sd, pth)
    from safetensors.torch import save_file

    save_file(sd, st)
    assert invoke("decompose", pth, "--arch", "seed-cnn", "--cp-ranks", "2").exit_code == 0
    out = tmp_path / "r18.tt.pt"
    before = out.read_bytes()
    result = invoke("decompose", st, "--arch", "seed-cnn", "--cp-ranks", "3")
    assert_one_line_error(result, f"{out} already exists; pass --overwrite to replace it")
    assert out.read_bytes() == before
    assert invoke("decompose", st, "--arch", "seed-cnn", "--cp-ranks", "3", "--overwrite").exit_code == 0
    assert out.read_bytes() != before


def test_report_and_plot_outputs_follow_the_rule(cnn: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "r.md", tmp_path / "p.png"
    out.write_text("keep")
    fast = ["--no-latency", "--eval-limit", "10"]
    result = invoke("report", cnn, cnn, *fast, "--format", "md", "-o", out)
    assert_one_line_error(result, "already exists")
    assert out.read_text() == "keep"
    plot.write_text("keep")
    result = invoke("report", cnn, cnn, *fast, "--plot", plot)
    assert_one_line_error(result, "already exists")
    assert plot.read_text() == "keep"
    result = invoke("report", cnn, cnn, *fast, "--format", "md", "-o", out, "--overwrite")
    assert result.exit_code == 0 and out.read_text() != "keep"


def test_train_refuses_existing_run_files_but_resume_continues_them(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    run_paths(out).metrics.write_text("{}\n")
    result = invoke("train", "--arch", "seed-cnn", "--epochs", "1", "-o", out, *FAST)
    assert_one_line_error(result, "m.metrics.jsonl already exists; pass --overwrite")
    assert not out.exists()
    result = invoke("train", "--arch", "seed-cnn", "--epochs", "1", "-o", out, *FAST, "--overwrite")
    assert result.exit_code == 0, result.stderr


def test_finetune_and_train_refuse_output_equal_to_an_input(cnn: Path, tmp_path: Path) -> None:
    before = cnn.read_bytes()
    result = invoke("finetune", cnn, "-o", cnn, "--epochs", "1", *FAST, "--overwrite")
    assert_one_line_error(result, "must differ from the input file")
    result = invoke("train", "--arch", "seed-cnn", "--teacher", cnn, "-o", cnn, *FAST, "--overwrite")
    assert_one_line_error(result, "must differ from the input file")
    assert cnn.read_bytes() == before


# ---------------------------------------------------------------------------- files and environment


def test_bad_columns_does_not_crash_the_cli() -> None:
    assert pipe_width({"COLUMNS": "abc"}) == 160 and pipe_width({"COLUMNS": "-3"}) == 160
    assert pipe_width({"COLUMNS": "99"}) == 99 and pipe_width({}) == 160
    env = {**os.environ, "COLUMNS": "abc", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ttcompress", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ttcompress "), proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["report", "--min-run-tim", "3", "a.pt"], "No such option: --min-run-tim (Possible options: --min-run-time)"),
    (["report"], "Missing argument 'BASELINE'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_command_line_mistakes_are_one_line(args: list[str], message: str) -> None:
    """Click's usage errors (unknown option, missing argument, unknown command): one error line on
    stderr and exit code 2, like every other bad input."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ttcompress", *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "cpp_extension" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]


def test_output_parent_is_a_file(cnn: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("decompose", cnn, "--cp-ranks", "2", "-o", blocker / "out.tt.pt")
    assert_one_line_error(result, f"{blocker} is not a directory")
    result = invoke("report", cnn, cnn, "--eval-limit", "10", "--no-latency", "--format", "md", "-o", blocker / "r.md")
    assert_one_line_error(result, f"{blocker} is not a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_input_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    for args in (["decompose", fifo], ["inspect", fifo], ["report", fifo, fifo], ["finetune", fifo, "-o", tmp_path / "o.pt"]):
        assert_one_line_error(invoke(*args), f"{fifo} is not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize(
    ("exc", "match"),
    [
        (MemoryError(), "out of memory"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (OSError(30, "Read-only file system", "/ro/x.pt"), "Read-only file system: /ro/x.pt"),
        (OSError(28, "No space left on device", "/full/x.pt"), "No space left on device: /full/x.pt"),
        (PermissionError(13, "Permission denied", "/root/x"), "Permission denied: /root/x"),
        (DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                   '  File "x.py", line 1\nttcompress.errors.DataError: cannot read image a.png: truncated'),
         "cannot read image a.png: truncated"),
    ],
)
def test_environment_failures_are_one_line(exc: BaseException, match: str, capsys: pytest.CaptureFixture) -> None:
    @cli_errors
    def command() -> None:
        raise exc

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


@pytest.mark.parametrize("exc", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug"), RuntimeError("a bug")])
def test_unexpected_exceptions_are_internal_errors(exc: BaseException, capsys: pytest.CaptureFixture) -> None:
    @cli_errors
    def command() -> None:
        raise exc

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(f"internal error: {type(exc).__name__}: ")
    assert "a bug in ttcompress" in err and "report it" in err


def test_user_input_errors_are_still_value_errors() -> None:
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
    assert issubclass(UserInputError, ValueError)


def _write_png(path: Path, size: int = 16) -> None:
    from PIL import Image

    Image.new("RGB", (size, size), (200, 10, 10)).save(path)


@pytest.mark.parametrize("kind", ["not-an-image", "truncated", "bomb"])
def test_bad_images_are_data_errors(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _write_png(root / c / f"{i}.png")
    bad = root / "a" / "0.png"
    if kind == "not-an-image":
        bad.write_bytes(b"this is text, not a PNG")
    elif kind == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 16x16 > 2 * 10: a decompression bomb
    bundle = load_dataset(f"imagefolder:{root}", image_size=8)
    with pytest.raises(DataError, match=r"cannot read image .*0\.png"):
        for ds in (bundle.train, bundle.test):
            for i in range(len(ds)):
                ds[i]
    out = tmp_path / "m.pt"
    result = invoke("train", "--arch", "seed-cnn", "--data", f"imagefolder:{root}", "--image-size", "8",
                    "--epochs", "1", "-o", out, *FAST)  # fmt: skip
    assert_one_line_error(result, "cannot read image", lines=None)
    assert not out.exists()


# ----------------------------------------------------------------------------------------- training


class _StopInFirstEpoch(TrainCallback):
    def on_step(self, **_: object) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_in_the_first_epoch_saves_nothing_and_says_so(
    mnist: DatasetBundle, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ttcompress.cli.train import render_result

    out = tmp_path / "m.pt"
    cfg = TrainConfig(epochs=2, batch_size=32, max_batches=2, device="cpu", log_every=1)
    result = train(build_arch("seed-cnn"), mnist, output=out, config=cfg, progress=_StopInFirstEpoch())
    assert result.interrupted and result.history == () and list(tmp_path.iterdir()) == []
    with pytest.raises(typer.Exit) as info:
        render_result(result, json_=False, title="t")
    assert info.value.exit_code == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err


def test_non_finite_validation_is_a_nan_stop_never_best(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = invoke("train", "--arch", "seed-cnn", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2",
                    "--max-batches", "1", "--batch-size", "32", "--device", "cpu", "-o", out)  # fmt: skip
    assert_one_line_error(result, "validation loss became NaN/inf in epoch 1", lines=None)
    assert "no checkpoint was written" in result.stderr and not out.exists()


def test_resume_refuses_changed_options_naming_them(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    args = ["train", "--arch", "seed-cnn", "--schedule", "cosine", "-o", out, *FAST]
    assert invoke(*args, "--epochs", "1").exit_code == 0
    result = invoke(*args, "--epochs", "2", "--lr", "0.01", "--resume")
    line = assert_one_line_error(result, "cannot resume")
    assert "lr 0.001 -> 0.01" in line and "epochs 1 -> 2" in line  # cosine is stretched over the epochs
    result = invoke(*args, "--epochs", "1", "--resume", "--workers", "0", "--eval-batch-size", "64")
    assert result.exit_code == 0, result.stderr  # options that do not change the result may differ


class _NaNTeacher(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan"))


def test_nan_teacher_is_not_a_learning_rate_problem(mnist: DatasetBundle, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=32, max_batches=2, device="cpu")
    with pytest.raises(UserInputError, match="teacher outputs NaN/inf") as info:
        train(build_arch("seed-cnn"), mnist, output=tmp_path / "m.pt", config=cfg, teacher=_NaNTeacher())
    assert "learning rate" not in str(info.value)


def test_nan_teacher_midway_names_the_teacher(mnist: DatasetBundle, tmp_path: Path) -> None:
    class LaterNaN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return torch.zeros(x.shape[0], 10) + (float("nan") if self.calls > 1 else 0.0)

    cfg = TrainConfig(epochs=1, batch_size=32, max_batches=2, device="cpu")
    with pytest.raises(TrainingError, match="teacher's outputs are NaN/inf.*not a learning-rate problem"):
        train(build_arch("seed-cnn"), mnist, output=tmp_path / "m.pt", config=cfg, teacher=LaterNaN())


@pytest.mark.parametrize("what", ["weight", "bias"])
def test_nan_in_a_linear_layer_names_the_layer(tmp_path: Path, what: str) -> None:
    model = build_arch("seed-fc3")
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    getattr(layer, what).data[0] = float("nan")
    src = tmp_path / "fc.pt"
    save(model, src)
    result = invoke("decompose", src, "--tt-ranks", "2")
    assert_one_line_error(result, f"has NaN or Inf {what} values")
    assert not (tmp_path / "fc.tt.pt").exists()


# ------------------------------------------------------------------------------------ sweep cache key


def test_sweep_cache_key_covers_what_changes_a_result(mnist: DatasetBundle) -> None:
    from ttcompress.compression.plan import Plan
    from ttcompress.sweep import SweepSetting, _fingerprint, cache_key

    base = dict(baseline_digest="abc", bundle=mnist, data_root=None, config=TrainConfig(),
                plan=Plan(), setting=SweepSetting(cp_rank=2), teacher_digest=None)  # fmt: skip

    def fp(**change: object) -> str:
        return _fingerprint(cache_key(**{**base, **change}))  # type: ignore[arg-type]

    same = fp()
    assert fp(teacher_digest="t1") != same and fp(teacher_digest="t1") != fp(teacher_digest="t2")
    assert fp(data_root="/data/a") != same and fp(config=TrainConfig(lr=0.01)) != same
    assert fp(config=TrainConfig(device="cpu", num_workers=2, log_every=3, eval_batch_size=7)) == same
    assert "ttcompress" in cache_key(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- atomic_write


def test_sigterm_during_a_write_leaves_no_temp_file(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal
        from ttcompress.checkpoint.io import atomic_write
        with atomic_write({str(tmp_path / "out.bin")!r}) as f:
            f.write(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            f.write(b"never")
        print("not reached")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # this process: handler only inside a write


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".out.bin.{dead_pid}.abc.tmp", tmp_path / ".out.bin.legacy123.tmp"]
    kept = [tmp_path / f".out.bin.{os.getpid()}.mine.tmp", tmp_path / f".other.bin.{dead_pid}.x.tmp"]
    for p in stale + kept:
        p.write_bytes(b"junk")
    with atomic_write(tmp_path / "out.bin") as f:
        f.write(b"data")
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_atomic_write_keeps_the_umask_and_closes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ttcompress.fsutil as tio

    old = os.umask(0o027)
    try:
        if Path("/proc/self/status").exists():
            monkeypatch.setattr(tio.os, "umask", lambda *_: pytest.fail("umask flipped"))
        with atomic_write(tmp_path / "a.txt", "w") as f:
            f.write("a")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)
    closed: list[int] = []
    real_close = os.close
    monkeypatch.setattr(tio.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(tmp_path / "b.txt", "w") as f:
            raise RuntimeError("boom")
    assert closed == [] and list(p.name for p in tmp_path.iterdir()) == ["a.txt"]
