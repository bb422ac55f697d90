"""Language models end to end: ``text:`` data, attention masks and keyword inputs, perplexity,
sequence distillation.

A tiny word-level ``tokenizer.json`` built here with the ``tokenizers`` package, saved beside a
tiny GPT-2 built from a config (never the hub).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ttcompress.cli import app  # noqa: E402
from ttcompress.data import load_dataset  # noqa: E402
from ttcompress.data.text import TextDataset, read_documents  # noqa: E402
from ttcompress.errors import DataError  # noqa: E402
from ttcompress.report.evaluation import distill_loss  # noqa: E402

runner = CliRunner()
WORDS = "the quick brown fox jumps over the lazy dog and a cat sat on the mat while birds sing".split()


def run(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object):  # noqa: ANN201
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def refused(*args: object, says: str) -> str:
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert says in lines[0], lines[0]
    return lines[0]


def _tokenizer(text: str) -> "tokenizers.Tokenizer":
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    return tok


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lm/``: a tiny GPT-2 with its ``tokenizer.json``; ``corpus.txt``: 3,000 words of text;
    ``bare/``: the same model without a tokenizer."""
    root = tmp_path_factory.mktemp("text")
    gen = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=gen).tolist())
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = _tokenizer(text)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.get_vocab_size(), n_positions=64,
                                     bos_token_id=1, eos_token_id=1)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(root / "lm")
    model.save_pretrained(root / "bare")
    tok.save(str(root / "lm" / "tokenizer.json"))
    return root


# ----------------------------------------------------------------------------------- text data


