"""``ttcompress train`` / ``finetune``: end-to-end runs, bad input (exit 2, one line, no files), torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.checkpoint.io import save
from ttcompress.checkpoint.models import build_arch

runner = CliRunner()
FAST = ["--device", "cpu", "--batch-size", "32", "--max-batches", "4"]




def invoke(*args: str):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, match: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and match in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained seed-cnn saved as a ttcompress checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "base.pt"
    save(build_arch("seed-cnn"), path)
    return path


def test_train_writes_checkpoint_and_table(tmp_path: Path) -> None:
    out = tmp_path / "baseline.pt"
    result = invoke("train", "--arch", "seed-cnn", "--data", "mnist-5k", "--epochs", "2", "-o", out, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "train seed-cnn on mnist-5k" in result.stdout and "val acc" in result.stdout  # per-epoch table
    assert "training 2 epoch(s) on cpu" in result.stderr and "best: epoch" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["baseline.pt", "baseline.last.pt", "baseline.resume.pt", "baseline.metrics.jsonl"]
    )


def test_train_json_and_auto_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "m.pt"
    args = ["--arch", "seed-cnn", "--epochs", "1", "--batch-size", "32", "--max-batches", "2", "-o", out, "--json"]
    result = invoke("train", *args, "--device", "auto")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["history"][0]["epoch"] == 1 and data["paths"]["best"] == str(out)
    # resume with more epochs continues where the first run stopped
    result = invoke("train", *args[:2], "--epochs", "2", *args[4:], "--device", "auto", "--resume")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["start_epoch"] == 1 and [r["epoch"] for r in data["history"]] == [1, 2]


def test_finetune_with_teacher(tmp_path: Path, base_ckpt: Path) -> None:
    out = tmp_path / "ft.pt"
    result = invoke("finetune", base_ckpt, "--data", "mnist-5k", "--epochs", "1", "-o", out, "--teacher", base_ckpt,
                    "--alpha", "0.5", "--temperature", "2", "--optimizer", "sgd", "--lr", "0.01", *FAST, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert out.exists() and json.loads(result.stdout)["history"][0]["epoch"] == 1


def _nan_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "nanmod_ttc.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class NaNNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(784, 10)

            def forward(self, x):
                y = self.fc(x.flatten(1))
                return y * float("nan") if self.training else y
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nanmod_ttc:NaNNet"


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unknown-data", "unknown dataset 'nosuch'"),
        ("unknown-arch", "arch (--arch) 'nosuch' is unknown"),
        ("no-root", "needs a data root"),
        ("missing-root", "does not exist"),
        ("classes", "model does not fit mnist-5k: it has 7 outputs but the dataset has 10 classes"),
        ("nan", "loss became NaN"),
        ("no-output", "missing -o/--output"),
        ("bad-option", "optimizer must be one of"),
        ("no-resume", "no resume state"),
    ],
)
def test_train_bad_input_exit_2_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, match: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "m.pt"
    arch, extra = "seed-cnn", []
    if case == "unknown-data":
        extra = ["--data", "nosuch"]
    elif case == "unknown-arch":
        arch = "nosuch"
    elif case == "no-root":
        extra = ["--data", "mnist"]
    elif case == "missing-root":
        extra = ["--data", "cifar10", "--data-root", str(tmp_path / "absent")]
    elif case == "classes":
        extra = ["--arch-kwargs", '{"num_classes": 7}']
    elif case == "nan":
        arch = _nan_module(tmp_path, monkeypatch)
    elif case == "bad-option":
        extra = ["--optimizer", "rmsprop"]
    elif case == "no-resume":
        extra = ["--resume"]
    output = [] if case == "no-output" else ["-o", out]
    result = invoke("train", "--arch", arch, "--epochs", "1", *output, *FAST, *extra)
    assert_user_error(result, match)
    assert list(work.iterdir()) == []


def test_finetune_bad_input(tmp_path: Path, base_ckpt: Path) -> None:
    out = tmp_path / "o.pt"
    assert_user_error(invoke("finetune", tmp_path / "absent.pt", "-o", out, *FAST), "absent.pt")
    assert_user_error(invoke("finetune", base_ckpt, "-o", out, "--train-only", "decomposed", *FAST),
                      "no decomposed layers")  # fmt: skip
    assert_user_error(invoke("finetune", base_ckpt, "-o", out, "--amp", "bf16", *FAST), "needs a CUDA device")
    assert not out.exists()


def test_torchrun_two_processes(tmp_path: Path, base_ckpt: Path) -> None:
    out = tmp_path / "run" / "ddp.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "ttcompress", "finetune", str(base_ckpt), "--data", "mnist-5k", "--epochs", "1",
        "-o", str(out), "--device", "cpu", "--batch-size", "16", "--max-batches", "3", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == sorted(["ddp.pt", "ddp.last.pt", "ddp.resume.pt", "ddp.metrics.jsonl"])  # one run, rank 0 only
    summary = json.loads(proc.stdout)  # only rank 0 prints
    assert summary["world_size"] == 2 and summary["history"][0]["epoch"] == 1
    # validation covered the whole held-out split (10 % of 4,000) exactly once across the two ranks
    correct = summary["history"][0]["val_accuracy"] * 400
    assert correct == pytest.approx(round(correct))


def test_finetune_refuses_its_output_before_naming_the_recorded_teacher(tmp_path: Path, base_ckpt: Path) -> None:
    """An existing output is one line: "distilling from the source model ..." comes only after the
    output was accepted."""
    from ttcompress.compression.plan import Plan, TTSettings
    from ttcompress.compression.pipeline import decompose_file

    student = decompose_file(base_ckpt, output=tmp_path / "s.tt.pt", plan=Plan(tt=TTSettings(ranks=2))).output
    out = tmp_path / "o.pt"
    out.write_bytes(b"keep")
    result = invoke("finetune", student, "-o", out, *FAST)
    assert_user_error(result, "already exists")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert out.read_bytes() == b"keep"


def test_a_model_that_cannot_load_is_one_line_even_when_a_source_is_recorded(tmp_path) -> None:
    # "distilling from the source model ..." is said once the models load and fit the data: a
    # checkpoint that fails to rebuild stays one line.
    import ttcompress
    from ttcompress.checkpoint.io import read_header
    from ttcompress.checkpoint.models import build_arch

    torch.manual_seed(0)
    dense = tmp_path / "dense.pt"
    ttcompress.save(build_arch("seed-cnn"), dense)
    comp = tmp_path / "m.tt.pt"
    result = CliRunner().invoke(app, ["decompose", str(dense), "--tt-ranks", "4", "--no-calib", "-o", str(comp)])
    assert result.exit_code == 0, result.stderr
    assert read_header(comp)["info"].get("source_path")
    comp.write_bytes(comp.read_bytes()[:-200])  # truncated: the header reads, the tensors do not
    result = CliRunner().invoke(app, ["finetune", str(comp), "--epochs", "1", "-o", str(tmp_path / "f.pt")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "distilling" not in result.stderr


def test_training_flags_are_generated_from_the_config_fields() -> None:
    """train, finetune and sweep take every command-line field of their config, with its flag and default."""
    from ttcompress.cli import load_command
    from ttcompress.training.config import FinetuneConfig, TrainConfig, cli_options

    for command, cls in (("train", TrainConfig), ("finetune", FinetuneConfig), ("sweep", FinetuneConfig)):
        params = {p.name: p for p in load_command(command).params}
        expected = {name: cli for name, cli in cli_options(cls).items() if command in cli.commands}
        assert len(expected) >= 20
        for name, cli in expected.items():
            assert params[name].opts == [cli.flag], (command, name)
            assert params[name].default == getattr(cls(), name), (command, name)
    assert "train_only" not in {p.name for p in load_command("train").params}
