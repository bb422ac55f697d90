"""Report data: params, ratio, FLOPs and accuracy checked against independent counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.data import DatasetBundle
from ttcompress.checkpoint.io import save
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import Plan, TTSettings
from ttcompress.layer_report import count_params
from ttcompress.report.compare import ModelEntry, build_report, count_flops
from ttcompress.compression.pipeline import compress


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))


@pytest.fixture
def bundle() -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    ds = TensorDataset(x, y)
    return DatasetBundle(name="toy", train=ds, test=ds, num_classes=4, input_shape=(1, 8, 8), classes=tuple("abcd"))


def test_count_params_matches_a_hand_count() -> None:
    assert count_params(_mlp()) == 64 * 128 + 128 + 128 * 4 + 4


def test_flops_of_a_dense_mlp_are_two_per_multiply_add() -> None:
    assert count_flops(_mlp(), (1, 8, 8)) == 2 * (64 * 128 + 128 * 4)


def test_report_values_match_independent_counts(bundle: DatasetBundle, tmp_path) -> None:
    dense = _mlp()
    small = compress(_mlp(), Plan(tt=TTSettings(ranks=2)))
    path = save(small, tmp_path / "small.pt")
    report = build_report(
        baseline=ModelEntry("dense", dense),
        models=[ModelEntry("small", small, path=path)],
        data=bundle,
        min_run_time=0.01,
    )
    base, row = report.rows
    assert base.is_baseline and base.compression == 1.0 and base.accuracy_delta == 0.0
    n_small = sum(p.numel() for p in small.parameters())
    assert row.params == n_small
    assert row.compression == pytest.approx(base.params / n_small)
    assert row.file_bytes == path.stat().st_size
    from safetensors.torch import save as st_save  # weights alone: the state dict, no header metadata

    assert row.size_bytes == len(st_save({k: v.contiguous() for k, v in small.state_dict().items()}))
    assert row.size_bytes < row.file_bytes
    # accuracy: an independent pass over the test set
    with torch.no_grad():
        x, y = bundle.test.tensors
        expected = (small.eval()(x).argmax(1) == y).float().mean().item()
    assert row.accuracy == pytest.approx(expected)
    assert row.accuracy_delta == pytest.approx(row.accuracy - base.accuracy)
    assert row.top5 is None  # 4 classes: no top-5
    assert row.latency_ms > 0 and row.latency_iqr_ms >= 0
    assert 0 < row.flops < base.flops
    names = [layer.name for layer in row.layers if layer.compressed]
    assert names and all(layer.format == "tt" for layer in row.layers if layer.compressed)  # lower-case vocabulary
    assert sum(layer.params_before - layer.params_after for layer in row.layers) == base.params - row.params


def test_report_cli_formats_and_plot(tmp_path) -> None:
    from ttcompress.checkpoint.models import build_arch

    torch.manual_seed(0)
    dense = build_arch("seed-cnn")
    base_path = save(dense, tmp_path / "base.pt")
    small = compress(build_arch("seed-cnn"), Plan(tt=TTSettings(ranks=2)))
    small.load_state_dict(small.state_dict())
    small_path = save(small, tmp_path / "small.pt")
    runner = CliRunner()
    common = [str(base_path), str(small_path), "--eval-limit", "50", "--min-run-time", "0.01"]
    result = runner.invoke(app, ["report", *common, "--format", "json", "--plot", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["model"] for r in rows] == ["base", "small"]
    for key in ("model", "params", "compression", "size_bytes", "flops", "latency_ms", "accuracy", "accuracy_delta"):
        assert key in rows[1]
    assert 0.0 <= rows[1]["accuracy"] <= 1.0
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    result = runner.invoke(app, ["report", *common, "--no-latency", "--format", "md", "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    assert "| model | params |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "xml"], "--format"),
        (["--plot", "out.jpg"], "--plot"),
        (["--data", "nope"], "nope"),
    ],
)
def test_report_cli_bad_input_exits_2_without_output(tmp_path, args, message) -> None:
    from ttcompress.checkpoint.models import build_arch

    base = save(build_arch("seed-cnn"), tmp_path / "base.pt")
    result = CliRunner().invoke(app, ["report", str(base), str(base), "-o", str(tmp_path / "r.md"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.md").exists()


def test_report_cli_missing_model_exits_2(tmp_path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing.pt"), str(tmp_path / "also.pt")])
    assert result.exit_code == 2 and "missing.pt" in result.stderr


def test_per_kind_compression_matches_an_independent_count() -> None:
    from ttcompress.report.measure import params_by_kind

    torch.manual_seed(0)
    dense = build_arch("seed-cnn")
    small = compress(build_arch("seed-cnn"), Plan(tt=TTSettings(ranks=2)))  # Linear → TT; convs → CP at 4×

    def count(model, kinds) -> int:  # by hand: the weights and biases of the layers of those kinds
        return sum(p.numel() for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False))

    from ttcompress.formats import format_of

    def by_format(model, target) -> int:  # factorized layers of that target, plus dense layers of that type
        inside = {id(sub) for m in model.modules() if format_of(m) is not None for sub in m.modules()}
        factorized = sum(p.numel() for m in model.modules() if (f := format_of(m)) is not None and target in f.targets
                         for p in m.parameters())
        dense = sum(p.numel() for m in model.modules() if isinstance(m, target) and id(m) not in inside
                    for p in m.parameters(recurse=False))
        return factorized + dense

    base = params_by_kind(dense)
    assert base["conv"] == count(dense, nn.Conv2d) and base["linear"] == count(dense, nn.Linear)
    assert base["other"] == 0 and sum(base.values()) == count_params(dense)
    comp = params_by_kind(small)
    assert comp["conv"] == by_format(small, nn.Conv2d) and comp["linear"] == by_format(small, nn.Linear)
    assert sum(comp.values()) == count_params(small)
    report = build_report(baseline=ModelEntry("dense", dense), models=[ModelEntry("small", small)],
                          input_shape=(1, 28, 28), measure_speed=False)
    row = report.rows[1].to_dict()
    assert row["compression_conv"] == pytest.approx(base["conv"] / comp["conv"])
    assert row["compression_linear"] == pytest.approx(base["linear"] / comp["linear"])
    assert row["compression_embedding"] is None and row["compression_attention"] is None
    assert row["flops_by_kind"]["conv"] > 0 and row["flops_by_kind"]["linear"] > 0
    assert sum(row["flops_by_kind"].values()) == row["flops"]


def test_peak_memory_counts_weights_and_the_largest_live_activations() -> None:
    from ttcompress.report.measure import peak_memory

    model = nn.Sequential(nn.Linear(100, 1000, bias=False), nn.ReLU(), nn.Linear(1000, 10, bias=False))
    weights = (100 * 1000 + 1000 * 10) * 4
    peak = peak_memory(model, (100,), batch_size=50)
    # At least the weights and the 50×1000 hidden activation; at most the weights, one temporary copy of
    # them (a kernel may transpose a weight), the input and every activation.
    assert weights + 50 * 1000 * 4 <= peak <= 2 * weights + (50 * 100 + 2 * 50 * 1000 + 50 * 10) * 4
    assert peak_memory(model, (100,), batch_size=200) > peak


@pytest.mark.parametrize("name, fmt, check", [
    ("r.md", None, lambda t: t.startswith("_dataset")),
    ("r.csv", None, lambda t: t.startswith("model,is_baseline,params")),
    ("r.json", None, lambda t: json.loads(t)["meta"]["dataset"] == "mnist-5k"),
    ("r.txt", None, lambda t: "ttcompress report" in t),
    ("r.csv", "csv", lambda t: t.startswith("model,")),
])
def test_output_format_follows_the_extension(tmp_path, name, fmt, check) -> None:
    base = save(build_arch("seed-cnn"), tmp_path / "base.pt")
    args = ["report", str(base), str(base), "--eval-limit", "20", "--no-latency", "-o", str(tmp_path / name),
            "--labels", "dense,again"]
    result = CliRunner().invoke(app, args + (["--format", fmt] if fmt else []))
    assert result.exit_code == 0, result.output
    text = (tmp_path / name).read_text()
    assert check(text) and "again" in text


@pytest.mark.parametrize("args, message", [
    (["-o", "r.csv", "--format", "md"], "contradicts"),
    (["-o", "r.xlsx"], "-o must end in one of"),
    (["--labels", "only-one"], "labels must name each of the 2 models"),
    (["--labels", "a,a"], "unique"),
])
def test_report_output_and_label_errors(tmp_path, args, message) -> None:
    base = save(build_arch("seed-cnn"), tmp_path / "base.pt")
    args = [a if not a.startswith("r.") else str(tmp_path / a) for a in args]
    result = CliRunner().invoke(app, ["report", str(base), str(base), "--no-latency", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("r.")]


def test_flops_count_the_factorized_evaluation_whatever_path_eval_would_pick() -> None:
    from ttcompress.layers.cp_conv import CPConv2d
    from ttcompress.report.measure import count_flops

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    layer = CPConv2d.from_conv(conv, rank=4).eval()
    layer.evaluation = "dense"  # as if timing had picked the merged kernel
    factorized = count_flops(layer, (16, 12, 12))
    assert layer.evaluation == "dense"  # restored
    assert factorized < count_flops(conv.eval(), (16, 12, 12))  # rank 4 is far cheaper than the dense conv


def test_layer_rows_list_every_layer_with_the_reason_a_dense_one_stayed_dense() -> None:
    from ttcompress.layer_report import KEPT_DENSE_INFO
    from ttcompress.compression.plan import Plan
    from ttcompress.report.compare import NO_REASON, layer_rows
    from ttcompress.compression.pipeline import compress_with_report

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 10))
    assert layer_rows(net) == ()  # nothing compressed: no per-layer section
    result = compress_with_report(net, Plan.from_dict({"exclude": ["4"]}))
    rows = layer_rows(result.model)
    assert [(r.name, r.format) for r in rows] == [("0", "cp"), ("2", "tt"), ("4", "dense")]
    dense = rows[2]
    assert dense.skipped == result.model.ttcompress_meta["info"][KEPT_DENSE_INFO]["4"] and "exclude" in dense.skipped
    assert dense.params_before == dense.params_after == 64 * 10 + 10 and dense.shape == (10, 64)
    # A checkpoint from before reasons were recorded: the layer is still listed, without a reason.
    del result.model.ttcompress_meta["info"][KEPT_DENSE_INFO]
    assert layer_rows(result.model)[2].skipped == NO_REASON


def test_tucker2_flops_are_the_factorized_chain_on_the_first_count() -> None:
    """In eval mode the layer may time a merged kernel against its chain: never inside the count."""
    from ttcompress.layers import Tucker2Conv2d
    from ttcompress.report.measure import count_flops

    torch.manual_seed(0)
    layer = Tucker2Conv2d(64, 64, 3, padding=1, in_rank=8, out_rank=8)
    want = 2 * 8 * 8 * (64 * 8 + 8 * 8 * 9 + 8 * 64)
    assert count_flops(nn.Sequential(layer), (64, 8, 8)) == want
    assert count_flops(nn.Sequential(layer), (64, 8, 8)) == want
    assert layer.evaluation == "auto"


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_flops_include_the_attention(need_weights: bool) -> None:
    """nn.MultiheadAttention counted through its plain ops (its fused inference kernel counts 0), and
    the CPU attention kernel counted as torch counts the CUDA ones: projections + 2 matmuls."""
    from ttcompress.report.measure import count_flops

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(64, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=need_weights)[0]

    seq, dim = 17, 64
    want = 2 * seq * dim * 3 * dim + 2 * 2 * seq * seq * dim + 2 * seq * dim * dim
    assert count_flops(Net(), (seq, dim)) == want
    assert torch.backends.mha.get_fastpath_enabled()


def test_report_without_data_takes_the_input_shape(tmp_path) -> None:
    """--data none on a model that records no input shape (a state dict): --input-shape gives it."""
    from ttcompress.report.measure import count_flops
    from ttcompress.checkpoint.models import build_arch

    torch.manual_seed(0)
    dense = build_arch("lenet5")
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    runner = CliRunner()
    args = ["report", str(tmp_path / "dense.pt"), str(tmp_path / "dense.pt"), "--arch", "lenet5", "--data", "none",
            "--no-latency", "--format", "json", "--labels", "a,b"]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 2 and "--input-shape" in failed.stderr
    result = runner.invoke(app, [*args, "--input-shape", "1,28,28"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert rows[0]["flops"] == count_flops(dense, (1, 28, 28)) > 0
