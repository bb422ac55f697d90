"""A sharded Llama-style directory is compressed one transformer block at a time: the same layers
and outputs as compressing the whole model, one shard open and one block in memory at a time, a
sharded directory written; bad directories are refused before anything is written."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from ttcompress.checkpoint.io import load  # noqa: E402
from ttcompress.cli import app  # noqa: E402
from ttcompress.compression import blockwise  # noqa: E402
from ttcompress.compression.plan import Plan  # noqa: E402
from ttcompress.compression.pipeline import compress_with_report  # noqa: E402

from tests.test_hf_shards import _Tracked  # noqa: E402

VOCAB = 64


def _save_llama(path: Path, *, tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="20KB")
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 4
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded sample
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blockwise") / "llama"
    _save_llama(path)
    return path


@pytest.mark.parametrize("calibrated", [False, True], ids=["data-free", "calibrated"])
@pytest.mark.parametrize("plan", [{}, {"formats": ["svd"], "tt": {"ranks": 4}, "svd": {"rank": 6}}],
                         ids=["default", "svd"])
def test_block_by_block_equals_the_whole_model(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               calibrated: bool, plan: dict) -> None:
    the_plan = Plan.from_dict(plan)
    calib = [_batch()] if calibrated else None
    real_open, real_load = safetensors.safe_open, blockwise._load_block
    monkeypatch.setattr(safetensors, "safe_open", lambda path, **kw: _Tracked(real_open, path, **kw))
    _Tracked.open_now = _Tracked.most = 0
    _Tracked.opened = []
    blocks: list[weakref.ref] = []
    resident: list[int] = []

    def load_block(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        resident.append(sum(r() is not None for r in blocks))  # blocks still in memory when the next loads
        block = real_load(*args, **kwargs)
        blocks.append(weakref.ref(block))
        return block

    monkeypatch.setattr(blockwise, "_load_block", load_block)
    result = blockwise.compress_sharded(llama_dir, tmp_path / "out", plan=the_plan, calib_data=calib)
    monkeypatch.undo()
    assert _Tracked.most == 1 and _Tracked.open_now == 0  # never two shards open at once
    assert resident == [0, 0, 0] and len(blocks) == 3  # one block in memory at a time
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.ttcompress.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # one shard per block, one for the rest

    whole = compress_with_report(load(llama_dir), the_plan, calib_data=calib)
    ours = {r.name: (r.format, r.params_after, r.skipped is None) for r in result.records}
    theirs = {r.name: (r.format, r.params_after, r.skipped is None) for r in whole.records}
    assert ours == theirs and any(f != "dense" for f, _p, _s in ours.values())
    assert result.params_after == whole.params_after
    back = load(out)
    assert {type(m).__name__ for m in back.modules()} == {type(m).__name__ for m in whole.model.modules()}
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, whole.model(**batch).logits, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_stay_tied_and_dense(tmp_path: Path) -> None:
    _save_llama(tmp_path / "tied", tied=True)
    result = blockwise.compress_sharded(tmp_path / "tied", tmp_path / "out", plan=Plan(), calib_data=[_batch()])
    whole = compress_with_report(load(tmp_path / "tied"), Plan(), calib_data=[_batch()])
    assert {r.name: r.format for r in result.records} == {r.name: r.format for r in whole.records}
    back = load(tmp_path / "out")
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, whole.model(**batch).logits, rtol=1e-4, atol=1e-5)


def test_the_cli_writes_a_sharded_directory_that_generates(llama_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["decompose", str(llama_dir), "-o", str(tmp_path / "small"), "--no-calib"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    record = json.loads((tmp_path / "small" / "ttcompress.json").read_text())
    assert record["info"]["blockwise"] and record["layers"]
    model = load(tmp_path / "small")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def _refused(args: list[str], dest: Path) -> str:
    res = CliRunner().invoke(app, ["decompose", *args, "-o", str(dest), "--no-calib"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not dest.exists() and not list(dest.parent.glob(f".{dest.name}*"))
    return res.output


def test_a_missing_shard_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    _save_llama(tmp_path / "llama")
    shard = sorted((tmp_path / "llama").glob("model-*.safetensors"))[1]
    shard.unlink()
    assert "missing" in _refused([str(tmp_path / "llama")], tmp_path / "out")


def test_shapes_that_disagree_with_the_config_are_refused(tmp_path: Path) -> None:
    _save_llama(tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    assert "do not fit the config" in _refused([str(tmp_path / "llama")], tmp_path / "out")


def test_an_existing_output_directory_needs_overwrite(llama_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "small"
    dest.mkdir()
    res = CliRunner().invoke(app, ["decompose", str(llama_dir), "-o", str(dest), "--no-calib"])
    assert res.exit_code == 2 and "--overwrite" in res.output and not any(dest.iterdir())
    res = CliRunner().invoke(app, ["decompose", str(llama_dir), "-o", str(dest), "--no-calib", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (dest / "model.safetensors.index.ttcompress.json").is_file()


# --------------------------------------------------------------------------------------------------
# dry run and inspect one block at a time; one rank allocation over the whole model
# --------------------------------------------------------------------------------------------------
class _OneBlockAtATime:
    """Counts the shards open at once and the blocks still in memory when the next one loads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_load = safetensors.safe_open, blockwise._load_block
        monkeypatch.setattr(safetensors, "safe_open", lambda path, **kw: _Tracked(real_open, path, **kw))
        _Tracked.open_now = _Tracked.most = 0
        _Tracked.opened = []
        self.blocks: list[weakref.ref] = []
        self.resident: list[int] = []

        def load_block(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.resident.append(sum(r() is not None for r in self.blocks))
            block = real_load(*args, **kwargs)
            self.blocks.append(weakref.ref(block))
            return block

        monkeypatch.setattr(blockwise, "_load_block", load_block)

    def check(self, loads: int) -> None:
        assert _Tracked.most == 1 and _Tracked.open_now == 0  # never two shards open at once
        assert self.resident == [0] * loads  # never two blocks in memory at once


_PLANS = {"default": {}, "svd": {"formats": ["svd"], "svd": {"rank": 6}},
          "one-block": {"layers": ["model.layers.0.*"]}, "ratio": {"target_ratio": 2.5}}


@pytest.mark.parametrize("plan", list(_PLANS.values()), ids=list(_PLANS))
def test_the_dry_run_reads_one_block_at_a_time_and_agrees_with_the_run(
        llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan: dict) -> None:
    from ttcompress.compression.blockwise_preview import preview_sharded
    from ttcompress.compression.dryrun import preview_plan

    the_plan = Plan.from_dict(plan)
    tracker = _OneBlockAtATime(monkeypatch)
    preview = preview_sharded(llama_dir, the_plan)
    tracker.check(3 if the_plan.target_ratio is None else 6)  # a target ratio reads the blocks twice
    monkeypatch.undo()
    assert preview.to_dict() == preview_plan(load(llama_dir), the_plan).to_dict()  # as the whole model's

    result = blockwise.compress_sharded(llama_dir, tmp_path / "out", plan=the_plan)
    shown = {lp.decision.name: (lp.format, lp.params_after) for lp in preview.layers}
    done = {r.name: (r.format, r.params_after) for r in result.records}
    assert shown == done and any(f != "dense" for f, _p in done.values())
    assert (preview.params_before, preview.params_after) == (result.params_before, result.params_after)


def test_the_cli_dry_run_and_inspect_of_a_sharded_directory(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ttcompress.compression.summary import inspect_file

    tracker = _OneBlockAtATime(monkeypatch)
    res = CliRunner().invoke(app, ["decompose", str(llama_dir), "--dry-run", "--json", "--target-ratio", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):res.output.rindex("}") + 1])["ratio"] >= 2
    res = CliRunner().invoke(app, ["inspect", str(llama_dir), "--json", "--layers", "model.layers.2.*"])
    assert res.exit_code == 0, res.output
    tracker.check(9)  # dry run: 2 passes, inspect: 1
    monkeypatch.undo()
    shown = json.loads(res.output)
    assert shown == json.loads(json.dumps(inspect_file(llama_dir, plan=Plan(layers=("model.layers.2.*",))).to_dict()))
    res = CliRunner().invoke(app, ["inspect", str(llama_dir), "--layers", "model.nothing.*"])
    assert res.exit_code == 2 and "matches no layer" in res.output


def _save_uneven_llama(path: Path) -> None:
    """The tiny Llama with block 1's projections of rank 2: the blocks' spectra differ, so one
    allocation over the whole model is not the per-block one."""
    model = _save_llama(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.1.") and p.dim() == 2:
                u, s, vh = torch.linalg.svd(p, full_matrices=False)
                p.copy_((u[:, :2] * s[:2]) @ vh[:2])
    model.save_pretrained(path, max_shard_size="20KB")


def test_a_data_free_target_ratio_is_one_allocation_over_the_whole_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save_uneven_llama(tmp_path / "llama")
    plan = Plan(target_ratio=3.0)
    tracker = _OneBlockAtATime(monkeypatch)
    result = blockwise.compress_sharded(tmp_path / "llama", tmp_path / "out", plan=plan)
    tracker.check(6)  # the ladders, then the build: one block at a time in both passes
    monkeypatch.undo()
    assert 3.0 <= result.ratio <= 3.0 * 1.1  # the whole model at the target (the greedy stops within a step)

    whole = compress_with_report(load(tmp_path / "llama"), plan)
    ours = {r.name: (r.format, r.params_after, r.ranks) for r in result.records}
    assert ours == {r.name: (r.format, r.params_after, r.ranks) for r in whole.records}
    blocks = [sum(r.params_after for r in result.records if r.name.startswith(f"model.layers.{i}."))
              for i in range(3)]
    assert blocks[1] < min(blocks[0], blocks[2])  # the budget went where the spectra need it

    per_block = [compress_with_report(_block_of(load(tmp_path / "llama"), i), plan).params_after for i in range(3)]
    assert per_block[1] > blocks[1]  # at 3x per block, the rank-2 block would have kept more


def _block_of(model: torch.nn.Module, index: int) -> torch.nn.Module:
    return torch.nn.ModuleDict({"block": model.model.layers[index]})


def test_a_calibrated_target_ratio_says_it_is_met_block_by_block(llama_dir: Path, tmp_path: Path) -> None:
    torch.save(_batch(), tmp_path / "calib.pt")
    res = CliRunner().invoke(app, ["decompose", str(llama_dir), "-o", str(tmp_path / "small"), "--target-ratio", "2",
                                   "--data", f"tensors:{tmp_path / 'calib.pt'}"])
    assert res.exit_code == 0, res.output
    assert "met block by block" in res.output
