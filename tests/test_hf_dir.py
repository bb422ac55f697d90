"""A Hugging Face directory is a model input of every command; ``export --format hf`` writes one back.

Tiny GPT-2 / BERT models built from configs (never the hub), saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import warnings
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

import ttcompress  # noqa: E402
from ttcompress.cli import app  # noqa: E402
from ttcompress.errors import ArchRequiredError, CheckpointError  # noqa: E402
from ttcompress.export import ExportError, export_model  # noqa: E402
from ttcompress.checkpoint.io import get_meta, load, load_checkpoint, read_header, save  # noqa: E402
from ttcompress.checkpoint.models import build_arch  # noqa: E402
from ttcompress.compression.plan import Plan, TTSettings  # noqa: E402
from test_trust import rewrite_header  # noqa: E402  (tests/ is on sys.path under pytest)

runner = CliRunner()
IDS = torch.tensor([[1, 5, 7, 3, 9, 2, 11, 4], [6, 0, 2, 8, 1, 3, 99, 12]])


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object):  # noqa: ANN201
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def assert_refused(result, match: str) -> None:  # noqa: ANN001
    """Exit 2, one ``error:`` line on stderr naming ``match``, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def _gpt2_config(**overrides: object) -> transformers.GPT2Config:
    kw = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**kw, **overrides})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config()).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def compressed(gpt2: tuple[torch.nn.Module, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``decompose`` of the GPT-2 directory (a ttcompress checkpoint recording ``hf:GPT2LMHeadModel``)."""
    out = tmp_path_factory.mktemp("tt") / "gpt2.tt.pt"
    ok("decompose", gpt2[1], "--tt-ranks", "4", "-o", out)
    return out


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_load_reads_a_directory_offline(gpt2):
    model, path = gpt2
    loaded = load_checkpoint(path)
    assert loaded.kind == "hf_dir" and type(loaded.model) is type(model)
    assert get_meta(loaded.model)["arch"]["name"] == "hf:GPT2LMHeadModel"
    assert torch.equal(_logits(loaded.model), _logits(model))
    with pytest.raises(ValueError, match="do not pass arch"):
        load(path, arch="seed-cnn")


def test_decompose_output_reloads_by_its_hf_arch(gpt2, compressed):
    header = read_header(compressed)
    assert header["arch"]["name"] == "hf:GPT2LMHeadModel" and header["arch"]["kwargs"]["conv1d_as_linear"]
    assert header["info"]["plan"] and header["layers"]
    again = ttcompress.compress(load(gpt2[1]), Plan.from_dict(header["info"]["plan"]))
    rebuilt = load(compressed)  # no arch, no trust flag: hf:CLASS is looked up in transformers' registry
    assert type(rebuilt.transformer.h[0].mlp.c_fc).__name__ == "TTLinear"
    torch.testing.assert_close(_logits(rebuilt), _logits(again), rtol=1e-5, atol=1e-5)


def test_every_command_takes_the_directory(gpt2, compressed, tmp_path):
    _, path = gpt2
    summary = json.loads(ok("inspect", path, "--json").stdout)
    assert summary["kind"] == "hf_dir" and summary["arch"]["name"] == "hf:GPT2LMHeadModel"
    assert "hf:GPT2LMHeadModel (gpt2 config)" in ok("inspect", path).stdout
    ok("decompose", path, "--tt-ranks", "2", "--layers", "transformer.h.0.*", "-o", tmp_path / "h0.tt.pt")
    assert set(read_header(tmp_path / "h0.tt.pt")["layers"]) >= {"transformer.h.0.mlp.c_fc"}
    ok("export", path, "--format", "hf", "-o", tmp_path / "dense")  # a dense directory round-trips too
    assert torch.equal(_logits(load(tmp_path / "dense")), _logits(gpt2[0]))


def test_export_hf_round_trips_the_compressed_model(compressed, tmp_path):
    out = tmp_path / "gpt2-tt"
    result = ok("export", compressed, "--format", "hf", "-o", out)
    assert "hf: " in result.stdout and "loads back" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.ttcompress.safetensors", "modeling_ttcompress.py",
                                                     "ttcompress.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    record = json.loads((out / "ttcompress.json").read_text())
    assert record["plan"] == read_header(compressed)["info"]["plan"]
    assert record["layers"]["transformer.h.0.mlp.c_fc"]["format"] == "tt"
    back, original = load(out), load(compressed)
    assert type(back.transformer.h[1].attn.c_attn) is type(original.transformer.h[1].attn.c_attn)
    torch.testing.assert_close(_logits(back), _logits(original), rtol=0, atol=0)
    # the written directory is itself an input: inspect it, and export it again
    assert json.loads(ok("inspect", out, "--json").stdout)["compressed"] is True
    assert_refused(invoke("export", compressed, "--format", "hf", "-o", out), "already exists")
    ok("export", compressed, "--format", "hf", "-o", out, "--overwrite")
    assert_refused(invoke("export", out, "--format", "hf", "-o", out, "--overwrite"), "must differ")
    assert_refused(invoke("export", compressed, "--format", "hf", "-o", tmp_path / "x", "--input-shape", "8"),
                   "do not apply to --format hf")


def _relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_compressed_directory_loads_in_transformers_only_with_trust_remote_code(compressed, tmp_path):
    """Without trust_remote_code every transformers route refuses the directory (never random
    weights); with it, transformers' own custom-code route builds the factorized model: same logits,
    generate() works. ttcompress.load reads the same directory as data."""
    out = tmp_path / "gpt2-tt"
    ok("export", compressed, "--format", "hf", "-o", out)
    original = load(compressed)
    want = _logits(original)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ttcompress_gpt2" and config["auto_map"]["AutoModelForCausalLM"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModel.from_pretrained(out, trust_remote_code=False)
    with pytest.raises(OSError, match="no file named model.safetensors"):  # the class itself finds no weights
        transformers.GPT2LMHeadModel.from_pretrained(out)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        remote = auto.from_pretrained(out, trust_remote_code=True).eval()
        assert isinstance(remote, transformers.GPT2LMHeadModel)
        assert type(remote.transformer.h[0].mlp.c_fc) is type(original.transformer.h[0].mlp.c_fc)
        assert _relative_diff(_logits(remote), want) <= 1e-5
    generated = remote.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 4)
    back = load(out)  # as data: the modeling file is not imported
    assert type(back) is transformers.GPT2LMHeadModel and _relative_diff(_logits(back), want) == 0
    # the model transformers built is a compressed model ttcompress can save
    save(remote, tmp_path / "again.tt.pt")
    assert _relative_diff(_logits(load(tmp_path / "again.tt.pt")), want) == 0


def test_compressed_directory_is_at_most_a_tenth_larger_than_the_checkpoint(tmp_path):
    """The directory holds the factors once (and small JSON): <= 1.1x the .tt.pt (a model of ~1 MB,
    where the few KB of config and modeling file are what they are for any real model)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config(n_embd=128, vocab_size=2000, n_positions=128)).eval()
    model = ttcompress.compress(model, Plan(tt=TTSettings(ranks=8)))
    save(model, tmp_path / "m.tt.pt")
    export_model(load(tmp_path / "m.tt.pt"), tmp_path / "dir", format="hf")
    size = sum(p.stat().st_size for p in (tmp_path / "dir").iterdir())
    assert size <= 1.1 * (tmp_path / "m.tt.pt").stat().st_size, (size, (tmp_path / "m.tt.pt").stat().st_size)


def test_loading_as_data_checks_the_layers_agree(compressed, tmp_path):
    out = tmp_path / "gpt2-tt"
    ok("export", compressed, "--format", "hf", "-o", out)
    config = json.loads((out / "config.json").read_text())
    config["ttcompress"]["layers"].pop("transformer.h.0.mlp.c_fc")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="differ"):
        load(out)


