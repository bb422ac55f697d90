"""`compress(..., calib_data=...)`: data-aware decomposition through the product, and its CLI."""

from __future__ import annotations

import copy
import io
import hashlib
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from ttcompress.compression.allocate import input_grams, whitened
from ttcompress.cli import app
from ttcompress.checkpoint.io import get_meta, read_header
from ttcompress.compression.plan import Plan, TTSettings
from ttcompress.compression.pipeline import compress, compress_with_report
from ttcompress.checkpoint.teacher import default_teacher, file_sha256

runner = CliRunner()
SVD = {"formats": ["svd"], "svd": {"rank": 4}}


def _subspace_inputs(n: int = 256, k: int = 32, dim: int = 4, seed: int = 0) -> torch.Tensor:
    """Rows spanning a random ``dim``-dimensional subspace of R^k (structured inputs)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) @ torch.randn(dim, k, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("plan", [SVD, Plan(tt=TTSettings(ranks=2))], ids=["svd", "tt"])
def test_calibrated_output_error_not_above_uncalibrated(plan):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    x = _subspace_inputs(dim=6)
    ref = dense(x).detach()
    plain = compress(copy.deepcopy(dense), plan)
    fitted = compress_with_report(copy.deepcopy(dense), plan, calib_data=x)
    assert len(fitted.compressed) == 2
    with torch.no_grad():
        assert _rel(fitted.model(x), ref) <= _rel(plain(x), ref) * 0.9
    for r in fitted.compressed:  # recorded output errors: fitted <= data-free
        assert r.fit_method is not None and r.out_error_after <= r.out_error_before + 1e-12


def test_exact_recovery_on_the_inputs_subspace():
    """A weight of any rank is reproduced exactly on inputs that span only 4 directions (svd rank 4)."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(32, 24))
    x = _subspace_inputs(dim=4)
    result = compress_with_report(copy.deepcopy(dense), SVD, calib_data=x)
    rec = result.records[0]
    assert rec.format == "svd" and rec.rel_error > 0.3  # the weight itself is far from rank 4
    with torch.no_grad():
        assert _rel(result.model(x), dense(x)) < 1e-3
    assert rec.out_error_after < 1e-3


def test_sequential_three_layers_compensate():
    torch.manual_seed(2)
    dense = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(512, 32)
    result = compress_with_report(copy.deepcopy(dense), {"formats": ["svd"], "svd": {"rank": 6}}, calib_data=x)
    assert [r.name for r in result.compressed] == ["0", "2", "4"]
    plain = compress(copy.deepcopy(dense), {"formats": ["svd"], "svd": {"rank": 6}})
    with torch.no_grad():
        assert _rel(result.model(x), dense(x)) < _rel(plain(x), dense(x))
    meta = get_meta(result.model)["layers"]
    assert all(meta[n]["fit_method"] == "whitened-svd" and meta[n]["out_error_after"] >= 0 for n in ("0", "2", "4"))


def test_every_calib_data_form_gives_the_same_model():
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = _subspace_inputs(n=96, dim=8)
    y = torch.zeros(96, dtype=torch.long)
    forms = {
        "tensor": x,
        "list": list(x.split(32)),
        "pairs": [(a, b) for a, b in zip(x.split(32), y.split(32))],
        "loader": DataLoader(TensorDataset(x, y), batch_size=32),
        "dataset": TensorDataset(x, y),
    }
    outs = {}
    for name, data in forms.items():
        model = compress(copy.deepcopy(dense), SVD, calib_data=data)
        with torch.no_grad():
            outs[name] = model(x)
    # exact Grams take each chunk's products in float32 (accumulated in float64): batches split
    # differently round differently, ~1e-5 absolute on outputs of size ~3 (a wrong split is O(1))
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["tensor"], rtol=1e-4, atol=1e-4, msg=name)


def test_sequence_inputs_and_unreached_layers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(4)
    net = Net()
    x = torch.randn(8, 5, 16)  # (batch, sequence, features)
    result = compress_with_report(net, SVD, calib_data=x)
    recs = {r.name: r for r in result.records}
    assert recs["a"].format == recs["b"].format == "svd"
    assert recs["unused"].format == "dense" and "not reached" in recs["unused"].skipped
    assert result.model(x).shape == (8, 5, 16)


def test_bad_calibration_data():
    dense = nn.Sequential(nn.Linear(32, 8))
    before = copy.deepcopy(dense.state_dict())
    with pytest.raises(ValueError, match="calib_data: the model cannot run"):
        compress(dense, SVD, calib_data=torch.randn(4, 7))
    with pytest.raises(ValueError, match="calib_data"):
        compress(dense, SVD, calib_data=[])
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # untouched


def test_min_saving_keeps_a_small_bad_layer_dense():
    torch.manual_seed(5)
    dense = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3))
    x = torch.randn(128, 64)
    plan = {"formats": ["svd"], "svd": {"rank": 1}, "min_saving": 0.05, "max_error": 0.05}
    recs = {r.name: r for r in compress_with_report(copy.deepcopy(dense), plan, calib_data=x).records}
    assert recs["2"].format == "dense" and recs["2"].skipped.startswith("kept dense")
    off = {r.name: r for r in compress_with_report(copy.deepcopy(dense), {**plan, "min_saving": 0.0},
                                                   calib_data=x).records}
    assert off["2"].format == "svd"
    assert Plan.from_dict({"min_saving": 0.02}).to_dict() == {"min_saving": 0.02}
    with pytest.raises(ValueError, match="min_saving"):
        Plan(min_saving=1.5)


