"""Padding positions (``attention_mask == 0``) stay out of a Linear layer's calibration statistics:
a padded batch gives the statistics of its real tokens only."""

from __future__ import annotations

import copy

import pytest
import torch

from ttcompress.calibration.collector import StatsCollector
from ttcompress.calibration.stats import StatsAccumulator

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _close(a, b) -> None:  # noqa: ANN001
    for field in ("gram", "cross", "dense_gram", "mean", "dense_mean"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-9, atol=1e-9)
    assert (a.count, a.samples) == (b.count, b.samples)


@pytest.mark.parametrize("layer", ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_padded_and_unpadded_batches_give_the_same_statistics(layer: str) -> None:
    dense = _tiny_llama()
    work = copy.deepcopy(dense)
    with torch.no_grad():  # the layers before differ, so the two models' inputs differ (cross statistics)
        work.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 64, (1, 10), generator=gen), torch.randint(0, 64, (1, 6), generator=gen)
    # right padding of a causal model: the real tokens' hidden states do not see the padding
    padded = {"input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)]),
              "attention_mask": torch.cat([torch.ones(1, 10), torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1)]
                                          ).long()}
    unpadded = [{"input_ids": a, "attention_mask": torch.ones_like(a)},
                {"input_ids": b, "attention_mask": torch.ones_like(b)}]
    with_pads, _ = StatsCollector([padded], memory="1G").layer_stats(dense, work, layer)
    without, _ = StatsCollector(unpadded, memory="1G").layer_stats(dense, work, layer)
    assert with_pads is not None and without is not None
    assert with_pads.count == 16  # 10 + 6 real tokens, not 20 positions
    _close(with_pads, without)


def test_a_mask_leaves_out_exactly_its_zero_rows() -> None:
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    masked, reference = StatsAccumulator(layer), StatsAccumulator(layer)
    masked.update(x, x, mask=mask)
    reference.update(x[mask.bool()], x[mask.bool()])
    stats, ref = masked.finalize(), reference.finalize()
    torch.testing.assert_close(stats.gram, ref.gram)
    assert stats.count == 5 and stats.samples == 2
    whole = StatsAccumulator(layer)
    whole.update(x, x, mask=torch.ones(2, 4))  # an all-ones mask changes nothing
    plain = StatsAccumulator(layer)
    plain.update(x, x)
    torch.testing.assert_close(whole.finalize().gram, plain.finalize().gram)
