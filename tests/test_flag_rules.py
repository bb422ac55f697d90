"""One meaning per flag: decompose, inspect and sweep map their plan flags through one rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.cli.options import plan_from_flags
from ttcompress.checkpoint.models import build_arch
from ttcompress.sweep import SweepSetting

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    torch.save(build_arch("seed-cnn").state_dict(), path)
    return path


def _formats(result) -> dict[str, str]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return {r["name"]: r["format"] for r in json.loads(result.stdout)["layers"]}


NO_FLAGS = dict(plan=None, formats=None, layers=None, exclude=None, target_ratio=None)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ({"cp_ranks": "2"}, SweepSetting(cp_rank=2)),
        ({"tt_ranks": "4"}, SweepSetting(tt_ranks=4)),
        ({"tt_ranks": "none", "cp_ranks": "3"}, SweepSetting(tt_ranks="none", cp_rank=3)),
        ({"tt_eps": "0.2", "cp_ranks": "3"}, SweepSetting(tt_eps=0.2, cp_rank=3)),
    ],
)
def test_decompose_and_sweep_build_the_same_plan(flags, setting) -> None:
    assert plan_from_flags(**NO_FLAGS, **flags) == setting.plan()


def test_decompose_cp_ranks_alone_keeps_linear_dense(cnn_file, tmp_path) -> None:
    base = ["decompose", cnn_file, "--arch", "seed-cnn", "--json"]
    conv_only = _formats(invoke(*base, "--cp-ranks", "2", "-o", tmp_path / "a.pt"))
    assert set(conv_only.values()) == {"cp", "dense"}
    assert all(f == "dense" for n, f in conv_only.items() if n.startswith("classifier"))
    both = _formats(invoke(*base, "--cp-ranks", "2", "--tt-ranks", "4", "-o", tmp_path / "b.pt"))
    assert set(both.values()) == {"cp", "tt"}
    # --tt-ranks none means dense in decompose as in sweep
    assert _formats(invoke(*base, "--cp-ranks", "2", "--tt-ranks", "none", "-o", tmp_path / "c.pt")) == conv_only


@pytest.mark.parametrize("flag", ["--cp-ranks", "--tt-ranks"])
def test_a_list_on_decompose_is_one_clear_line(cnn_file, tmp_path, flag) -> None:
    result = invoke("decompose", cnn_file, "--arch", "seed-cnn", flag, "3,6", "-o", tmp_path / "x.pt")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and flag in result.stderr and "sweep" in result.stderr
    assert not (tmp_path / "x.pt").exists()


def _option_names(command: str) -> set[str]:
    import typer.main

    from ttcompress.cli import load_command

    params = load_command(command).params
    return {name for p in params for name in (*p.opts, *getattr(p, "secondary_opts", ())) if name.startswith("--")}


def test_sweep_takes_every_option_of_decompose_and_finetune() -> None:
    from ttcompress.cli.sweep import ABSENT

    sweep = _option_names("sweep")
    for command in ("decompose", "finetune"):
        missing = _option_names(command) - sweep - set(ABSENT) - {"--help"}
        assert not missing, f"sweep lacks {command} options {sorted(missing)}: add them or list them in ABSENT"
    assert not set(ABSENT) & sweep, "an option listed as absent is there"
    help_text = invoke("sweep", "--help").stdout
    assert "--target-ratios" in help_text and "--train-only" in help_text


def test_dry_run_prints_the_plan_and_writes_nothing(cnn_file, tmp_path) -> None:
    before = sorted(p.name for p in cnn_file.parent.iterdir())
    result = invoke("decompose", cnn_file, "--arch", "seed-cnn", "--cp-ranks", "1", "--tt-ranks", "2", "--dry-run")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert sorted(p.name for p in cnn_file.parent.iterdir()) == before
    out = result.stdout
    assert "projected" in out and "decomposed and measured" in out
    assert "~0." not in out and "≤0." not in out  # small layers: exact errors, the real run's computation
    assert " !" in out and "large error" in out  # rank 1 everywhere: some layer far above LARGE_ERROR
    result = invoke("decompose", cnn_file, "--arch", "seed-cnn", "--dry-run", "-o", tmp_path / "x.pt")
    assert result.exit_code == 0 and not (tmp_path / "x.pt").exists()


def test_dry_run_json_prints_json_with_the_format_auto_picks(cnn_file, tmp_path) -> None:
    result = invoke("decompose", cnn_file, "--arch", "seed-cnn", "--format", "auto", "--dry-run", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["dry_run"] is True and data["params_after"] < data["params_before"]
    compressed = [layer for layer in data["layers"] if layer["plan_format"] != "dense"]
    assert compressed and all(layer["plan_format"] == "auto" for layer in compressed)
    assert {layer["format"] for layer in compressed} <= {"tt", "cp", "svd", "tucker2"}  # the pick, not "auto"
    assert all(layer["weight_error_kind"] == "exact" and 0 <= layer["weight_error"] <= 1 for layer in compressed)
    table = invoke("decompose", cnn_file, "--arch", "seed-cnn", "--format", "auto", "--dry-run")
    assert "auto → " in table.stdout and "AUTO" not in table.stdout


def test_the_dry_run_projection_matches_the_real_run(cnn_file, tmp_path) -> None:
    from ttcompress.compression.dryrun import preview_plan
    from ttcompress.checkpoint.io import load
    from ttcompress.compression.pipeline import compress_with_report

    plan = plan_from_flags(**NO_FLAGS, cp_ranks="3", tt_ranks="4")
    model = load(cnn_file, arch="seed-cnn")
    preview = preview_plan(model, plan)
    done = compress_with_report(model, plan)
    assert preview.params_after == done.params_after and preview.params_before == done.params_before


def test_inspect_takes_the_plan_flags_of_decompose() -> None:
    # decompose alone writes, previews, computes on a device, and runs calibration data through the model (inspect runs no data)
    calibration = {"--data", "--data-root", "--seq-len", "--tokenizer", "--calib-samples", "--calib-memory", "--no-calib",
                   "--seed", "--min-saving", "--max-error"}
    assert _option_names("decompose") - _option_names("inspect") == {"--output", "--overwrite", "--dry-run", "--device", *calibration}


@pytest.mark.parametrize("command", ["decompose", "finetune", "report", "sweep", "export", "inspect", "train", "demo"])
def test_help_shows_no_value_beside_a_flag(command) -> None:
    assert "<bool>" not in invoke(command, "--help").stdout
