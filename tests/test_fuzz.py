"""Seeded fuzzing of every input the command line reads (issue 20, "make it stay fixed").

Valid seeds (a compressed seed-cnn checkpoint, a tiny GPT-2 Hugging Face directory, its compressed
``.tt.pt`` and its ``export --format hf`` directory with ``ttcompress.json``, a plan file) are
mutated: header fields swapped for wrong types, NaN, zero, negative or huge ints; truncation and bit
flips; tensor-table and ``config.json`` / ``ttcompress.json`` / plan fields; option values
(``--tt-d``, ``--input-shape``, ``--arch-kwargs``, ...); outputs inside inputs. Each case runs the
real CLI (``tests/fuzz_driver.py``, many cases per child process) under a 2 GB address-space cap
and a time cap, and must either succeed (exit 0) or print exactly one ``error:`` line and exit 2:
never a traceback, exit 70, a kill or a timeout, never a temporary file left behind, never a
changed input; and a number read from a file must not size an allocation up to the memory cap.

The default run is a few dozen cases. A long run (documented in docs/cli.md, "What ttcompress
trusts")::

    TTCOMPRESS_FUZZ_CASES=2000 TTCOMPRESS_FUZZ_SEED=7 pytest tests/test_fuzz.py -m fuzz

``TTCOMPRESS_FUZZ_CASES`` is the number of cases (spread over all families, including ``finetune``,
``report`` and ONNX/TorchScript export, which the default run leaves out for time),
``TTCOMPRESS_FUZZ_SEED`` the seed (default 20), ``TTCOMPRESS_FUZZ_MEM_GB`` the memory cap above what
the interpreter maps after its imports (default 2), ``TTCOMPRESS_FUZZ_TIMEOUT`` the seconds per case.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from typer.testing import CliRunner  # noqa: E402

from fuzzing import Case, build_seeds, case_ids, describe, make_case, problems, run_cases  # noqa: E402
from ttcompress.cli import app  # noqa: E402

TOTAL = int(os.environ["TTCOMPRESS_FUZZ_CASES"]) if os.environ.get("TTCOMPRESS_FUZZ_CASES") else None
SEED = int(os.environ.get("TTCOMPRESS_FUZZ_SEED", "20"))
MEM_GB = float(os.environ.get("TTCOMPRESS_FUZZ_MEM_GB", "2"))
IDS = case_ids(TOTAL)

pytestmark = pytest.mark.fuzz


def _invoke(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.stderr, result.exception)


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Case], dict[str, dict[str, Any]]]:
    """Build the seeds, make every case, run them all in driver children; cases and results by id."""
    work = tmp_path_factory.mktemp("fuzz")
    seeds = build_seeds(work / "seeds", _invoke)
    cases = {i: make_case(i, seeds, work / "cases", seed=SEED, long=TOTAL is not None) for i in IDS}
    results = run_cases(list(cases.values()), work, mem_gb=MEM_GB)
    report = os.environ.get("TTCOMPRESS_FUZZ_REPORT")
    if report:  # a long run's failures in one file (and every result beside it), for triage
        Path(report + ".json").write_text(json.dumps({i: {**asdict(cases[i]), **results[i]} for i in cases}, indent=1))
        with open(report, "w", encoding="utf-8") as f:
            for i, case in cases.items():
                found = problems(case, results[i])
                if found:
                    f.write(f"{describe(case, results[i])}\n  problems: {'; '.join(found)}\n\n")
    return cases, results


@pytest.mark.parametrize("case_id", IDS)
def test_fuzz_case(fuzz_run: tuple[dict[str, Case], dict[str, dict[str, Any]]], case_id: str) -> None:
    cases, results = fuzz_run
    case, result = cases[case_id], results[case_id]
    found = problems(case, result)
    assert not found, f"{describe(case, result)}\n  problems: {'; '.join(found)}\n  stderr tail: {result.get('stderr', '')[-1500:]}"


def test_fuzz_outcomes_cover_both(fuzz_run: tuple[dict[str, Case], dict[str, dict[str, Any]]]) -> None:
    """The mutations are neither all harmless nor all refused: the corpus exercises both paths."""
    _, results = fuzz_run
    codes = [r.get("exit") for r in results.values()]
    assert codes.count(0) >= 4 and codes.count(2) >= len(codes) // 4, codes
