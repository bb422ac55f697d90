"""No command writes over its input: an output equal to an input, or inside an input directory, is refused.

Issue 20, defect 8: ``decompose DIR -o DIR/model.safetensors --overwrite`` replaced the weights of
the Hugging Face directory it read. Every writing command goes through
:func:`ttcompress.fsutil.check_not_inputs` before anything is read or written: one line, exit 2,
the input byte for byte as it was, nothing new beside it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.errors import OutputExistsError
from ttcompress.fsutil import check_not_inputs
from ttcompress.checkpoint.models import build_arch

runner = CliRunner()


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (its name relative to ``root``) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def assert_refused(result, match: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A directory input (the check runs before it is read, so its content need not load)."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "model.safetensors").write_bytes(b"weights" * 100)
    return d


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    torch.save(build_arch("seed-cnn").state_dict(), path)
    return path


FAST = ["--epochs", "1", "--max-batches", "1", "--device", "cpu"]

# (command line with {IN} for the input directory and {OUT} for the output path inside it)
COMMANDS = {
    "decompose": ["decompose", "{IN}", "--tt-ranks", "4", "-o", "{OUT}"],
    "decompose-data": ["decompose", "{MODEL}", "--cp-ranks", "2", "--data", "imagefolder:{IN}", "-o", "{OUT}"],
    "finetune": ["finetune", "{IN}", "-o", "{OUT}", *FAST],
    "train-teacher": ["train", "--arch", "seed-cnn", "--teacher", "{IN}", "-o", "{OUT}", *FAST],
    "export-onnx": ["export", "{IN}", "--format", "onnx", "-o", "{OUT}"],
    "export-hf": ["export", "{IN}", "--format", "hf", "-o", "{OUT}"],
    "report-o": ["report", "{IN}", "{MODEL}", "-o", "{OUT}.md"],
    "report-plot": ["report", "{MODEL}", "{IN}", "--plot", "{OUT}.png"],
    "sweep-report": ["sweep", "{IN}", "--cp-ranks", "2", "--report", "{OUT}.md"],
    "sweep-output-dir": ["sweep", "{IN}", "--cp-ranks", "2", "--output-dir", "{OUT}"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_command_writes_inside_an_input_directory(name: str, hf_dir: Path, cnn: Path) -> None:
    before = snapshot(hf_dir.parent)
    args = [a.format(IN=hf_dir, OUT=hf_dir / "model.safetensors", MODEL=cnn) for a in COMMANDS[name]]
    assert_refused(invoke(*args, "--overwrite"), f"inside the input directory {hf_dir}")
    assert snapshot(hf_dir.parent) == before


def test_decompose_into_its_own_hf_directory_is_refused_the_directory_still_loads(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    d = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(d, safe_serialization=True)
    before = snapshot(d)
    result = invoke("decompose", d, "--tt-ranks", "4", "-o", d / "model.safetensors", "--overwrite")
    assert_refused(result, "inside the input directory")
    assert snapshot(d) == before and sorted(os.listdir(tmp_path)) == ["gpt2"]


def test_symlinks_and_hard_links_do_not_hide_an_input(hf_dir: Path, cnn: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(hf_dir, target_is_directory=True)
    before = snapshot(hf_dir)
    # the input named through a symlink, the output through the real path, and the other way round
    assert_refused(invoke("decompose", link, "-o", hf_dir / "x.tt.pt", "--overwrite"), "inside the input directory")
    assert_refused(invoke("decompose", hf_dir, "-o", link / "sub" / "x.tt.pt"), "inside the input directory")
    hard = tmp_path / "hard.pt"
    os.link(cnn, hard)
    cnn_bytes = cnn.read_bytes()
    result = invoke("finetune", cnn, "-o", hard, "--overwrite", *FAST)
    assert_refused(result, "must differ from the input file")
    assert snapshot(hf_dir) == before and cnn.read_bytes() == cnn_bytes and not (tmp_path / "hard.last.pt").exists()


def test_an_output_directory_that_would_replace_an_input_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    assert_refused(invoke("export", hf_dir, "--format", "hf", "-o", tmp_path, "--overwrite"),
                   f"contains the input {hf_dir}")  # fmt: skip
    assert_refused(invoke("export", hf_dir, "--format", "hf", "-o", hf_dir, "--overwrite"),
                   "must differ from the input directory")  # fmt: skip
    assert snapshot(tmp_path) == before


def test_a_tensors_data_file_is_an_input(cnn: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.pt"
    torch.save({"x": torch.randn(8, 1, 28, 28), "y": torch.arange(8) % 2}, data)
    before = data.read_bytes()
    result = invoke("finetune", cnn, "--data", f"tensors:{data}", "-o", data, "--overwrite", *FAST)
    assert_refused(result, "must differ from the input file")
    assert data.read_bytes() == before


def test_library_check(hf_dir: Path, tmp_path: Path) -> None:
    check_not_inputs([tmp_path / "elsewhere.pt", None], [hf_dir, None, tmp_path / "missing"])
    check_not_inputs([tmp_path / "out"], [hf_dir / "model.safetensors"])  # a sibling, not a parent
    with pytest.raises(OutputExistsError, match="inside the input directory"):
        check_not_inputs([hf_dir / "deeper" / "x.pt"], [hf_dir])
    with pytest.raises(OutputExistsError, match="must differ from the input file"):
        check_not_inputs([hf_dir / "model.safetensors"], [hf_dir / "model.safetensors"])
    # an output directory holding the input is fine unless it replaces the directory as a whole
    check_not_inputs([tmp_path], [hf_dir])
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_not_inputs([tmp_path], [hf_dir], replaces_directory=True)


def test_decompose_file_refuses_too(hf_dir: Path) -> None:
    from ttcompress.compression.pipeline import decompose_file

    before = snapshot(hf_dir)
    with pytest.raises(OutputExistsError, match="inside the input directory"):
        decompose_file(hf_dir, output=hf_dir / "model.safetensors", plan=None)
    assert snapshot(hf_dir) == before


def test_resume_without_a_resume_state_says_how_to_start_over(cnn: Path, tmp_path: Path) -> None:
    """A kill before the first epoch ended leaves no resume state; starting over then needs --overwrite."""
    out = tmp_path / "ft.pt"
    (tmp_path / "ft.metrics.jsonl").write_text("")  # what the killed run left
    result = invoke("finetune", cnn, "--arch", "seed-cnn", "-o", out, "--resume", "--no-distill", "--device", "cpu")
    assert_refused(result, "start over without --resume, with --overwrite to replace the files it left: ft.metrics.jsonl")
    result = invoke("finetune", cnn, "--arch", "seed-cnn", "-o", out, "--no-distill", "--device", "cpu")
    assert_refused(result, "already exists; pass --overwrite")