def test_export_hf_copies_the_source_directory_files(gpt2, tmp_path):
    src = _copy(gpt2[1], tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "README.md").write_text("a model card")
    (src / "custom.py").write_text("raise SystemExit")  # code is never copied
    ok("export", src, "--format", "hf", "-o", tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "README.md", "generation_config.json"} <= names and "custom.py" not in names
    assert (tmp_path / "out" / "generation_config.json").read_text() == (src / "generation_config.json").read_text()


def test_export_hf_refuses_other_models(tmp_path):
    cnn = tmp_path / "cnn.tt.pt"
    save(build_arch("seed-cnn"), cnn)
    out = tmp_path / "cnn-hf"
    assert_refused(invoke("export", cnn, "--format", "hf", "-o", out), "Hugging Face (transformers) models only")
    assert not out.exists()
    with pytest.raises(ExportError, match="transformers"):
        export_model(build_arch("seed-cnn"), out, format="hf")


def test_python_api_save_hf_dir_and_user_built_models(tmp_path):
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(_gpt2_config()).eval()  # built by the user: no ttcompress metadata
    small = ttcompress.compress(model, Plan(tt=TTSettings(ranks=4)))
    path = save(small, tmp_path / "mine.tt.pt")  # the architecture is known from the config: recorded
    assert read_header(path)["arch"]["name"] == "hf:GPT2LMHeadModel"
    torch.testing.assert_close(_logits(load(path)), _logits(small), rtol=1e-5, atol=1e-5)
    ttcompress.save_hf_dir(small, tmp_path / "mine", plan=Plan(tt=TTSettings(ranks=4)))
    with pytest.raises(ValueError, match="save_hf_dir"):
        save(small, tmp_path / "mine")  # save writes one file; it does not replace a directory
    torch.testing.assert_close(_logits(ttcompress.load(tmp_path / "mine")), _logits(small), rtol=0, atol=0)


BAD_DIRS = {
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    "no-config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "shapes": (lambda d: _edit_config(d, n_embd=48), "do not fit the config"),
    "auto-map": (lambda d: _edit_config(d, auto_map={"AutoModel": "evil.Model"}), "custom code (auto_map)"),
    "trust-remote-code": (lambda d: _edit_config(d, model_type="evil"), "unknown or missing model_type"),
}


def _edit_config(d: Path, **changes: object) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **changes}))