def test_text_is_tokenized_packed_and_split(lm: Path) -> None:
    bundle = load_dataset(f"text:{lm / 'corpus.txt'}", tokenizer=lm / "lm", seq_len=50)
    tok = tokenizers.Tokenizer.from_file(str(lm / "lm" / "tokenizer.json"))
    ids = tok.encode((lm / "corpus.txt").read_text(), add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")]
    n = len(ids) // 50
    assert len(bundle.train) + len(bundle.test) == n == 60 and len(bundle.test) == 6  # 90/10, the tail dropped
    assert bundle.input_shape == (50,) and bundle.targets == "tokens" and bundle.num_classes is None
    packed = torch.tensor(ids[: n * 50]).view(n, 50)
    rows = sorted(bundle.train.indices + bundle.test.indices)
    assert rows == list(range(n))
    inputs, labels = bundle.test[0]
    assert torch.equal(inputs["input_ids"], packed[bundle.test.indices[0]])
    assert torch.equal(inputs["attention_mask"], torch.ones(50, dtype=torch.int64))
    assert torch.equal(labels, inputs["input_ids"])
    again = load_dataset(f"text:{lm / 'corpus.txt'}", tokenizer=lm / "lm", seq_len=50)
    assert again.test.indices == bundle.test.indices  # seeded split
    # the default length: the context of the model's config.json (64), at most 512
    assert load_dataset(f"text:{lm / 'corpus.txt'}", tokenizer=lm / "lm").input_shape == (64,)


def test_json_lines_and_directories(lm: Path, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "the fox"}\n\n{"text": "a cat", "id": 2}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("the dog", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("never read", encoding="utf-8")
    assert read_documents(tmp_path) == ["the fox", "a cat", "the dog"]
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="no string 'text' field"):
        read_documents(tmp_path)


def test_labels_leave_out_padding() -> None:
    ids = torch.arange(6).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    _, labels = TextDataset(ids, mask)[0]
    assert labels.tolist() == [0, 1, -100]


@pytest.mark.parametrize(("args", "says"), [
    (("--data", "text:{root}/corpus.txt"), "no tokenizer.json in"),
    (("--data", "text:{root}/empty.txt", "--tokenizer", "{root}/lm"), "holds no text"),
    (("--data", "text:{root}/corpus.txt", "--tokenizer", "{root}/lm", "--seq-len", "0"), "--seq-len must be a positive"),
    (("--data", "text:{root}/corpus.txt", "--tokenizer", "{root}/lm", "--seq-len", "5000"), "fewer than 2 sequences"),
    (("--data", "mnist-5k", "--seq-len", "8"), "--seq-len applies to text"),
])  # fmt: skip
def test_bad_text_input_is_one_line_and_writes_nothing(lm: Path, tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    (lm / "empty.txt").write_text("  \n", encoding="utf-8")
    args = tuple(a.format(root=lm) for a in args)
    out = tmp_path / "c.tt.pt"
    refused("decompose", lm / "bare", "--tt-ranks", 4, *args, "-o", out, says=says)
    refused("finetune", lm / "bare", *args, "--epochs", 1, "-o", tmp_path / "ft.pt", says=says)
    assert not list(tmp_path.iterdir())


def test_a_mask_of_the_wrong_shape_is_refused(lm: Path, tmp_path: Path) -> None:
    ids = torch.randint(2, 19, (8, 6))
    torch.save({"input_ids": ids, "attention_mask": torch.ones(8, 5, dtype=torch.int64)}, tmp_path / "m.pt")
    refused("finetune", lm / "lm", "--data", f"tensors:{tmp_path / 'm.pt'}", "--epochs", 1, "-o", tmp_path / "ft.pt",
            says="attention_mask (8, 5) must have the shape of the inputs (8, 6)")  # fmt: skip
    torch.save({"input_ids": ids, "attention_mask": torch.full((8, 6), 2)}, tmp_path / "m.pt")
    refused("finetune", lm / "lm", "--data", f"tensors:{tmp_path / 'm.pt'}", "--epochs", 1, "-o", tmp_path / "ft.pt",
            says="must hold only 0 and 1")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# --------------------------------------------------------------------------- masks and keywords


class _Recorder(torch.nn.Module):
    """Wraps a model and records the keyword inputs of each call."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []
        self.config, self.main_input_name = inner.config, "input_ids"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):  # noqa: ANN201
        self.calls.append(attention_mask)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_masks_reach_the_model_by_keyword(lm: Path, tmp_path: Path) -> None:
    from ttcompress.data import check_model_fits, load_dataset
    from ttcompress.report.evaluation import perplexity
    from ttcompress.checkpoint.io import load
    from ttcompress.compression.pipeline import compress

    ids = torch.randint(2, 19, (10, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 4:] = 0
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "m.pt")
    bundle = load_dataset(f"tensors:{tmp_path / 'm.pt'}")
    model = _Recorder(load(lm / "lm"))
    check_model_fits(model, bundle)
    perplexity(model, bundle)
    assert model.calls and all(m is not None and m.shape[1] == 6 and int(m[:, 4:].sum()) == 0 for m in model.calls)
    model.calls.clear()
    compress(model, {"formats": ["svd"], "svd": {"rank": 4}}, calib_data=bundle.train)  # calibration runs the model by keyword
    assert model.calls and all(m is not None for m in model.calls)


def test_decompose_finetune_and_report_on_text(lm: Path, tmp_path: Path) -> None:
    data = f"text:{lm / 'corpus.txt'}"
    result = ok("decompose", lm / "lm", "--tt-ranks", 4, "--data", data, "--calib-samples", 8, "--seq-len", 32,
                "-o", tmp_path / "c.tt.pt")  # fmt: skip
    assert f"calibrated on 8 samples of '{data}'" in result.stderr
    # the compressed file finds the tokenizer of the directory it was made from
    ok("finetune", tmp_path / "c.tt.pt", "--data", data, "--seq-len", 32, "--epochs", 1, "--max-batches", 2,
       "-o", tmp_path / "ft.pt")  # fmt: skip
    assert (tmp_path / "ft.pt").is_file()


# ------------------------------------------------------------------------------- distillation


def _reference_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position KL with F.kl_div on the full tensors, averaged over each sample's kept positions."""
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="none",
                  log_target=True).sum(-1) * temperature**2  # fmt: skip
    per = (kl * mask).sum(1) / mask.sum(1)
    return per.mean()


def test_kl_on_3d_logits_with_a_mask_matches_a_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import ttcompress.report.evaluation as ev

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    s1 = s.clone().requires_grad_(True)
    expected = _reference_kl(s1, t, mask, 2.0)
    expected.backward()
    monkeypatch.setattr(ev, "KL_CHUNK_ELEMENTS", 33)  # 3 positions a chunk: 7 chunks, recomputed in backward
    s2 = s.clone().requires_grad_(True)
    got = distill_loss(s2, t, kind="kl", temperature=2.0, mask=mask)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-9)
    # a masked position changes nothing
    t2 = t.clone()
    t2[0, 6] += 5.0
    assert distill_loss(s, t2, kind="kl", temperature=2.0, mask=mask).item() == pytest.approx(got.item(), rel=1e-9)
    # without a mask: the plain per-position mean
    assert distill_loss(s, t, kind="kl", temperature=2.0).item() == pytest.approx(
        _reference_kl(s, t, torch.ones(3, 7), 2.0).item(), rel=1e-9)


