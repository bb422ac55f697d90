"""``finetune --teacher`` with a state-dict teacher: --teacher-arch, or the student's recorded architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.errors import ArchRequiredError, UntrustedCodeError
from ttcompress.checkpoint.io import load, save, update_meta
from ttcompress.checkpoint.models import build_arch
from ttcompress.checkpoint.teacher import load_teacher

runner = CliRunner()
FAST = ["--data", "mnist-5k", "--epochs", "1", "--device", "cpu", "--batch-size", "32", "--max-batches", "2"]
SMALL = f"{__name__}:small_mlp"


def small_mlp(hidden: int = 16) -> nn.Module:
    """A factory the tests name as an import path."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, match: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    torch.save(build_arch("seed-cnn").state_dict(), root / "teacher.pt")  # a bare state dict
    save(build_arch("seed-cnn"), root / "student.tt.pt")  # records arch seed-cnn
    torch.save(build_arch(SMALL, kwargs={"hidden": 16}).state_dict(), root / "mlp-teacher.pt")
    return {"teacher": root / "teacher.pt", "student": root / "student.tt.pt", "mlp": root / "mlp-teacher.pt"}


@pytest.fixture()
def teachers(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """The teachers finetune loads (a spy on ``load_teacher``)."""
    from ttcompress.training import api

    seen: list[nn.Module] = []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(load_teacher(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(api, "load_teacher", spy)
    return seen


def _ok(result) -> None:  # noqa: ANN001
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)


def test_teacher_arch_defaults_to_the_students(files, tmp_path, teachers):
    _ok(invoke("finetune", files["student"], "--teacher", files["teacher"], *FAST, "-o", tmp_path / "a.pt"))
    assert [type(t).__name__ for t in teachers] == ["SeedCNN"]
    expected = torch.load(files["teacher"], weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in teachers[0].state_dict().items())


def test_teacher_arch_named_on_the_command_line(files, tmp_path, teachers):
    # an import path the user names is trusted (no --trust-code), with its kwargs
    _ok(invoke("finetune", files["student"], "--teacher", files["mlp"], "--teacher-arch", SMALL,
               "--teacher-arch-kwargs", '{"hidden": 16}', *FAST, "-o", tmp_path / "b.pt"))
    assert len(teachers) == 1 and teachers[0][1].out_features == 16


@pytest.mark.parametrize(("extra", "match"), [
    (["--teacher-arch", "lenet5"], "does not fit arch 'lenet5'"),
    (["--teacher-arch", SMALL], "does not fit"),
    (["--teacher-arch-kwargs", "{}"], "--teacher-arch-kwargs needs --teacher-arch"),
    (["--teacher-arch", "seed-cnn", "--teacher-arch-kwargs", "[1]"], "--teacher-arch-kwargs must be a JSON object"),
])
def test_bad_teacher_arch_is_one_line(files, tmp_path, extra, match):
    out = tmp_path / "c.pt"
    assert_refused(invoke("finetune", files["student"], "--teacher", files["teacher"], *extra, *FAST, "-o", out), match)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_teacher_arch_needs_a_teacher(files, tmp_path):
    out = tmp_path / "d.pt"
    assert_refused(invoke("finetune", files["student"], "--teacher-arch", "seed-cnn", *FAST, "-o", out),
                   "need --teacher")
    assert not out.exists()


def test_load_teacher_trust_rules(files):
    student = build_arch(SMALL, kwargs={"hidden": 16})  # records the import path as its architecture
    # the recorded import path came from a file: allowed only when the user named it or trusts code
    with pytest.raises(UntrustedCodeError, match="trust"):
        load_teacher(files["mlp"], student=student)
    for kwargs in ({"student_arch": SMALL}, {"trust_code": True}):
        teacher = load_teacher(files["mlp"], student=student, **kwargs)
        assert isinstance(teacher[1], nn.Linear) and teacher[1].out_features == 16
    # a self-describing teacher ignores the student's architecture
    assert type(load_teacher(files["student"], student=student)).__name__ == "SeedCNN"
    plain = nn.Linear(2, 2)
    update_meta(plain, arch=None)
    with pytest.raises(ArchRequiredError, match="teacher_arch"):
        load_teacher(files["teacher"], student=plain)
    assert isinstance(load_teacher(files["teacher"], student=plain, arch=build_arch("seed-cnn")), nn.Module)
    with pytest.raises(ValueError, match="teacher_arch_kwargs given without teacher_arch"):
        load_teacher(files["teacher"], student=plain, arch_kwargs={"a": 1})
    assert load(files["teacher"], arch="seed-cnn") is not None
