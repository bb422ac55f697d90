"""Package-level contracts: public API, no import-time side effects, entry points."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ttcompress
from ttcompress.cli import COMMANDS, app, load_command


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


_IMPORTS_AFTER = (
    "import runpy, sys\n"
    "sys.argv = ['ttcompress', {flag!r}]\n"
    "try:\n"
    "    runpy.run_module('ttcompress', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    assert not exc.code, exc.code\n"
    "print(' '.join(sorted(sys.modules)))\n"
)


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_neither_torch_nor_commands(flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER.format(flag=flag)], capture_output=True, text=True, check=True
    )
    modules = set(result.stdout.split()[-1000:])
    assert "torch" not in modules and "tensorly" not in modules
    assert not {f"ttcompress.cli.{module}" for module, _ in COMMANDS.values()} & modules


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_static_command_table_matches_the_commands(name: str) -> None:
    command = load_command(name)
    assert command.name == name
    assert COMMANDS[name][1] == inspect.cleandoc(command.help or "").split("\n\n")[0].replace("\n", " ")


def test_command_modules_do_not_import_the_cli_package() -> None:
    cli_dir = Path(ttcompress.__file__).parent / "cli"
    # reference.py renders the docs from the whole command line; nothing in the package imports it
    offenders = [p.name for p in cli_dir.glob("*.py")
                 if p.name != "reference.py" and "from ttcompress.cli import" in p.read_text()]
    assert not offenders
