"""Running a Hugging Face model: report, finetune and sweep read a ``ModelOutput``'s logits.

Tiny GPT-2 / BERT models built from configs (never the hub), saved with ``save_pretrained``, and
a ``tensors:FILE`` of int64 token ids (the models are called as ``model(input_ids)``).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from ttcompress.cli import app  # noqa: E402
from ttcompress.data import check_model_fits  # noqa: E402
from ttcompress.data.user import user_bundle  # noqa: E402
from ttcompress.errors import UserInputError  # noqa: E402
from ttcompress.report.evaluation import evaluate  # noqa: E402
from ttcompress.checkpoint.io import load  # noqa: E402
from ttcompress.outputs import primary_output  # noqa: E402
from ttcompress.compression.summary import summarize  # noqa: E402

runner = CliRunner()
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
A, B = torch.ones(2, 3), torch.zeros(2, 5)


def ok(*args: object):  # noqa: ANN201 - click Result
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


# ------------------------------------------------------------------------------- primary_output


class _Fields(OrderedDict):
    """Like transformers' ``ModelOutput``: a mapping of the fields that are set."""


@pytest.mark.parametrize(("out", "expected"), [
    (A, A),
    ({"loss": B, "logits": A}, A),
    (_Fields(last_hidden_state=A, pooler_output=B), A),
    (_Fields(hidden=None, other=A), A),
    ((A, B), A),
    ([(A,), B], A),
])  # fmt: skip
def test_primary_output_picks_logits_then_states_then_first(out: object, expected: torch.Tensor) -> None:
    assert primary_output(out) is expected


@pytest.mark.parametrize(("out", "named"), [(None, "None"), ((), "empty tuple"), ({"n": 3}, "keys ['n']"), ("s", "str")])
def test_primary_output_refuses_what_has_no_tensor(out: object, named: str) -> None:
    with pytest.raises(UserInputError, match=f"the teacher returned .*{re.escape(named)}"):
        primary_output(out, what="the teacher")


def test_check_model_fits_names_a_non_tensor_output() -> None:
    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, int]:
            return {"n": 1}

    bundle = user_bundle(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), name="t")
    with pytest.raises(UserInputError, match="model 'odd' returned a dict with keys"):
        check_model_fits(Odd(), bundle, what="model 'odd'")


def test_check_model_fits_reports_a_model_that_needs_other_inputs() -> None:
    """transformers' CLIPModel called with token ids alone fails inside with AttributeError (no
    pixel_values): one line naming the data, not an internal error."""
    class NeedsPixels(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pixel_values = None
            return pixel_values.shape  # type: ignore[union-attr]

    bundle = user_bundle(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), name="t")
    with pytest.raises(UserInputError, match="model 'clip' does not fit t: .*NoneType"):
        check_model_fits(NeedsPixels(), bundle, what="model 'clip'")


# ----------------------------------------------------------------------------- HF models, end to end


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cls`` (GPT-2 classifier, 3 labels), ``bert`` (BERT classifier), ``lm`` (GPT-2 LM head);
    ``cls.pt``: token ids and labels; ``ids.pt``: token ids only."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt2 = dict(TINY, bos_token_id=0, eos_token_id=0)
    transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**gpt2, num_labels=3, pad_token_id=0)).save_pretrained(root / "cls")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2)).save_pretrained(root / "lm")
    transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, num_labels=3)).save_pretrained(root / "bert")
    ids = torch.randint(1, 100, (40, 8), generator=torch.Generator().manual_seed(0))
    torch.save({"inputs": ids, "targets": ids[:, 0] % 3}, root / "cls.pt")
    torch.save({"inputs": ids}, root / "ids.pt")
    return root


def test_evaluate_reads_the_logits_of_a_transformers_classifier(hf: Path) -> None:
    model = load(hf / "cls")
    data = torch.load(hf / "cls.pt")
    with torch.no_grad():
        logits = model(input_ids=data["inputs"]).logits  # transformers' own call, by keyword
    expected = int((logits.argmax(1) == data["targets"]).sum()) / 40
    result = evaluate(model, TensorDataset(data["inputs"], data["targets"]), device="cpu", batch_size=16)
    assert result.n == 40 and result.accuracy == pytest.approx(expected, abs=1e-9)


def test_report_and_finetune_run_a_compressed_gpt2_classifier(hf: Path, tmp_path: Path) -> None:
    data = f"tensors:{hf / 'cls.pt'}"
    ok("decompose", hf / "cls", "--tt-ranks", 4, "-o", tmp_path / "c.tt.pt")
    rows = json.loads(ok("report", hf / "cls", tmp_path / "c.tt.pt", "--data", data, "--no-latency",
                         "-f", "json").stdout)["rows"]  # fmt: skip
    assert [0 <= r["accuracy"] <= 1 and r["flops"] > 0 for r in rows] == [True, True]
    assert rows[1]["params"] < rows[0]["params"]
    assert rows[0]["file_bytes"] == sum(p.stat().st_size for p in (hf / "cls").iterdir())
    ok("finetune", tmp_path / "c.tt.pt", "--data", data, "--epochs", 1, "--max-batches", 2, "-o", tmp_path / "ft.pt")
    model = load(tmp_path / "ft.pt")
    assert model(torch.load(hf / "cls.pt")["inputs"][:2]).logits.shape == (2, 3)


def test_label_free_distillation_of_a_gpt2_language_model(hf: Path, tmp_path: Path) -> None:
    ok("decompose", hf / "lm", "--tt-ranks", 4, "-o", tmp_path / "lm.tt.pt")
    before = load(tmp_path / "lm.tt.pt").state_dict()
    result = ok("finetune", tmp_path / "lm.tt.pt", "--data", f"tensors:{hf / 'ids.pt'}", "--epochs", 1,
                "--max-batches", 2, "--lr", 1e-3, "-o", tmp_path / "ft.pt", "--json")  # fmt: skip
    assert "distilling from the source model" in result.stderr
    after = load(tmp_path / "ft.pt").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "cores" in k)


def test_sweep_takes_a_bert_directory_as_its_baseline(hf: Path, tmp_path: Path) -> None:
    ok("sweep", hf / "bert", "--data", f"tensors:{hf / 'cls.pt'}", "--tt-ranks", "4", "--epochs", 1,
       "--max-batches", 1, "--no-latency", "-o", tmp_path / "sw", "-f", "json")  # fmt: skip
    assert len(list((tmp_path / "sw").glob("*/model.pt"))) == 1


def test_inspect_counts_a_tied_parameter_once(hf: Path, tmp_path: Path) -> None:
    ok("decompose", hf / "lm", "--tt-ranks", 4, "-o", tmp_path / "lm.tt.pt")
    model = load(tmp_path / "lm.tt.pt")
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, and still tied
    summary = summarize(model)
    # every parameter outside the layer rows belongs to a LayerNorm
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    assert summary.other_params == norms == 320
    # the output layer's row says whose weights it shares, and its share is not counted twice
    rows = {r.name: r for r in summary.layers}
    assert rows["lm_head"].tied_to == "transformer.wte" and rows["lm_head"].share == 0.0
    assert rows["transformer.wte"].tied_to is None and rows["transformer.wte"].share > 0
    assert sum(r.share for r in summary.layers) + summary.other_params / summary.total_params == pytest.approx(1)
    shown = ok("inspect", tmp_path / "lm.tt.pt").stdout
    assert "= transformer.wte" in shown and "tied" in shown