def test_sweep_ranks_text_by_perplexity(lm: Path, tmp_path: Path) -> None:
    result = ok("sweep", lm / "lm", "--data", f"text:{lm / 'corpus.txt'}", "--seq-len", 32, "--tt-ranks", 4,
                "--calib-samples", 8, "--epochs", 1, "--max-batches", 1, "--no-latency", "-o", tmp_path / "sw",
                "-f", "json")  # fmt: skip
    report = json.loads(result.stdout)
    assert report["meta"]["metric"] == "perplexity"
    assert [r["accuracy"] for r in report["rows"]] == [None, None]
    assert all(r["metric"] > 1 for r in report["rows"])
    assert "perplexity" in result.stderr and "before fine-tuning" in result.stderr


# ---------------------------------------------------------------------------------- perplexity


class _FixedLogits(torch.nn.Module):
    """Returns the same logits for any input (a ``ModelOutput``-like dict), taking the mask by keyword."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen_mask = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        self.seen_mask = attention_mask
        return {"logits": self.logits[: input_ids.shape[0]]}


def test_masked_perplexity_equals_a_hand_computation() -> None:
    from ttcompress.data.user import KeywordTensorDataset
    from ttcompress.report.evaluation import perplexity

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)
    ids = torch.tensor([[1, 4, 2, 0], [3, 3, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    model = _FixedLogits(logits)
    got = perplexity(model, KeywordTensorDataset(ids, mask), batch_size=2)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):  # position i predicts token i + 1; the first token is never predicted
            if mask[b, i + 1]:
                row = [float(v) for v in logits[b, i]]
                log_z = math.log(sum(math.exp(v) for v in row))
                total += log_z - row[int(ids[b, i + 1])]
                count += 1
    assert count == 5
    assert got == pytest.approx(math.exp(total / count), rel=1e-6)
    assert torch.equal(model.seen_mask, mask)  # the mask reached the model by keyword


def test_the_perplexity_front_prefers_lower() -> None:
    from types import SimpleNamespace

    from ttcompress.report.plot import _Point, front_indices

    row = SimpleNamespace(is_baseline=False)
    points = [_Point(SimpleNamespace(is_baseline=True), 1.0, 10.0, None), _Point(row, 2.0, 12.0, None),
              _Point(row, 2.0, 15.0, None), _Point(row, 4.0, 30.0, None), _Point(row, 3.0, 40.0, None)]  # fmt: skip
    assert front_indices(points, lower=True) == {1, 3}
    assert front_indices(points, lower=False) == {3, 4}


# ------------------------------------------------------------------------------ Llama-style blocks

_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@pytest.mark.parametrize("plan", [{"formats": ["tt"], "tt": {"ranks": 4}}, {"formats": ["svd"], "svd": {"rank": 4}}])
def test_a_compressed_tiny_llama_generates(plan: dict, tmp_path: Path) -> None:
    from ttcompress.checkpoint.io import load, save
    from ttcompress.compression.pipeline import compress

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "llama")
    model = load(tmp_path / "llama")
    rotary = {k: v.clone() for k, v in model.named_buffers() if "rotary" in k}
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    compress(model, plan, calib_data=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])  # by keyword
    for i in range(2):
        for name in _LLAMA_LINEARS:
            layer = model.get_submodule(f"model.layers.{i}.{name}")
            assert type(layer).__name__ in ("TTLinear", "SVDLinear"), (name, type(layer))
    # grouped-query attention and rotary embeddings untouched
    assert model.model.layers[0].self_attn.k_proj.out_features == 16 and model.config.num_key_value_heads == 2
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in rotary.items())
    save(model, tmp_path / "c.pt")
    again = load(tmp_path / "c.pt").eval()
    out = again.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], ids[:1, :4])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
