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
