"""The README's Python snippet runs as written (in a fresh process, in a temporary directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippet_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python snippet"
    code = blocks[0] + "\nassert isinstance(same, torch.nn.Module) and isinstance(mine, torch.nn.Module)\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok") and (tmp_path / "model.tt.pt").is_file()
    assert (tmp_path / "mine.tt.pt").read_bytes()[8:9] == b"{"  # safetensors, not a pickle


def _quick_start_commands() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_commands_needing_only_python_and_pip() -> None:
    demo, tests = _quick_start_commands()  # exactly two
    for command in (demo, tests):
        programs = {step.split()[0] for step in command.split("&&")}
        assert programs <= {"python3", ".venv/bin/pip", ".venv/bin/python", ".venv/bin/ttcompress"}, command
    assert demo.endswith("ttcompress demo") and "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == _quick_start_commands()[1]
