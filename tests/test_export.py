"""Export: ONNX (checked with onnxruntime), TorchScript, and dense merge-back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ttcompress
from ttcompress.export import ExportError, export_model, merge_to_dense
from ttcompress.checkpoint.io import load, save, update_meta
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.cli.flags import with_flag
from ttcompress.errors import InputError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def compressed() -> nn.Module:
    torch.manual_seed(0)
    model = build_arch("seed-cnn", kwargs={"hidden": 256})
    model = ttcompress.compress(model, Plan(tt=TTSettings(ranks=4), cp=CPSettings(rank=4)))
    update_meta(model, info={"input_shape": [1, 28, 28]})
    return model.eval()


def _dense_param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_onnx_matches_at_two_batch_sizes_and_stays_factorized(compressed, tmp_path) -> None:
    result = export_model(compressed, tmp_path / "m.onnx", format="onnx", batch_size=2)
    assert result.checked_batches == (2, 4) and result.max_error is not None and result.max_error <= 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 28, 28)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, compressed(x), atol=1e-4, rtol=1e-4)
    # The factorized layers stay factorized: the file is far smaller than the dense weights.
    dense_bytes = _dense_param_bytes(build_arch("seed-cnn", kwargs={"hidden": 256}))
    assert result.size_bytes < dense_bytes / 5


def test_torchscript_matches(compressed, tmp_path) -> None:
    result = export_model(compressed, tmp_path / "m.ts", format="torchscript", batch_size=3)
    loaded = torch.jit.load(str(result.path))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x), atol=1e-5, rtol=1e-5)


def test_dense_export_loads_into_the_plain_architecture(compressed, tmp_path) -> None:
    result = export_model(compressed, tmp_path / "dense.tt.pt", format="dense")
    assert all(layer.merged for layer in result.layers) and len(result.layers) == 4
    plain = build_arch("seed-cnn", kwargs={"hidden": 256})
    from safetensors.torch import load_file

    plain.load_state_dict(load_file(str(result.path)), strict=True)
    again = load(result.path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), compressed(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(again(x), compressed(x), atol=1e-4, rtol=1e-4)
    assert not any(type(m).__module__.startswith("ttcompress.layers") for m in again.modules())


def test_merge_slower_decides_per_layer_by_measured_time(compressed) -> None:
    merged, layers = merge_to_dense(compressed, merge="slower", example_input=torch.randn(1, 1, 28, 28),
                                    min_run_time=0.01)
    assert {layer.name for layer in layers} == set(ttcompress.get_meta(compressed)["layers"])
    for layer in layers:
        assert layer.factorized_ms is not None and layer.dense_ms is not None
        assert layer.merged == (layer.dense_ms < layer.factorized_ms)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), compressed(x), atol=1e-4, rtol=1e-4)


def test_a_failing_check_writes_nothing(compressed, tmp_path, monkeypatch) -> None:
    import ttcompress.export as export

    monkeypatch.setattr(export, "_run_onnx", lambda data, feeds, names: [torch.zeros(len(f[0]), 10) + 5 for f in feeds])
    with pytest.raises(ExportError, match="does not reproduce"):
        export_model(compressed, tmp_path / "m.onnx", format="onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "tflite"}, "format must be one of"),
    ({"format": "onnx", "merge": "slower"}, "merge applies"),
    ({"format": "onnx", "batch_size": 0}, "batch_size"),
    ({"format": "onnx", "input_shape": [3, 32, 32]}, "does not run"),
])
def test_bad_options(compressed, tmp_path, kwargs, message) -> None:
    with pytest.raises((ValueError, ExportError), match=message):
        export_model(compressed, tmp_path / "m.out", **kwargs)
    assert not list(tmp_path.iterdir())


def test_input_shape_must_be_known(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(InputError, match="input_shape is unknown") as info:
        export_model(model, tmp_path / "m.onnx", format="onnx")
    assert with_flag(info.value).startswith("input_shape (--input-shape) is unknown")


def test_cli_export_onnx_and_bad_format(compressed, tmp_path) -> None:
    from typer.testing import CliRunner

    from ttcompress.cli import app

    src = save(compressed, tmp_path / "m.tt.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(src), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "onnx:" in result.stdout and "checked at batch sizes 1, 3" in result.stdout
    assert "torch.onnx" not in result.stdout  # the exporter's chatter stays off stdout
    result = runner.invoke(app, ["export", str(src), "--format", "tflite", "-o", str(tmp_path / "m.x")])
    assert result.exit_code == 2 and "--format must be one of" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.x").exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_wide_factorized_convs_export_on_nchw_input(fmt: str, tmp_path) -> None:
    """CP and Tucker-2 layers wide enough for the channels_last layout switch (which uses custom
    autograd functions in eager training) still trace and export, and match the model."""
    from ttcompress.layers.cp_conv import CPConv2d
    from ttcompress.layers.tucker2_conv import Tucker2Conv2d

    torch.manual_seed(0)
    cp = CPConv2d(32, 32, 3, rank=8, padding=1)
    cp.evaluation = "factorized"
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), cp, nn.ReLU(),
                          Tucker2Conv2d(32, 32, 3, in_rank=8, out_rank=8, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    assert cp.channels_last  # the layout switch is the path taken on NCHW input
    result = export_model(model, tmp_path / f"m.{fmt}", format=fmt, input_shape=[3, 12, 12], batch_size=2)
    assert result.max_error is not None and result.max_error <= 1e-4


def test_torchscript_holds_the_factors_not_a_cached_dense_kernel(monkeypatch, tmp_path) -> None:
    """In eval mode a factorized conv may run a cached dense kernel; a traced graph must not keep it
    as a constant (the file would be the dense model's size)."""
    import ttcompress.layers.cp_conv as cp_conv_module
    from ttcompress.layers.cp_conv import CPConv2d

    monkeypatch.setattr(cp_conv_module.CPConv2d, "_measured_dense", lambda self, x: True)  # eval picks dense
    torch.manual_seed(0)
    model = nn.Sequential(CPConv2d(64, 64, 3, rank=4, padding=1), nn.Flatten()).eval()
    with torch.no_grad():
        model(torch.randn(2, 64, 8, 8))  # the eval path (and its kernel cache) has been used
    result = export_model(model, tmp_path / "m.ts", format="torchscript", input_shape=[64, 8, 8], batch_size=2)
    dense_bytes = 64 * 64 * 9 * 4
    assert result.size_bytes < dense_bytes / 4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_transformers_language_model_exports_its_logits(fmt: str, tmp_path) -> None:
    """A compressed GPT-2 takes token ids (not floats) and returns a ModelOutput: the export feeds
    ids below its vocabulary and the graph outputs the logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = ttcompress.compress(transformers.GPT2LMHeadModel(cfg).eval(), Plan(tt=TTSettings(ranks=4)))
    result = export_model(model, tmp_path / f"m.{fmt}", format=fmt, input_shape=[12], batch_size=2)
    assert result.max_error is not None and result.max_error <= 1e-4
    ids = torch.randint(0, 100, (3, 12))
    if fmt == "torchscript":
        got = torch.jit.load(str(result.path))(ids)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        for batch, seq in ((3, 12), (1, 5), (4, 20)):  # dynamic batch and sequence axes
            ids = torch.randint(0, 100, (batch, seq))
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0
            got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
            with torch.no_grad():
                torch.testing.assert_close(got, model(ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
        return
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_export_extra_is_one_line_naming_it(compressed, tmp_path, monkeypatch, missing: str) -> None:
    """A fresh install without the [export] extra: one line naming the extra, exit 2, nothing written."""
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # makes ``import missing`` raise ImportError
    with pytest.raises(ExportError, match=rf"\b{missing}\b[^:]*: pip install 'ttcompress\[export\]'"):
        export_model(compressed, tmp_path / "m.onnx", format="onnx")
    save(compressed, tmp_path / "m.tt.pt")
    from typer.testing import CliRunner

    from ttcompress.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.tt.pt"), "--format", "onnx", "-o",
                                      str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "ttcompress[export]" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


class _Convs(nn.Module):
    """Every conv/linear format: CP, Tucker-2, TT, SVD (sizes where each would pick its dense path
    in eval mode for small inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 3, padding=1)
        self.conv2 = nn.Conv2d(96, 96, 3, padding=1)
        self.fc1 = nn.Linear(96 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))))


