"""GPT-2 and BERT from small configs through surgery and a Hugging Face directory round-trip (issue 11 §4)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ttcompress.checkpoint import hf  # noqa: E402
from ttcompress.compression.plan import Plan, TTSettings  # noqa: E402
from ttcompress.compression.pipeline import compress_with_report  # noqa: E402


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=96, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("make", [_gpt2, _bert])
def test_small_hf_models_compress_run_and_round_trip(make, tmp_path) -> None:
    model = make()
    ids = torch.randint(0, 96, (2, 8))
    ref = model(input_ids=ids)[0]
    result = compress_with_report(model, Plan(tt=TTSettings(ranks=2)), check_input={"input_ids": ids})
    assert result.params_after < result.params_before
    assert len(result.compressed) >= 8
    rows = {r.name: r for r in result.records}
    if "lm_head" in rows:  # GPT-2: the output layer shares the token embedding
        assert rows["lm_head"].skipped.startswith("tied to")
        assert model.lm_head.weight is model.transformer.wte.weight
        assert rows["transformer.h.0.attn.c_attn"].format == "tt"  # Conv1D, linearized first
    out = result.model(input_ids=ids)[0]
    assert out.shape == ref.shape and bool(out.isfinite().all())
    path = hf.save_hf_dir(result.model, tmp_path / "model")
    loaded = hf.load_hf_dir(path)
    assert torch.allclose(loaded(input_ids=ids)[0], out, atol=1e-5)


def _vit() -> torch.nn.Module:
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=128)
    return transformers.ViTForImageClassification(cfg)


def _clip_vision() -> torch.nn.Module:
    cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=128)
    return transformers.CLIPVisionModel(cfg)


def _clip_text() -> torch.nn.Module:
    # CLIPTextEmbeddings reads position_embedding.weight.shape
    cfg = transformers.CLIPTextConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64)
    return transformers.CLIPTextModel(cfg)


def _t5() -> torch.nn.Module:
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    return transformers.T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize(("make", "inputs"), [
    (_vit, lambda: {"pixel_values": torch.randn(1, 3, 32, 32)}),
    (_clip_vision, lambda: {"pixel_values": torch.randn(1, 3, 32, 32)}),
    (_clip_text, lambda: {"input_ids": torch.randint(0, 128, (1, 8))}),
    (_t5, lambda: {"input_ids": torch.randint(0, 128, (1, 8)), "decoder_input_ids": torch.randint(0, 128, (1, 4))}),
], ids=["vit", "clip-vision", "clip-text", "t5"])
def test_models_that_read_a_layers_weight_still_run(make, inputs) -> None:
    """ViT/CLIP patch embeddings read ``projection.weight.dtype`` and T5 reads ``wo.weight.dtype``:
    after surgery with the default plan (no check input) they run, and train."""
    torch.manual_seed(0)
    plan = Plan.from_dict({"formats": ["tt", "cp", "tt_embedding"]}) if make is _clip_text else Plan()
    model = compress_with_report(make(), plan).model
    assert any(type(m).__name__ in ("CPConv2d", "TTLinear") for m in model.modules())
    if make is _clip_text:
        assert any(type(m).__name__ == "TTEmbedding" for m in model.modules())
    out = model(**inputs())
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()


def test_target_ratio_leaves_tied_layers_out_of_the_budget() -> None:
    """GPT-2's lm_head is tied to wte: both stay dense, and the target is reached with the other
    layers instead of being missed by the share the allocation had given them."""
    model = _gpt2()
    result = compress_with_report(model, Plan(target_ratio=3.0))
    rows = {r.name: r for r in result.records}
    assert rows["lm_head"].format == "dense" and "tied to" in (rows["lm_head"].skipped or "")
    assert rows["transformer.wte"].format == "dense" and "tied to" in (rows["transformer.wte"].skipped or "")
    assert result.params_before / result.params_after == pytest.approx(3.0, rel=0.02)


@pytest.mark.parametrize("plan", [Plan(), Plan(target_ratio=3.0)], ids=["default", "target-3x"])
@pytest.mark.parametrize("make", ["gpt2", "mha"])
def test_dry_run_projects_what_compress_does(plan: Plan, make: str) -> None:
    """The preview sees the structure compression puts in place (GPT-2's Conv1D as Linear, attention
    split into projections) and its guards (tied layers dense): same layers, same parameters."""
    from ttcompress.compression.dryrun import preview_plan

    def build() -> torch.nn.Module:
        if make == "gpt2":
            return _gpt2()
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True),
                                   torch.nn.Linear(64, 64))

    preview = preview_plan(build(), plan)
    result = compress_with_report(build(), plan)
    assert preview.params_after == result.params_after
    compressed = {r.name for r in result.records if r.format != "dense"}
    assert {p.decision.name for p in preview.layers if p.decision.format != "dense"} == compressed


def test_inspect_lists_what_decompose_compresses() -> None:
    """inspect (summarize) sees attention's projections and GPT-2's Conv1D layers as Linear layers,
    and marks the tied ones as staying dense: its compressible rows are decompose's layers."""
    from ttcompress.compression.summary import summarize

    torch.manual_seed(0)
    mha_model = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True))
    for model in (mha_model, _gpt2()):
        summary = summarize(model)
        compressible = {r.name for r in summary.layers if r.skipped is None}
        result = compress_with_report(model, Plan())
        assert compressible == {r.name for r in result.records if r.format != "dense"}
        assert summary.other_params < 0.1 * summary.total_params  # the attention weights are in rows
