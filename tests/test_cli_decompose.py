"""`ttcompress decompose` / `ttcompress inspect` through the CLI (typer's CliRunner)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.errors import CheckpointError
from ttcompress.checkpoint.io import get_meta, load
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.compression.pipeline import compress

runner = CliRunner()
FAST_PLAN = "cp:\n  options: {n_iter_max: 3}\n"


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def fails(*args: str, match: str):
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert match in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    return result




@pytest.fixture()
def plan_file(tmp_path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_PLAN)
    return path


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def test_decompose_state_dict_default_output(cnn_file, tmp_path, plan_file):
    src = tmp_path / "model.pt"
    src.write_bytes(cnn_file.read_bytes())
    result = ok("decompose", src, "--arch", "seed-cnn", "--tt-ranks", "4", "--cp-ranks", "3", "--plan", plan_file)
    out = tmp_path / "model.tt.pt"
    assert out.exists()
    assert "total" in result.stdout and "classifier.1" in result.stdout
    # The loaded file equals the in-memory compressed model (same plan, deterministic).
    loaded = load(out)
    model = load(src, arch="seed-cnn")
    compress(model, Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=3, options={"n_iter_max": 3})))
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=1e-6, atol=1e-6)
    assert get_meta(loaded)["info"]["plan"]["tt"] == {"ranks": 4}


def test_decompose_json_and_eps_bound(cnn_file, tmp_path):
    eps = 0.6
    out = tmp_path / "o.tt.pt"
    result = ok("decompose", cnn_file, "--arch", "seed-cnn", "--tt-eps", eps, "--layers", "classifier.*", "-o", out,
                "--json")
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["input_kind"] == "state_dict"
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows["features.0"]["skipped"] == "not matched by layers"
    tt_rows = [r for r in summary["layers"] if r["format"] == "tt"]
    assert tt_rows
    for r in tt_rows:
        assert r["rel_error"] <= eps
    assert summary["params_before"] / summary["params_after"] == pytest.approx(summary["ratio"])


def test_decompose_target_ratio(cnn_file, tmp_path, plan_file):
    out = tmp_path / "t.tt.pt"
    result = ok("decompose", cnn_file, "--arch", "seed-cnn", "--target-ratio", "8", "--plan", plan_file, "-o", out, "--json")
    summary = json.loads(result.stdout)
    assert summary["ratio"] >= 8.0
    assert summary["ratio"] < 12.0  # the budget is used, not wasted


def test_resnet18_end_to_end(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    src = tmp_path / "r18.pth"
    torch.save(model.state_dict(), src)
    plan = tmp_path / "plan.yaml"
    # Low ranks, 2 ALS iterations, and the two deepest stages kept dense keep this fast on 2 cores.
    plan.write_text("cp: {rank: 2, options: {n_iter_max: 2, init: random}}\ntt: {ranks: 2}\n"
                    "rules:\n  - {pattern: 'layer3.*', format: dense}\n  - {pattern: 'layer4.*', format: dense}\n")
    out = tmp_path / "r18.tt.pt"
    result = ok("decompose", src, "--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}',
                "--plan", plan, "--exclude", "conv1", "-o", out, "--json")
    summary = json.loads(result.stdout)
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows["fc"]["format"] == "tt" and rows["layer1.0.conv1"]["format"] == "cp"
    assert rows["conv1"]["skipped"] == "excluded by pattern 'conv1'"
    assert rows["layer4.0.conv1"]["skipped"] == "plan rule: dense"
    loaded = load(out)
    assert get_meta(loaded)["arch"] == {"name": "torchvision:resnet18", "kwargs": {"num_classes": 10}}
    with torch.no_grad():
        assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pickled_mlp_end_to_end(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    src = tmp_path / "mlp.pt"
    torch.save(mlp, src)
    fails("decompose", src, "--tt-ranks", "4", match="--trust-pickle")
    assert not (tmp_path / "mlp.tt.pt").exists()
    ok("decompose", src, "--tt-ranks", "4", "--trust-pickle")
    out = tmp_path / "mlp.tt.pt"
    # The base was a pickled module: the checkpoint holds the weights and the plan (never a pickle);
    # the dense model rebuilds it, named as --arch (here the source file, with the same trust).
    fails("inspect", out, match="--arch")
    loaded = load(out, arch=str(src), trust_pickle=True)
    assert type(loaded[2]).__name__ == "TTLinear"
    result = ok("inspect", out, "--arch", src, "--trust-pickle", "--json")
    assert json.loads(result.stdout)["compressed"] is True
    # report and finetune take the same --arch FILE (no --arch-kwargs: none apply to a file)
    data = tmp_path / "d.pt"
    torch.save({"inputs": torch.randn(96, 64), "targets": torch.randint(0, 10, (96,))}, data)
    result = ok("report", src, out, "--arch", src, "--trust-pickle", "--data", f"tensors:{data}", "--no-latency",
                "--format", "json")
    assert [r["compression"] > 1 for r in json.loads(result.stdout)["rows"]] == [False, True]
    ok("finetune", out, "--arch", src, "--trust-pickle", "--data", f"tensors:{data}", "--epochs", "1",
       "-o", tmp_path / "mlp.ft.pt")
    assert type(load(tmp_path / "mlp.ft.pt", arch=str(src), trust_pickle=True)[2]).__name__ == "TTLinear"


def test_full_ranks_compress_nothing_and_say_so(cnn_file, tmp_path):
    # At ranks this high a TT layer has more parameters than the dense one: every selected layer
    # stays dense, which is no compression at all (full-rank exactness is tested on the layers).
    out = tmp_path / "full.tt.pt"
    fails("decompose", cnn_file, "--arch", "seed-cnn", "--tt-ranks", "100000", "--layers", "classifier.*", "-o", out,
          match="nothing was compressed, every selected layer stays dense (classifier.1: would not shrink")
    assert not out.exists()


@pytest.mark.parametrize("how", ["raw-pickle", "torch-save"])
def test_crafted_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = tmp_path / "evil.pt"
    if how == "raw-pickle":
        src.write_bytes(pickle.dumps(Evil(), protocol=2))
    else:
        torch.save(Evil(), src)
    for cmd in ("decompose", "inspect"):
        fails(cmd, src, "--arch", "seed-cnn", match="--trust-pickle")
        assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_errors_exit_2_without_output(cnn_file, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a model at all" * 10)
    bad_plan = tmp_path / "bad.yaml"
    bad_plan.write_text("rules: [{format: tt}]\n")
    out = tmp_path / "out.tt.pt"
    cases = [
        (["decompose", tmp_path / "missing.pt"], "not found"),
        (["decompose", garbage, "--arch", "seed-cnn"], "not a readable model file"),
        (["decompose", cnn_file], "--arch"),
        (["decompose", cnn_file, "--arch", "lenet5"], "missing key"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--arch-kwargs", '{"num_classes": 5}'], "wrong shape"),
        (["decompose", cnn_file, "--arch", "no-such-arch"], "arch (--arch) 'no-such-arch' is unknown"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--arch-kwargs", "{num_classes: 5}"], "--arch-kwargs"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--tt-ranks", "0"], "--tt-ranks"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--tt-eps", "1.5"], "--tt-eps"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--cp-ranks", "4", "--cp-ratio", "3"], "mutually exclusive"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--target-ratio", "100000"], "out of reach"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--plan", bad_plan], "no pattern"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--plan", tmp_path / "nope.yaml"], "plan file not found"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--calib-memory", "1M"], "calib_memory (--calib-memory) '1M' is below"),
        (["decompose", cnn_file, "--arch", "seed-cnn", "--calib-memory", "lots"], "calib_memory (--calib-memory) must be a size"),
        (["inspect", tmp_path / "missing.pt"], "not found"),
    ]
    for args, match in cases:
        fails(*args, "-o", out, match=match) if args[0] == "decompose" else fails(*args, match=match)
        assert not out.exists(), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "garbage.pt"]
    fails("decompose", cnn_file, "--arch", "seed-cnn", "-o", cnn_file, match="must differ")


def test_debug_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--debug", "decompose", str(tmp_path / "missing.pt")])
    assert result.exit_code != 0 and isinstance(result.exception, CheckpointError)


def test_inspect_dense_and_compressed(cnn_file, tmp_path, plan_file):
    result = ok("inspect", cnn_file, "--arch", "seed-cnn", "--json")
    summary = json.loads(result.stdout)
    assert summary["compressed"] is False and summary["kind"] == "state_dict"
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows["classifier.1"]["compressible"] is True and rows["classifier.1"]["suggestion"].startswith("TT ")
    assert sum(r["share"] for r in summary["layers"]) + summary["other_params"] / summary["total_params"] == pytest.approx(1)
    table = ok("inspect", cnn_file, "--arch", "seed-cnn").stdout
    assert "classifier.1" in table and "suggestion" in table
    out = tmp_path / "c.tt.pt"
    ok("decompose", cnn_file, "--arch", "seed-cnn", "--tt-ranks", "3", "--cp-ranks", "2", "--plan", plan_file, "-o", out)
    summary = json.loads(ok("inspect", out, "--json").stdout)
    assert summary["compressed"] is True and summary["kind"] == "ttcompress"
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows["classifier.1"]["format"] == "tt" and max(rows["classifier.1"]["ranks"]) <= 3
    assert rows["features.3"]["format"] == "cp" and rows["features.3"]["ranks"] == [2]
    shown = ok("inspect", out)
    assert "r=2" in shown.stdout
    assert "torch.load cannot read it" in shown.stderr and "ttcompress.load(path)" in shown.stderr
    assert "torch.load" not in ok("inspect", cnn_file, "--arch", "seed-cnn").stderr


@pytest.mark.parametrize("out_after, flagged", [(0.2, False), (0.8, True), (None, True)])
def test_large_error_flag_follows_the_output_error_when_calibrated(out_after, flagged) -> None:
    # A fitted layer's weight may move far from the dense one on purpose (weight error 2.0 here);
    # with calibration data the output error decides, without it the weight error does.
    from rich.console import Console

    from ttcompress.cli.tables import layer_table
    from ttcompress.layer_report import LayerReport
    from ttcompress.compression.pipeline import CompressionResult

    record = LayerReport("fc", "tt", "Linear", (8, 8), 64, 16, ranks=(1, 2, 1), rel_error=2.0,
                         out_error_before=None if out_after is None else 0.9, out_error_after=out_after)
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(layer_table(CompressionResult(nn.Linear(8, 8), (record,), 64, 16, Plan())))
    assert ("large error" in console.export_text()) is flagged


def test_cp_progress_bars_on_a_terminal(cnn_file, tmp_path, plan_file, monkeypatch):
    from rich.console import Console

    from ttcompress.cli import decompose as cli_decompose
    from ttcompress.cli.progress import DecomposeProgress
    from ttcompress.compression.planfile import load_plan

    calls: list[tuple[int, int]] = []
    original = DecomposeProgress.cp
    monkeypatch.setattr(DecomposeProgress, "cp",
                        lambda self, state: (calls.append((state.iteration, state.n_iter_max)), original(self, state)))
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    options = {"arch": "seed-cnn", "arch_kwargs": None, "trust_pickle": False, "trust_code": False}
    cli_decompose._decompose_with_progress(cnn_file, output=tmp_path / "o.tt.pt", plan=load_plan(plan_file),
                                           load=options, calib=None, calib_info=None, console=console)
    layers = get_meta(load(tmp_path / "o.tt.pt"))["layers"].values()
    n_cp = sum(entry["format"] == "cp" for entry in layers)
    assert n_cp >= 1 and calls == [(i, 3) for i in range(4)] * n_cp  # each run: its start and every sweep
    assert "CP-ALS" in screen.getvalue()


def test_progress_stays_off_a_redirected_stderr(cnn_file, tmp_path, plan_file):
    result = ok("decompose", cnn_file, "--arch", "seed-cnn", "--plan", plan_file, "-o", tmp_path / "o.tt.pt")
    assert result.stderr.strip().splitlines() == [f"data-free (no calibration data); wrote {tmp_path / 'o.tt.pt'}"]
    result = ok("decompose", cnn_file, "--arch", "seed-cnn", "--plan", plan_file, "-o", tmp_path / "p.tt.pt",
                "--json")
    assert json.loads(result.stdout)["params_after"] > 0 and "CP-ALS" not in result.stderr


def test_decompose_checks_the_model_still_runs(tmp_path, monkeypatch):
    """A model whose code breaks on a replaced layer (here: it insists on nn.Linear) keeps that layer
    dense after `decompose`, checked on the input shape the model records; the rest is compressed."""
    import sys

    (tmp_path / "picky_for_check_test.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Block(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.b = nn.Linear(64, 64)\n"
        "    def forward(self, x):\n        if not isinstance(self.b, nn.Linear):\n"
        "            raise TypeError('b must be an nn.Linear')\n        return self.b(x)\n"
        "class Picky(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.a = nn.Linear(64, 64)\n        self.block = Block()\n"
        "    def forward(self, x):\n        return self.block(torch.relu(self.a(x)))\n"
        "def make():\n    return Picky()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from ttcompress.checkpoint.meta import update_meta

    from ttcompress.checkpoint.models import build_arch

    model = build_arch("picky_for_check_test:make")
    update_meta(model, info={"input_shape": [64]})
    src = tmp_path / "picky.tt.pt"
    from ttcompress.checkpoint.io import save as save_model

    save_model(model, src)
    monkeypatch.delitem(sys.modules, "picky_for_check_test", raising=False)
    out = tmp_path / "picky.out.tt.pt"
    result = ok("decompose", src, "--tt-ranks", "4", "--trust-code", "-o", out, "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["a"]["format"] == "tt" and rows["block.b"]["format"] == "dense"
    assert "forward check failed" in rows["block.b"]["skipped"]
    loaded = load(out, trust_code=True)
    assert loaded(torch.randn(2, 64)).shape == (2, 64)


@pytest.mark.parametrize("recorded, calibrated", [("mnist-5k", True), ("tensors:/etc/hostname", False),
                                                  ("os:system", False), ("imagefolder:/", False)])
def test_a_checkpoint_that_records_its_dataset_is_calibrated_on_it(tmp_path, recorded, calibrated):
    # Every model `train` writes records its dataset: decompose calibrates on it unless --no-calib.
    # Only built-in names count: a file never makes ttcompress read a path or import a name.
    import ttcompress
    from ttcompress.checkpoint.models import build_arch

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    ttcompress.save(build_arch("seed-cnn"), path, info={"dataset": recorded})
    args = ("decompose", path, "--tt-ranks", "4", "--calib-samples", "64", "--json")
    data = json.loads(ok(*args, "-o", tmp_path / "a.tt.pt").stdout)
    assert data["calibration"]["used"] is calibrated
    if calibrated:
        assert data["calibration"]["dataset"] == "mnist-5k" and data["calibration"]["samples"] == 64
        assert data["calibration"]["source"] == "recorded in the checkpoint"
        assert get_meta(load(tmp_path / "a.tt.pt"))["info"]["calibration"]["used"] is True
        assert all(layer["out_error_after"] is not None for layer in data["layers"] if layer["format"] == "tt")
    data = json.loads(ok(*args, "--no-calib", "-o", tmp_path / "b.tt.pt").stdout)
    assert data["calibration"] == {"used": False}


def test_a_request_that_compresses_nothing_is_an_error(cnn_file, tmp_path):
    out = tmp_path / "big.tt.pt"
    result = fails("decompose", cnn_file, "--arch", "seed-cnn", "--tt-ranks", "100000", "--cp-ranks", "100000",
                   "-o", out, match="nothing was compressed")
    assert "would not shrink at TT ranks 100000" in result.stderr and "lower the ranks" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("recorded", ["mnist-5k", "cifar10"])  # calibrated; recorded but not loadable here
def test_a_bad_request_on_a_checkpoint_that_records_its_dataset_is_one_line(tmp_path, recorded):
    """The default calibration's notes ("calibrating on ...", "... did not load") come after the
    decomposition succeeded: a refused request is still exactly one line."""
    import ttcompress
    from ttcompress.checkpoint.models import build_arch

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    ttcompress.save(build_arch("seed-cnn"), path, info={"dataset": recorded})
    out = tmp_path / "o.tt.pt"
    fails("decompose", path, "--tt-ranks", "100000", "--cp-ranks", "100000", "--calib-samples", "16", "-o", out,
          match="nothing was compressed")
    assert not out.exists()
    lines = ok("decompose", path, "--tt-ranks", "4", "--calib-samples", "16", "-o", out).stderr.strip().splitlines()
    if recorded == "mnist-5k":
        assert lines[-1] == f"calibrated on 16 samples of 'mnist-5k' (recorded in the checkpoint); wrote {out}"
    else:
        assert "did not load" in lines[-2] and lines[-1] == f"data-free (no calibration data); wrote {out}"
