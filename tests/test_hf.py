"""Hugging Face directories offline (ttcompress.checkpoint.hf): load, save, Conv1D, tied parameters, refusals."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from ttcompress import Plan, TTLinear, TTSettings, compress  # noqa: E402
from ttcompress.errors import CheckpointError, OutputExistsError, UnsafePickleError  # noqa: E402
from ttcompress.checkpoint.hf import (  # noqa: E402
    build_hf_model,
    conv1d_to_linear,
    is_hf_dir,
    linearize_conv1d,
    load_hf_dir,
    save_hf_dir,
    tied_parameters,
)

IDS = torch.tensor([[1, 5, 7, 3, 9, 2, 11, 4], [6, 0, 2, 8, 1, 3, 99, 12]])


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for name, build in (("gpt2", _gpt2), ("bert", _bert)):
        model = build()
        model.save_pretrained(root / name, safe_serialization=True)
        made[name] = (model, root / name)
    return made


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_load_hf_dir_matches_the_original(dirs, name):
    model, path = dirs[name]
    assert is_hf_dir(path)
    loaded = load_hf_dir(path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(_out(loaded), _out(model))
    arch = loaded.ttcompress_meta["arch"]
    assert arch["name"] == f"hf:{type(model).__name__}"
    rebuilt = build_hf_model(arch["name"][3:], **arch["kwargs"])
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_sharded_and_prefixless_layouts(dirs, tmp_path):
    model, src = dirs["gpt2"]
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists() and is_hf_dir(tmp_path / "sharded")
    assert torch.equal(_out(load_hf_dir(tmp_path / "sharded")), _out(model))
    # The hub's GPT-2 files: base-model names (no "transformer.") plus old causal-mask buffers.
    bare = _copy_dir(src, tmp_path / "bare")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(bare / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(tensors, str(bare / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(_out(load_hf_dir(bare)), _out(model))


def test_tied_parameters_found_and_kept_through_load(dirs):
    model, path = dirs["gpt2"]
    assert tied_parameters(model) == {"transformer.wte.weight": ["lm_head.weight"]}
    assert "lm_head.weight" not in load_file(path / "model.safetensors")  # save_pretrained stores it once
    loaded = load_hf_dir(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert tied_parameters(dirs["bert"][0]) == {}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_save_hf_dir_round_trip_and_overwrite(dirs, tmp_path, name):
    model, _ = dirs[name]
    out = save_hf_dir(model, tmp_path / "m")
    generates = ["generation_config.json"] if name == "gpt2" else []  # as save_pretrained writes it
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", "ttcompress.json",
                                                            *generates])
    assert torch.equal(_out(load_hf_dir(out)), _out(model))
    # A dense directory we write is a plain Hugging Face directory.
    plain = type(model).from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
    assert torch.equal(_out(plain), _out(model))
    with pytest.raises(OutputExistsError):
        save_hf_dir(model, out)
    save_hf_dir(model, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_conv1d_linearization_is_exact_and_compresses(dirs, tmp_path):
    model, _ = dirs["gpt2"]
    ref = _out(model)
    lin = copy.deepcopy(model)
    conv = lin.transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, 32)
    assert torch.allclose(conv1d_to_linear(conv)(x), conv(x), atol=1e-6, rtol=0)
    names = linearize_conv1d(lin)
    assert len(names) == 8 and not any(isinstance(m, transformers.pytorch_utils.Conv1D) for m in lin.modules())
    assert (_out(lin) - ref).abs().max() < 1e-6

    # Weights of exact TT rank 2: compression at rank 2 reproduces the dense output.
    plan = Plan(tt=TTSettings(ranks=2), exclude=("*.wte", "*.wpe"))  # Linear layers only (embeddings are compressed by default)
    projected = compress(copy.deepcopy(lin), plan)
    with torch.no_grad():
        for name, module in projected.named_modules():
            if isinstance(module, TTLinear):
                lin.get_submodule(name).weight.copy_(module.dense_weight())
    dense = _out(lin)
    compressed = compress(lin, plan)
    assert sum(isinstance(m, TTLinear) for m in compressed.modules()) >= 8
    assert (_out(compressed) - dense).abs().max() < 1e-4

    # The compressed model round-trips through a directory, with its plan recorded.
    out = save_hf_dir(compressed, tmp_path / "c", plan=plan)
    record = json.loads((out / "ttcompress.json").read_text())
    assert record["plan"] == plan.to_dict() and record["arch"]["kwargs"] == {"conv1d_as_linear": True}
    again = load_hf_dir(out)
    assert set(again.ttcompress_meta["layers"]) == set(record["layers"])
    assert torch.equal(_out(again), _out(compressed))


def test_bert_compresses_at_low_rank_and_runs(dirs):
    model, _ = dirs["bert"]
    small = compress(copy.deepcopy(model), Plan(tt=TTSettings(ranks=2)))
    assert sum(isinstance(m, TTLinear) for m in small.modules()) > 0
    out = _out(small)
    assert torch.isfinite(out).all() and not torch.allclose(out, _out(model))


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_refusals(dirs, tmp_path):
    _, src = dirs["gpt2"]
    custom = _copy_dir(src, tmp_path / "custom")
    _edit_config(custom, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    with pytest.raises(CheckpointError, match="auto_map"):
        load_hf_dir(custom)
    with pytest.raises(CheckpointError, match="auto_map"):
        build_hf_model("GPT2LMHeadModel", json.loads((custom / "config.json").read_text()))

    bigger = _copy_dir(src, tmp_path / "bigger")
    _edit_config(bigger, n_embd=1 << 20, vocab_size=1 << 20)  # would be TBs if allocated
    with pytest.raises(CheckpointError, match=r"do not fit the config: .*wrong shape"):
        load_hf_dir(bigger)

    empty = _copy_dir(src, tmp_path / "noweights")
    (empty / "model.safetensors").unlink()
    assert not is_hf_dir(empty)
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf_dir(empty)

    broken = _copy_dir(src, tmp_path / "badconfig")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid config.json"):
        load_hf_dir(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_dir(broken)

    partial = _copy_dir(src, tmp_path / "partial")
    tensors = load_file(partial / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): transformer.h.1.mlp.c_fc.weight"):
        load_hf_dir(partial)

    with pytest.raises(CheckpointError, match="not a transformers model class"):
        build_hf_model("os.system", json.loads((src / "config.json").read_text()))


def test_pickle_only_directory_needs_trust_pickle(dirs, tmp_path):
    model, src = dirs["bert"]
    pkl = _copy_dir(src, tmp_path / "pkl")
    (pkl / "model.safetensors").unlink()
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError, match="trust_pickle"):
        load_hf_dir(pkl)
    assert torch.equal(_out(load_hf_dir(pkl, trust_pickle=True)), _out(model))