class _Tokens(nn.Module):
    """TT embedding, factorized attention (its projections TT) and a TT classifier on token ids."""

    main_input_name = "input_ids"

    def __init__(self) -> None:
        super().__init__()
        import types

        self.config = types.SimpleNamespace(vocab_size=4096)
        self.embed = nn.Embedding(4096, 128)
        self.attn = nn.MultiheadAttention(128, 4, batch_first=True)
        self.head = nn.Linear(128, 1024)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("case", ["convs", "tokens"])
def test_onnx_keeps_every_format_factorized(case: str, tmp_path) -> None:
    """Whatever path eval mode would pick, the graph computes from the factors: the file is at most
    1.15x the checkpoint's tensors (the dense model is several times larger); --fold exports the
    merged graph."""
    from ttcompress.compression.plan import Rule

    torch.manual_seed(0)
    if case == "convs":
        model, shape = _Convs().eval(), [3, 16, 16]
        rules = (Rule("conv1", format="cp", ranks=8), Rule("conv2", format="tucker2", ranks=(16, 16)),
                 Rule("fc1", format="tt", ranks=8), Rule("fc2", format="svd", ranks=16))
    else:
        model, shape = _Tokens().eval(), [8]
        rules = (Rule("embed", format="tt_embedding", ranks=16),  # the attention becomes factorized itself
                 Rule("attn.*", format="tt", ranks=16), Rule("head", format="tt", ranks=16))
    dense_bytes = _tensor_bytes(model)
    compressed = ttcompress.compress(model, Plan(rules=rules)).eval()
    formats = {type(m).__name__ for m in compressed.modules()}
    assert formats >= ({"CPConv2d", "Tucker2Conv2d", "TTLinear", "SVDLinear"} if case == "convs"
                       else {"TTEmbedding", "FactorizedMultiheadAttention", "TTLinear"}), formats
    save(compressed, tmp_path / "m.tt.pt")
    ckpt_bytes = _tensor_bytes(compressed)
    result = export_model(compressed, tmp_path / "m.onnx", format="onnx", input_shape=shape)
    assert result.max_error is not None and result.max_error <= 1e-4
    assert result.size_bytes <= 1.15 * ckpt_bytes, (result.size_bytes, ckpt_bytes, dense_bytes)
    assert dense_bytes > 2.5 * ckpt_bytes
    folded = export_model(compressed, tmp_path / "f.onnx", format="onnx", input_shape=shape, fold=True)
    assert folded.max_error is not None and folded.max_error <= 1e-4 and folded.size_bytes >= 0.9 * dense_bytes
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    assert name == ("input" if case == "convs" else "input_ids")
    assert [o.name for o in session.get_outputs()] == ["output"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "dense"])