def test_barely_shrinking_layers_stay_dense_only_without_calibration():
    """The allocator's MIN_LAYER_RATIO rule: data-free, layers at < 1.25x stay dense; calibrated
    (fitted to their outputs, output-error estimates) they keep the ranks the greedy gave them."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 128, bias=False),
                          nn.Linear(128, 128, bias=False))
    free = {r.name: r for r in compress_with_report(copy.deepcopy(dense), {"target_ratio": 2.0}).records}
    assert free["0"].format == free["1"].format == "dense"
    assert "shrink it only" in (free["0"].skipped or "")
    fitted = compress_with_report(copy.deepcopy(dense), {"target_ratio": 2.0}, calib_data=torch.randn(128, 16))
    recs = {r.name: r for r in fitted.records}
    assert recs["0"].format != "dense" and recs["0"].params_before / recs["0"].params_after < 1.25
    assert fitted.ratio >= 2.0


def test_whitened_weight_error_is_output_error():
    torch.manual_seed(6)
    layer = nn.Linear(12, 7)
    x = torch.randn(40, 12, dtype=torch.float64)
    gram = input_grams(layer.double(), [""], [x])[""]
    twin = whitened(layer, gram)
    with torch.no_grad():  # ||W G^{1/2}||_F = ||X W^T||_F (and so for any weight difference, by linearity)
        assert float(twin.weight.double().norm()) == pytest.approx(float((x @ layer.weight.T).norm()), rel=1e-9)
    assert twin.weight.shape == layer.weight.shape and twin is not layer


def test_target_ratio_with_calibration_reaches_the_ratio():
    torch.manual_seed(7)
    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    x = _subspace_inputs(n=200, k=64, dim=8)
    result = compress_with_report(copy.deepcopy(dense), {"target_ratio": 4.0, "formats": ["svd"]}, calib_data=x)
    assert result.ratio >= 4.0
    ranks = {r.name: r.ranks for r in result.compressed}
    assert ranks["0"][0] <= 8  # the first layer's inputs span 8 directions: more rank buys nothing


# ---- CLI -------------------------------------------------------------------------------------------


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_decompose_calibrates_and_records(cnn_file, tmp_path):
    out = tmp_path / "cal.pt"
    args = ("decompose", cnn_file, "--arch", "seed-cnn", "--format", "svd", "--layers", "classifier.*",
            "--data", "mnist-5k", "--calib-samples", "64", "--seed", "1", "--json")
    res = _run(*args, "-o", out)
    assert res.exit_code == 0, res.stderr
    layers = {r["name"]: r for r in json.loads(res.stdout)["layers"]}
    assert layers["classifier.1"]["fit_method"] == "whitened-svd"
    info = read_header(out)["info"]
    assert info["calibration"] == {"used": True, "dataset": "mnist-5k", "samples": 64, "seed": 1, "split": "train",
                                   "balanced": True}
    assert info["source_sha256"] == hashlib.sha256(cnn_file.read_bytes()).hexdigest()
    res = _run(*args, "--no-calib", "-o", tmp_path / "plain.pt")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["layers"][2]["fit_method"] is None
    assert read_header(tmp_path / "plain.pt")["info"]["calibration"] == {"used": False}


@pytest.mark.parametrize("extra, match", [
    (("--calib-samples", "0"), "--calib-samples must be a positive integer"),
    (("--data", "nope"), "unknown dataset"),
])
def test_cli_bad_calibration_input(cnn_file, tmp_path, extra, match):
    out = tmp_path / "x.pt"
    args = ["decompose", cnn_file, "--arch", "seed-cnn", "--format", "svd", "--layers", "classifier.*",
            "--data", "mnist-5k", *extra, "-o", out]
    res = _run(*args)
    assert res.exit_code == 2 and match in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_cli_wrong_shape_calibration_data(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "mlp.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(100, 10)), src)
    out = tmp_path / "x.pt"
    res = _run("decompose", src, "--trust-pickle", "--format", "svd", "--data", "mnist-5k", "--calib-samples", "8",
               "-o", out)
    assert res.exit_code == 2 and "calib_data (--data): the model cannot run" in res.stderr, res.stderr
    assert not out.exists()


def test_default_teacher_found_and_hash_checked(tmp_path):
    src = tmp_path / "base.pt"
    src.write_bytes(b"dense weights")
    info = {"source_path": str(src), "source_sha256": file_sha256(src)}
    choice = default_teacher(info)
    assert choice.path == src and "distilling from" in choice.message
    src.write_bytes(b"retrained")
    choice = default_teacher(info)
    assert choice.path is None and choice.warning and "changed" in choice.message
    assert default_teacher({}).path is None and default_teacher({}).message is None


def test_inspect_table_shows_the_recorded_output_error(tmp_path) -> None:
    """A calibrated checkpoint's per-layer output error (before → after fitting) shows in inspect's table."""
    from rich.console import Console

    from ttcompress.cli.tables import summary_table
    from ttcompress.layer_report import LayerReport
    from ttcompress.compression.summary import ModelSummary

    fitted = LayerReport("fc", "tt", "TTLinear", (8, 8), 64, 16, ranks=(1, 2, 1), rel_error=2.0,
                         out_error_before=0.9, out_error_after=0.25, params=16, share=0.2)
    plain = LayerReport("fc", "tt", "TTLinear", (8, 8), 64, 16, ranks=(1, 2, 1), rel_error=0.3, params=16, share=0.2)
    texts = []
    for record in (fitted, plain):
        console = Console(width=300, record=True, file=io.StringIO())
        console.print(summary_table(ModelSummary("ttcompress", None, 80, 16, (record,), True), title="m"))
        texts.append(console.export_text())
    assert "output error" in texts[0] and "0.9000 → 0.2500" in texts[0] and "2.0000 !" not in texts[0]
    assert "2.0000 ^" in texts[0] and "0.3000 ^" not in texts[1]  # further from the dense weight than zero
    assert "output error" not in texts[1] and "0.3000" in texts[1]
