"""TTEmbedding: row lookup equals the dense table, padding_idx, gradients, config, unsupported options."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ttcompress.layers.tt_embedding as module
from ttcompress.decompose.tt import tt_to_matrix
from ttcompress.layers.tt_embedding import TTEmbedding, tt_rows, unsupported_reason


def _embedding(num: int, dim: int, *, padding_idx: int | None = None, dtype=torch.float64,
               seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(num, dim, padding_idx=padding_idx, dtype=dtype)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(("num", "dim"), [(1000, 64), (97, 13), (30, 8), (1, 5), (5000, 16)])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 2)])
def test_full_rank_lookup_equals_nn_embedding(num: int, dim: int, shape) -> None:
    emb = _embedding(num, dim)
    layer = TTEmbedding.from_embedding(emb, ranks=10**6)
    idx = torch.randint(0, num, shape)
    idx.view(-1)[0] = num - 1  # the last row (next to any vocabulary padding)
    out = layer(idx)
    assert out.shape == (*shape, dim) and out.dtype == torch.float64
    torch.testing.assert_close(out, emb(idx), atol=1e-10, rtol=0)
    assert layer.rel_error is not None and layer.rel_error <= 1e-12
    torch.testing.assert_close(layer.to_embedding().weight, emb.weight, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("vocab_modes", "dim_modes"), [((10, 10, 10), (4, 4, 4)), ((25, 40), (8, 8)),
                                                        ((8, 8, 16), (2, 4, 8))])  # the last one pads
def test_explicit_modes_and_padding(vocab_modes, dim_modes) -> None:
    emb = _embedding(1000, 64 if dim_modes != (2, 4, 8) else 60)
    layer = TTEmbedding.from_embedding(emb, ranks=10**6, vocab_modes=vocab_modes, dim_modes=dim_modes)
    assert (layer.vocab_modes, layer.dim_modes) == (vocab_modes, dim_modes)
    idx = torch.arange(1000)
    torch.testing.assert_close(layer(idx), emb.weight, atol=1e-10, rtol=0)


def test_float32_full_rank() -> None:
    emb = _embedding(500, 32, dtype=torch.float32)
    layer = TTEmbedding.from_embedding(emb, ranks=10**6)
    idx = torch.randint(0, 500, (4, 9))
    torch.testing.assert_close(layer(idx), emb(idx), atol=1e-5, rtol=0)


def test_low_rank_lookup_equals_its_dense_table_and_error_bound() -> None:
    emb = _embedding(1000, 64)
    layer = TTEmbedding.from_embedding(emb, eps=0.5)
    assert layer.compression_ratio > 1
    table = layer.dense_weight().detach()
    w = emb.weight.detach()
    err = float(torch.linalg.matrix_norm(table - w) / torch.linalg.matrix_norm(w))
    assert err <= 0.5 and err == pytest.approx(layer.rel_error, rel=1e-9)
    idx = torch.randint(0, 1000, (5, 6))
    torch.testing.assert_close(layer(idx), table[idx], atol=1e-12, rtol=0)


def test_tt_rows_matches_matrix_rows() -> None:
    torch.manual_seed(0)
    ranks = (1, 3, 2, 1)
    modes = ((4, 2), (3, 5), (2, 3))  # (row mode, column mode) per core
    cores = [torch.randn(ranks[k], m, n, ranks[k + 1], dtype=torch.float64) for k, (m, n) in enumerate(modes)]
    full = tt_to_matrix(cores)
    idx = torch.tensor([0, 23, 5, 5, 17])
    torch.testing.assert_close(tt_rows(cores, idx, (4, 3, 2)), full[idx], atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_every_split_of_the_cores_gives_the_table_rows(monkeypatch, d: int) -> None:
    torch.manual_seed(0)
    layer = TTEmbedding(360, 24, ranks=3, d=d, dtype=torch.float64)
    table = tt_to_matrix(list(layer.cores)).detach()
    idx = torch.tensor([0, 359, 17, 17, 200, 5])
    for split in range(1, max(d, 2)):
        monkeypatch.setattr(module, "_split_cost", lambda cores, modes, s, count, split=split: abs(s - split))
        got = tt_rows(list(layer.cores), idx, layer.vocab_modes).detach()
        torch.testing.assert_close(got, table[idx], atol=1e-12, rtol=0)


def test_lookup_does_not_build_the_table(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the forward built the full table")

    monkeypatch.setattr(module, "tt_to_matrix", fail)
    layer = TTEmbedding(10**6, 64, ranks=4)  # a 64M-entry table: building it would be slow
    assert layer(torch.tensor([[0, 999_999], [12345, 3]])).shape == (2, 2, 64)


# ---------------------------------------------------------------------------- padding_idx
@pytest.mark.parametrize("padding_idx", [0, 7, -1])
def test_padding_idx_row_is_zero_and_gets_no_gradient(padding_idx: int) -> None:
    emb = _embedding(50, 12, padding_idx=padding_idx)
    layer = TTEmbedding.from_embedding(emb, ranks=3)  # low rank: the TT row itself is not zero
    pad = padding_idx % 50
    assert layer.padding_idx == pad
    assert float(tt_to_matrix(list(layer.cores))[pad, :12].detach().abs().max()) > 1e-6
    idx = torch.tensor([[pad, 1, pad], [2, pad, 3]])
    out = layer(idx)
    assert torch.equal(out[idx == pad], torch.zeros(3, 12, dtype=torch.float64))
    assert bool((out[idx != pad] != 0).all())

    # Only padding indices: no gradient reaches the cores, as nn.Embedding leaves its padding row.
    only_pad = layer(torch.full((4,), pad))
    only_pad.sum().backward()
    assert all(core.grad is None or not core.grad.any() for core in layer.cores)
    # Full rank: the same outputs as nn.Embedding, and a dense round trip with a zero padding row.
    exact = TTEmbedding.from_embedding(emb, ranks=10**6)
    torch.testing.assert_close(exact(idx), emb(idx), atol=1e-10, rtol=0)
    back = exact.to_embedding()
    assert back.padding_idx == pad and not back.weight[pad].any()


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    layer = TTEmbedding(24, 6, ranks=2, vocab_modes=(4, 6), dim_modes=(2, 3), padding_idx=5, dtype=torch.float64)
    idx = torch.tensor([[0, 5, 23], [7, 7, 11]])
    params = tuple(layer.cores)

    def lookup(*cores):
        return tt_rows(list(cores), idx.reshape(-1), layer.vocab_modes)

    assert torch.autograd.gradcheck(lookup, params)
    for p in params:
        p.grad = None
    layer(idx).square().sum().backward()
    grads = [p.grad.clone() for p in params]
    # Reference: the same loss through the dense table built from the cores.
    for p in params:
        p.grad = None
    layer.dense_weight()[idx].square().sum().backward()
    for got, p in zip(grads, params):
        torch.testing.assert_close(got, p.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- construction
def test_config_is_json_and_rebuilds_structure() -> None:
    emb = _embedding(300, 20, padding_idx=3)
    layer = TTEmbedding.from_embedding(emb, ranks=4)
    config = json.loads(json.dumps(layer.config()))
    rebuilt = TTEmbedding(**config, dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())
    idx = torch.randint(0, 300, (10,))
    torch.testing.assert_close(rebuilt(idx), layer(idx), atol=0, rtol=0)
    assert rebuilt.ranks == layer.ranks and rebuilt.padding_idx == 3


def test_from_embedding_keeps_mode_and_frozen_table() -> None:
    emb = _embedding(40, 8).eval()
    emb.weight.requires_grad_(False)
    layer = TTEmbedding.from_embedding(emb, ranks=2)
    assert not layer.training and not any(p.requires_grad for p in layer.parameters())


def test_init_matches_nn_embedding_variance() -> None:
    torch.manual_seed(0)
    layer = TTEmbedding(4096, 256, ranks=8)
    var = float(layer.dense_weight().detach().var())
    assert 0.7 < var < 1.3


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [(dict(max_norm=1.0), "max_norm"), (dict(sparse=True), "sparse"), (dict(scale_grad_by_freq=True), "scale_grad")],
)
def test_unsupported_options_stay_dense(kwargs, reason) -> None:
    emb = nn.Embedding(10, 4, **kwargs)
    assert reason in unsupported_reason(emb)
    with pytest.raises(ValueError, match=reason):
        TTEmbedding.from_embedding(emb, ranks=2)


def test_other_unsupported_reasons() -> None:
    assert unsupported_reason(nn.Embedding(10, 4, padding_idx=2)) is None
    nonzero = nn.Embedding(10, 4, padding_idx=2)
    with torch.no_grad():
        nonzero.weight[2] = 1.0
    assert "padding_idx=2" in unsupported_reason(nonzero)
    assert "not torch.nn.Embedding" in unsupported_reason(nn.EmbeddingBag(10, 4))
    with pytest.raises(TypeError, match="embedding"):
        TTEmbedding.from_embedding(nn.Linear(3, 3), ranks=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_embeddings=0, embedding_dim=4, ranks=2), ValueError, "num_embeddings"),
        (dict(num_embeddings=10, embedding_dim=4.0, ranks=2), TypeError, "embedding_dim"),
        (dict(num_embeddings=10, embedding_dim=4, ranks=None), ValueError, "ranks"),
        (dict(num_embeddings=10, embedding_dim=4, ranks=2, padding_idx=10), ValueError, "padding_idx"),
        (dict(num_embeddings=100, embedding_dim=4, ranks=2, vocab_modes=(3, 3)), ValueError, "vocab_modes"),
        (dict(num_embeddings=100, embedding_dim=4, ranks=2, vocab_modes=(10, 10), dim_modes=(2, 2, 1)),
         ValueError, "same length"),
    ],
)
def test_constructor_validates(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        TTEmbedding(**kwargs)


def test_forward_validates_indices() -> None:
    layer = TTEmbedding(10, 4, ranks=2)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        layer(torch.tensor([0, 10]))
    with pytest.raises(IndexError):
        layer(torch.tensor([-1]))
    with pytest.raises(TypeError, match="indices"):
        layer(torch.tensor([0.0]))
    assert layer(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 4)
    assert layer(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 4)
