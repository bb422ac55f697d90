"""Package-level contracts: public API, no import-time side effects, entry points."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import ttcompress
from ttcompress.cli import app


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, tensorly\n"
        "before = tensorly.get_backend()\n"
        "import ttcompress, ttcompress.cli\n"
        "assert tensorly.get_backend() == before, tensorly.get_backend()\n"
        "heavy = [m for m in ('matplotlib', 'mlxtend', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_names_resolve() -> None:
    for name in ttcompress.__all__:
        assert getattr(ttcompress, name) is not None, name


def test_version_and_help() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"ttcompress {ttcompress.__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("decompose", "inspect", "train", "finetune", "report", "sweep", "demo"):
        assert command in result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "ttcompress", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ttcompress ")
