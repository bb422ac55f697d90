"""The docs cannot drift from the code: the option reference is generated, and the hand-written pages
name every option and the defaults the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ttcompress.cli import COMMANDS, load_command
from ttcompress.cli.reference import render_reference
from ttcompress.training.config import FinetuneConfig, TrainConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_option_reference_is_what_the_code_renders() -> None:
    assert (DOCS / "options.md").read_text(encoding="utf-8") == render_reference(), (
        "docs/options.md is stale: run python -m ttcompress.cli.reference docs/options.md")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_md_names_every_option_of_every_command(command: str) -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    params = [p for p in load_command(command).params if getattr(p, "param_type_name", "") == "option"]
    missing = [p.opts[-1] for p in params if not any(re.search(re.escape(o) + r"\b", text) for o in p.opts)]
    assert not missing, f"docs/cli.md does not mention {command} option(s) {missing}"


def test_the_documented_training_defaults_are_the_configs() -> None:
    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    row = lambda flag: next(line for line in cli.splitlines() if line.startswith(f"| `{flag}"))  # noqa: E731
    assert f"{TrainConfig.epochs} / {FinetuneConfig.epochs}" in row("--epochs")
    assert f"{TrainConfig.lr:.0e}".replace("e-0", "e-") + " / " + f"{FinetuneConfig.lr:.0e}".replace("e-0", "e-") in row("--lr")
    assert f"`{TrainConfig.schedule}` / `{FinetuneConfig.schedule}`" in row("--schedule")
    assert f"| {TrainConfig.batch_size} |" in row("--batch-size")
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    finetune_row = next(line for line in api.splitlines() if line.startswith("| `finetune("))
    assert f"lr {FinetuneConfig.lr:.0e}".replace("e-0", "e-") in finetune_row and f"{FinetuneConfig.epochs} epochs" in finetune_row