def test_half_precision_model_exports_half_precision(compressed, fmt: str, tmp_path) -> None:
    """A float16 model is exported in float16 and checked on float16 inputs (not float32 ones)."""
    import copy

    half = copy.deepcopy(compressed).half()
    result = export_model(half, tmp_path / f"m.{fmt}", format=fmt, batch_size=2)
    assert result.max_error is not None and result.max_error <= 1e-2
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(result.path))
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert {i.data_type for i in proto.graph.initializer if len(i.dims) > 1} == {onnx.TensorProto.FLOAT16}
    elif fmt == "dense":
        from safetensors.torch import load_file

        assert {t.dtype for t in load_file(str(result.path)).values()} == {torch.float16}


def test_missing_export_extra_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch) -> None:
    import sys

    import ttcompress.checkpoint.io
    from typer.testing import CliRunner

    from ttcompress.cli import app

    model = tmp_path / "m.tt.pt"
    save(nn.Sequential(nn.Linear(4, 4)), model)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setattr(ttcompress.checkpoint.io, "load", lambda *a, **k: pytest.fail("the model was loaded first"))
    result = CliRunner().invoke(app, ["export", str(model), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "ttcompress[export]" in result.stderr, (result.stderr, result.exception)


def test_onnx_latency_beside_the_dense_graph(compressed, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from ttcompress.cli import app

    src = save(compressed, tmp_path / "m.tt.pt")
    result = CliRunner().invoke(app, ["export", str(src), "--format", "onnx", "--latency", "--json",
                                      "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["latency"]
    assert [r["batch_size"] for r in rows] == [1, 64]
    for r in rows:  # both graphs timed; the dense one holds the merged weights, so it is the larger file
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
        assert r["dense_size_bytes"] > 4 * json.loads(result.stdout)["size_bytes"]
    bad = CliRunner().invoke(app, ["export", str(src), "--format", "torchscript", "--latency", "-o", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "--latency applies to --format onnx only" in bad.stderr
    with pytest.raises(ValueError, match="latency_batches must be positive"):
        export_model(compressed, tmp_path / "y.onnx", format="onnx", latency_batches=(0,))


def test_onnx_of_factorized_layers_broadcasts_instead_of_expanding_weights(tmp_path) -> None:
    # An exported Expand is materialised by onnxruntime: expanding a TT core (or a CP/Tucker-2 1x1
    # weight) to every row cost a small ViT 1 GB per layer at batch 64. The graph must broadcast.
    import onnx

    from ttcompress.layers.cp_conv import CPConv2d
    from ttcompress.layers.tt_linear import TTLinear

    torch.manual_seed(0)
    tokens = nn.Sequential(TTLinear.from_linear(nn.Linear(64, 96), ranks=4), nn.ReLU(),
                           TTLinear.from_linear(nn.Linear(96, 64), ranks=4)).eval()
    update_meta(tokens, info={"input_shape": [10, 64]})
    images = nn.Sequential(CPConv2d.from_conv(nn.Conv2d(16, 32, 3, padding=1), rank=8)).eval()
    update_meta(images, info={"input_shape": [16, 24, 24]})
    for name, model in (("tokens", tokens), ("images", images)):
        result = export_model(model, tmp_path / f"{name}.onnx", format="onnx", batch_size=2)
        ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
        assert "Expand" not in ops, (name, sorted(ops))


def test_onnx_dynamic_axes_are_named(compressed, tmp_path) -> None:
    import onnx

    result = export_model(compressed, tmp_path / "m.onnx", format="onnx", batch_size=2)
    graph = onnx.load(str(result.path)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim][:1] == ["batch"]
