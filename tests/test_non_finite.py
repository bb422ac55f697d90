"""NaN and Inf in weights or calibration data: one line, exit 2, on every compression path.

Issue 20, defects 10 and 14: ``decompose --target-ratio`` (``LinAlgError``), ``sweep``
(``ValueError``, or an internal ``lstsq`` assert for Inf) and NaN calibration data (the same
assert) gave exit 70, while plain ``decompose --tt-ranks`` refused the same file in one line.
The check now runs once where every compression starts
(:func:`ttcompress.compression.surgery_checks.check_finite_parameters`), and calibration inputs are checked
where they are normalised (:func:`ttcompress.calibration.data.calib_batches`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ttcompress.calibration.data import calib_batches, sample_calibration_set
from ttcompress.cli import app
from ttcompress.errors import DataError, UserInputError
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import Plan
from ttcompress.compression.pipeline import compress

runner = CliRunner()
SWEEP = ["--epochs", "1", "--max-batches", "1", "--no-latency", "--device", "cpu"]


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, match: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=["nan", "inf"])
def bad_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seed-cnn with one non-finite entry in its first conv (a layer --tt-ranks alone keeps dense)."""
    torch.manual_seed(0)
    sd = build_arch("seed-cnn").state_dict()
    sd["features.0.weight"].view(-1)[5] = float(request.param)
    path = tmp_path_factory.mktemp("bad") / "cnn.pt"
    torch.save(sd, path)
    return path


CASES = {
    "tt-ranks": ["decompose", "{M}", "--arch", "seed-cnn", "--tt-ranks", "4", "-o", "{O}"],
    "target-ratio": ["decompose", "{M}", "--arch", "seed-cnn", "--target-ratio", "4", "-o", "{O}"],
    "calibrated": ["decompose", "{M}", "--arch", "seed-cnn", "--data", "mnist-5k", "--calib-samples", "32", "-o", "{O}"],
    "dry-run": ["decompose", "{M}", "--arch", "seed-cnn", "--target-ratio", "4", "--dry-run"],
    "inspect": ["inspect", "{M}", "--arch", "seed-cnn", "--target-ratio", "4"],
    "sweep": ["sweep", "{M}", "--arch", "seed-cnn", "--cp-ranks", "2", "--calib-samples", "32", "--output-dir", "{O}",
              *SWEEP],
}


@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_weights_are_refused_the_same_way_everywhere(case: str, bad_model: Path, tmp_path: Path) -> None:
    before = digest(bad_model)
    out = tmp_path / "out"
    args = [a.format(M=bad_model, O=out) for a in CASES[case]]
    assert_refused(invoke(*args), "layer 'features.0' has NaN or Inf weight values")
    assert not out.exists() and digest(bad_model) == before


def test_inspect_shows_a_non_finite_model(bad_model: Path) -> None:
    assert invoke("inspect", bad_model, "--arch", "seed-cnn").exit_code == 0  # looking is not compressing


def test_python_api_refuses_before_calibration() -> None:
    model = build_arch("seed-fc3")
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("inf")
    calls = []

    class Spy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> torch.Tensor:
            calls.append(i)
            return torch.zeros(1, 28, 28)

    with pytest.raises(UserInputError, match="NaN or Inf"):
        compress(model, Plan(target_ratio=4.0), calib_data=Spy())
    assert calls == []


@pytest.mark.parametrize("entry", ["compress", "preview"])
def test_the_weights_are_scanned_once_per_compression(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass over the parameters, also under a target ratio (guarded_plan scanned them again)."""
    import ttcompress.compression.dryrun
    import ttcompress.compression.pipeline
    import ttcompress.compression.summary
    import ttcompress.compression.surgery_checks as checks

    calls: list[int] = []
    real = checks.check_finite_parameters

    def spy(model: torch.nn.Module) -> None:
        calls.append(1)
        real(model)

    for module in (checks, ttcompress.compression.pipeline, ttcompress.compression.summary,
                   ttcompress.compression.dryrun):
        monkeypatch.setattr(module, "check_finite_parameters", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    if entry == "compress":
        compress(model, Plan(target_ratio=2.0))
    else:
        ttcompress.compression.dryrun.preview_plan(model, Plan(target_ratio=2.0))
    assert len(calls) == 1


# ------------------------------------------------------------------------------ calibration data


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    torch.save(build_arch("seed-cnn").state_dict(), path)
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["decompose", "decompose-ratio", "sweep"])
def test_non_finite_calibration_data_names_the_data_and_the_sample(cnn: Path, tmp_path: Path, bad: float,
                                                                  command: str) -> None:
    x, y = torch.randn(64, 1, 28, 28), torch.arange(64) % 10
    x[37, 0, 3, 3] = bad
    data = tmp_path / "data.pt"
    torch.save({"inputs": x, "targets": y}, data)
    before, out = digest(data), tmp_path / "out"
    common = ["--arch", "seed-cnn", "--data", f"tensors:{data}"]
    args = {
        "decompose": ["decompose", cnn, *common, "-o", out],
        "decompose-ratio": ["decompose", cnn, *common, "--target-ratio", "4", "-o", out],
        "sweep": ["sweep", cnn, *common, "--cp-ranks", "2", "--output-dir", out, *SWEEP],
    }[command]
    result = invoke(*args)
    assert_refused(result, f"calibration data tensors:{data}: sample ")
    assert "(sample 37 of the dataset it was drawn from) has NaN or Inf values" in result.stderr
    assert not out.exists() and digest(data) == before


def test_calib_batches_names_the_first_bad_sample() -> None:
    x = torch.randn(300, 4)
    x[200, 1], x[250, 0] = float("nan"), float("inf")
    with pytest.raises(DataError, match=r"calib_data sample 200 has NaN"):
        list(calib_batches(x))
    ds = torch.utils.data.TensorDataset(x)
    subset = sample_calibration_set(ds, n=300, seed=0)
    with pytest.raises(DataError, match=r"\(sample 200 of the dataset"):
        list(calib_batches(subset))
    assert len(list(calib_batches(x[:200]))) == 2  # finite data pass; integer token ids are not checked
    assert len(list(calib_batches(torch.randint(0, 9, (10, 3))))) == 1


def test_report_says_a_model_gives_non_finite_outputs(bad_model: Path, cnn: Path, tmp_path: Path) -> None:
    result = invoke("report", cnn, bad_model, "--arch", "seed-cnn", "--no-latency", "--eval-limit", "10",
                    "--format", "md")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "/cnn (non-finite outputs!)" in result.stdout and "NaN/Inf outputs from bad" in result.stdout
    healthy = invoke("report", cnn, cnn, "--arch", "seed-cnn", "--no-latency", "--eval-limit", "10", "--format", "md")
    assert "non-finite" not in healthy.stdout and "NaN/Inf" not in healthy.stdout