def test_vit_directory_in_the_stored_legacy_layout_loads(tmp_path):
    """transformers 5 saves (and every hub checkpoint holds) ViT under its old names
    (``encoder.layer.0.attention.attention.query``) and renames them on load: so does ttcompress."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(tmp_path / "vit")
    loaded = load(tmp_path / "vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_unavailable_attention_kernel_falls_back_to_sdpa(gpt2, tmp_path):
    """A config saved with flash_attention_2 (common after GPU training) loads on a machine without
    it: same weights, same logits, through PyTorch's sdpa, with a warning."""
    model, path = gpt2
    d = _copy(path, tmp_path / "fa2")
    _edit_config(d, attn_implementation="flash_attention_2")
    with pytest.warns(UserWarning, match="flash_attention_2.*sdpa"):
        loaded = load_checkpoint(d)
    torch.testing.assert_close(_logits(loaded.model), _logits(model), rtol=1e-5, atol=1e-5)


def test_directory_whose_config_claims_more_layers_than_tensors_is_refused_at_once(gpt2, tmp_path):
    """Refused by the count, before the skeleton is built (10^5 GPT-2 blocks took minutes)."""
    d = _copy(gpt2[1], tmp_path / "many")
    _edit_config(d, n_layer=100_000)
    with pytest.raises(CheckpointError, match="n_layer = 100000 layers, but the file holds only"):
        load(d)


@pytest.mark.parametrize("case", list(BAD_DIRS))
def test_bad_directories_are_one_line_errors(gpt2, tmp_path, case):
    mutate, match = BAD_DIRS[case]
    bad = _copy(gpt2[1], tmp_path / "bad")
    mutate(bad)
    with pytest.raises(CheckpointError, match=match.replace("(", r"\(").replace(")", r"\)")):
        load(bad)
    out = tmp_path / "out"
    for args in (["decompose", bad, "--tt-ranks", "4", "-o", out], ["export", bad, "--format", "hf", "-o", out]):
        assert_refused(invoke(*args), match)
        assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "report", "finetune", "sweep", "export"])
def test_every_command_refuses_a_directory_without_weights(gpt2, tmp_path, command):
    bad = _copy(gpt2[1], tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    out = tmp_path / ("out.json" if command == "report" else "out")
    args = {
        "inspect": ["inspect", bad],
        "report": ["report", bad, bad, "--data", "mnist-5k", "--no-latency", "-o", out],
        "finetune": ["finetune", bad, "--data", "mnist-5k", "-o", out],
        "sweep": ["sweep", bad, "--tt-ranks", "2", "--data", "mnist-5k", "-o", out],
        "export": ["export", bad, "--format", "hf", "-o", out],
    }[command]
    assert_refused(invoke(*args), "no weights")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_checkpoint_without_arch_points_to_arch(tmp_path):
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = save(ttcompress.compress(mlp, Plan(tt=TTSettings(ranks=2))), tmp_path / "mlp.tt.pt")
    with pytest.raises(ArchRequiredError, match="arch="):
        load(path)
    assert_refused(invoke("inspect", path), "--arch")


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda h: h["arch"].update(name="hf:os.system"), "not a transformers model class"),
    (lambda h: h["arch"]["kwargs"]["config"].update(auto_map={"AutoModel": "x.Y"}), "custom code (auto_map)"),
    (lambda h: h["arch"]["kwargs"]["config"].update(n_embd=64), "does not match the file"),
    (lambda h: h["arch"]["kwargs"]["config"].update(vocab_size=2**31), "does not match the file"),
    # a layer count far above the tensors present: refused before any module is built (it took
    # minutes of building at 10^5 layers)
    (lambda h: h["arch"]["kwargs"]["config"].update(n_layer=100_000), "n_layer = 100000 layers"),
])
def test_hf_arch_in_a_header_is_data(compressed, tmp_path, mutate, match):
    """An ``hf:`` record runs no code and sizes nothing before the file's tensors are compared."""
    bad = rewrite_header(compressed, tmp_path / "bad.tt.pt", mutate)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        load(bad)
    assert_refused(invoke("inspect", bad), match)


@pytest.mark.parametrize("how", [("--format", "dense"), ("--format", "hf", "--fold")])
def test_dense_export_of_a_compressed_transformers_model_is_a_plain_directory(compressed, tmp_path, how):
    """Merged back (Conv1D restored), the directory is GPT2LMHeadModel's own: from_pretrained loads
    every tensor with no warning, and the logits are the merged model's."""
    import logging

    from ttcompress.export import merge_to_dense

    out = tmp_path / "plain"
    result = ok("export", compressed, *how, "-o", out)
    assert "checked at batch sizes 1, 3" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "ttcompress.json"]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plain, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not [r for r in records if "LOAD REPORT" in r.getMessage() or "newly initialized" in r.getMessage()]
    merged = merge_to_dense(load(compressed))[0]
    assert _relative_diff(_logits(plain.eval()), _logits(merged)) <= 1e-5
    assert _relative_diff(_logits(plain), _logits(load(compressed))) <= 1e-3  # and near the compressed model
    assert_refused(invoke("export", compressed, *how, "-o", out), "already exists")
