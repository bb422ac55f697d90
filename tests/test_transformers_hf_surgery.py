"""GPT-2 and BERT from small configs through surgery and a Hugging Face directory round-trip (issue 11 §4)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ttcompress import hf  # noqa: E402
from ttcompress.plan import Plan, TTSettings  # noqa: E402
from ttcompress.surgery import compress_with_report  # noqa: E402


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
