"""Typed input errors and generated format flags.

* Every bad value, through the CLI: exit code 2, one ``error:`` line on stderr naming the flag, no
  traceback, nothing written; through the Python API: a :class:`UserInputError` (an
  :class:`InputError` naming the parameter), never another exception type.
* A newly registered format gets its command-line flag and ``--set`` with no other change.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from click.testing import CliRunner

from ttcompress.checkpoint.models import build_arch
from ttcompress.cli import load_command
from ttcompress.cli.flags import flag_for, format_flags, with_flag
from ttcompress.errors import InputError, UserInputError
from ttcompress.formats.base import setting

runner = CliRunner()


# ---- the CLI: 40 bad values, each one line and exit 2 ------------------------------------------------------
BAD_FLAGS = [
    (["--tt-ranks", "0"], "--tt-ranks"), (["--tt-ranks", "-3"], "--tt-ranks"), (["--tt-ranks", "abc"], "--tt-ranks"),
    (["--tt-ranks", "1.5"], "--tt-ranks"), (["--tt-ranks", "3,4"], "--tt-ranks"),
    (["--tt-eps", "0"], "--tt-eps"), (["--tt-eps", "1"], "--tt-eps"), (["--tt-eps", "1.5"], "--tt-eps"),
    (["--tt-eps", "-0.1"], "--tt-eps"), (["--tt-eps", "nan"], "--tt-eps"), (["--tt-eps", "x"], "--tt-eps"),
    (["--tt-d", "1"], "--tt-d"), (["--tt-d", "65"], "--tt-d"), (["--tt-d", "two"], "--tt-d"),
    (["--cp-ranks", "0"], "--cp-ranks"), (["--cp-ranks", "-1"], "--cp-ranks"),
    (["--cp-ratio", "1"], "--cp-ratio"), (["--cp-ratio", "0.5"], "--cp-ratio"), (["--cp-ratio", "inf"], "--cp-ratio"),
    (["--cp-ratio", "nan"], "--cp-ratio"), (["--cp-ranks", "4", "--cp-ratio", "3"], "mutually exclusive"),
    (["--svd-rank", "0"], "--svd-rank"), (["--svd-eps", "2"], "--svd-eps"), (["--svd-ratio", "1"], "--svd-ratio"),
    (["--svd-ratio", "2", "--svd-rank", "3"], "--svd-ratio"), (["--tucker2-ranks", "0"], "--tucker2-ranks"),
    (["--tucker2-ratio", "0.9"], "--tucker2-ratio"), (["--tt-embedding-d", "1"], "--tt-embedding-d"),
    (["--set", "tucker2.ranks=[1,2,3]"], "--tucker2-ranks"), (["--set", "svd.rank=abc"], "--set"),
    (["--set", "nope.rank=1"], "--set"), (["--set", "svd=3"], "--set"), (["--set", "svd.rnk=3"], "--set"),
    (["--set", "cp.options=[1]"], "cp.options"), (["--set", 'cp.options={"bogus": 1}'], "cp.options"),
    (["--set", 'cp.options={"n_iter_max": "x"}'], "cp.options"), (["--set", 'tucker2.options={"tol": -1}'], "tucker2"), (["--set", "auto.tie_tol=2"], "auto.tie_tol"),
    (["--set", "auto.candidates=nope"], "auto.candidates"), (["--set", "tt.ranks=2", "--tt-ranks", "3"], "--set"),
    (["--target-ratio", "0.5"], "--target-ratio"), (["--target-ratio", "4", "--tt-ranks", "4"], "--target-ratio"),
    (["--format", "nope"], "--format"), (["--format", "tt,tt"], "--format"), (["--layers", " "], "--layers"),
    (["--tt-ranks", "4", "--set", "tt.eps=none"], "stay dense"),
]  # fmt: skip
BAD_DECOMPOSE = [
    (["--min-saving", "1.5"], "--min-saving"), (["--max-error", "-1"], "--max-error"),
    (["--calib-memory", "1M"], "--calib-memory"), (["--calib-memory", "lots"], "--calib-memory"),
    (["--calib-samples", "0", "--data", "mnist-5k"], "--calib-samples"), (["--data", "nope"], "unknown dataset"),
]


def _one_error_line(result, match: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_values_are_one_line_exit_2_and_write_nothing(cnn_file, tmp_path) -> None:
    assert len(BAD_FLAGS) + len(BAD_DECOMPOSE) >= 40
    inspect, decompose = load_command("inspect"), load_command("decompose")
    out = tmp_path / "out.tt.pt"
    for args, match in BAD_FLAGS:
        _one_error_line(runner.invoke(inspect, [str(cnn_file), "--arch", "seed-cnn", *args]), match)
    for args, match in [*BAD_FLAGS[::4], *BAD_DECOMPOSE]:
        result = runner.invoke(decompose, [str(cnn_file), "--arch", "seed-cnn", "-o", str(out), *args])
        _one_error_line(result, f"{match}")
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_bad_plan_file_value_is_one_line(cnn_file, tmp_path) -> None:
    inspect = load_command("inspect")
    for text, match in [("svd: {rank: 0}\n", "svd.rank must be a positive integer"),
                        ("rules: [{pattern: 'features.*', format: cp, ranks: [1, 2]}]\n", "cp.rank"),
                        ("rules: [{pattern: 'features.*', format: tt, options: {a: 1}}]\n", "no setting 'options'"),
                        ("rules: [{pattern: 'features.*', ranks: [1, 2, 3]}]\n", "plan rule for layer 'features.0'")]:
        plan = tmp_path / "plan.yaml"
        plan.write_text(text)
        _one_error_line(runner.invoke(inspect, [str(cnn_file), "--arch", "seed-cnn", "--plan", str(plan)]), match)


# ---- values interpreted by the library (an architecture, a plan against the model): the same typed error ------
#: Bad values found only where the library interprets them (building an architecture through a third-party
#: constructor, fitting a plan to a model's layers): every command answers them with the flag, exit 2.
BAD_MODEL_VALUES = [
    (["--arch", "nope"], "arch (--arch) 'nope' is unknown"),
    (["--arch", "torchvision:nope"], "arch (--arch) names an unknown torchvision model"),
    (["--arch", "json:dumps"], "arch_kwargs (--arch-kwargs) {} do not fit arch 'json:dumps'"),
    (["--arch", "seed-cnn", "--arch-kwargs", '{"bogus": 1}'], "arch_kwargs (--arch-kwargs) {'bogus': 1"),
    (["--arch", "seed-cnn", "--arch-kwargs", '{"input_size": 3}'], "input_size must be a positive multiple of 4"),
    (["--arch", "seed-fc3", "--arch-kwargs", '{"hidden": [-1]}'], "arch_kwargs (--arch-kwargs)"),
    (["--arch", "torchvision:resnet18", "--arch-kwargs", '{"weights": "nope"}'], "arch_kwargs (--arch-kwargs)"),
]
BAD_PLAN_FITS = [  # each valid alone, not for this model's layers
    (["--arch", "seed-cnn", "--set", "tt.ranks=[1,2,3,4,5,6,7,8,9]"], "tt.ranks (--tt-ranks) (1, 2, 3, 4, 5, 6, 7, 8, 9) do not fit"),
    (["--arch", "seed-cnn", "--set", "tt.ranks=[1,2,2,1]", "--set", "tt.in_modes=[49,10]", "--set", "tt.out_modes=[8,16]",
      "--layers", "classifier.1"], "tt.ranks (--tt-ranks) (1, 2, 2, 1) do not fit layer 'classifier.1'"),
    (["--arch", "seed-cnn", "--target-ratio", "1e9"], "target_ratio (--target-ratio) 1e+09 is out of reach"),
]


def test_values_the_library_interprets_are_one_line_exit_2_in_every_command(cnn_file, tmp_path) -> None:
    """An architecture or a plan that does not fit is refused by the library with a typed error: every
    command that takes it answers with the flag and exit 2, and writes nothing (no caller wraps it)."""
    out = tmp_path / "out"
    for command, extra in [("inspect", []), ("decompose", ["-o", str(out)]), ("decompose", ["--dry-run"])]:
        for args, match in [*BAD_MODEL_VALUES, *BAD_PLAN_FITS]:
            _one_error_line(runner.invoke(load_command(command), [str(cnn_file), *args, *extra]), match)
    for args, match in BAD_MODEL_VALUES[::3]:
        for command, argv in [("train", [*args, "--data", "mnist-5k", "-o", str(out)]),
                              ("finetune", [str(cnn_file), *args, "--data", "mnist-5k", "-o", str(out)]),
                              ("sweep", [str(cnn_file), *args, "--data", "mnist-5k", "--tt-ranks", "4", "-o", str(out)]),
                              ("report", [str(cnn_file), str(cnn_file), *args, "--data", "none", "--input-shape", "1,28,28"])]:
            _one_error_line(runner.invoke(load_command(command), argv), match)
    teacher = ["finetune", str(cnn_file), "--arch", "seed-cnn", "--data", "mnist-5k", "--teacher", str(cnn_file), "-o", str(out)]
    _one_error_line(runner.invoke(load_command("finetune"), [*teacher[1:], "--teacher-arch", "nope"]),
                    "teacher_arch (--teacher-arch) 'nope' is unknown")
    _one_error_line(runner.invoke(load_command("finetune"), [*teacher[1:], "--teacher-arch", "seed-cnn", "--teacher-arch-kwargs",
                                                             '{"bogus": 1}']), "teacher_arch_kwargs (--teacher-arch-kwargs)")
    for args, match in [(["--tt-ranks", "4", "--set", "tt.in_modes=[7,7]"], "layer 'classifier.1' (490 -> 128): in_modes"),
                        (["--target-ratios", "1e9"], "target_ratios (--target-ratios) 1e+09 is out of reach"),
                        (["--target-ratios", "4,0.5"], "target_ratios (--target-ratios) must be a compression factor > 1")]:
        # checked against the baseline before any setting's directory is made
        sweep = [str(cnn_file), "--arch", "seed-cnn", *args, "--data", "mnist-5k", "-o", str(out)]
        _one_error_line(runner.invoke(load_command("sweep"), sweep), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _library_cases(cnn_path: Any) -> list[tuple[Any, str]]:
    """(a call of the Python API with a bad value, the parameter its InputError names)."""
    import ttcompress
    from ttcompress.checkpoint.teacher import load_teacher
    from ttcompress.compression.plan import Plan, plan_layers
    from ttcompress.compression.summary import inspect_file
    from ttcompress.export import export_model
    from ttcompress.formats.tt import TTSettings
    from ttcompress.report.compare import build_report, ModelEntry

    cnn = build_arch("seed-cnn")
    tt = lambda **kw: Plan(tt=TTSettings(**kw))  # noqa: E731
    return [
        (lambda: build_arch("nope"), "arch"), (lambda: build_arch("torchvision:nope"), "arch"),
        (lambda: build_arch("collections:OrderedDict"), "arch"), (lambda: build_arch(""), "arch"),
        (lambda: build_arch("seed-cnn", kwargs={"bogus": 1}), "arch_kwargs"),
        (lambda: build_arch("seed-cnn", kwargs={"input_size": 3}), "arch_kwargs"),
        (lambda: build_arch("seed-cnn", kwargs={"x": object()}), "arch_kwargs"),
        (lambda: build_arch("torchvision:resnet18", kwargs={"weights": "nope"}), "arch_kwargs"),
        (lambda: ttcompress.load(cnn_path, arch="nope"), "arch"),
        (lambda: ttcompress.load(cnn_path, arch="seed-cnn", arch_kwargs={"bogus": 1}), "arch_kwargs"),
        (lambda: ttcompress.load(cnn_path, arch=cnn, arch_kwargs={"num_classes": 3}), "arch_kwargs"),
        (lambda: inspect_file(cnn_path, arch="seed-cnn", arch_kwargs={"input_size": 3}), "arch_kwargs"),
        (lambda: load_teacher(cnn_path, student=cnn, arch="nope"), "teacher_arch"),
        (lambda: load_teacher(cnn_path, student=cnn, arch="seed-cnn", arch_kwargs={"bogus": 1}), "teacher_arch_kwargs"),
        (lambda: load_teacher(cnn_path, student=cnn, arch_kwargs={"num_classes": 3}), "teacher_arch_kwargs"),
        (lambda: plan_layers(cnn, tt(ranks=(1, 2, 3, 4, 5, 6, 7, 8, 9))), "tt.ranks"),
        (lambda: plan_layers(cnn, tt(ranks=(1, 2, 2, 1), in_modes=(49, 10), out_modes=(8, 16))), "tt.ranks"),
        (lambda: ttcompress.compress(build_arch("seed-cnn"), Plan(target_ratio=1e9)), "target_ratio"),
        (lambda: ttcompress.compress(nn.Sequential(nn.Linear(100, 10)), calib_data=torch.randn(4, 7)), "calib_data"),
        (lambda: export_model(nn.Sequential(nn.Linear(4, 2)), cnn_path.with_suffix(".onnx"), format="onnx"), "input_shape"),
        (lambda: build_report(baseline=ModelEntry(label="a", model=nn.Sequential(nn.Linear(4, 2))), models=[],
                              measure_speed=False), "input_shape"),
    ]


def test_values_the_library_interprets_raise_input_errors_through_the_python_api(cnn_file) -> None:
    """The same values through the Python API: an InputError naming the parameter, not a bare ValueError
    or TypeError from a constructor, whoever calls."""
    for i, (case, param) in enumerate(_library_cases(cnn_file)):
        with pytest.raises(UserInputError) as info:
            case()
        assert isinstance(info.value, InputError) and info.value.param == param, (i, param, info.value)
        assert flag_for(param) is not None, param  # and the CLI has a flag for it


# ---- the Python API: a UserInputError (InputError), never another type ---------------------------------------
def _api_cases() -> list[Any]:
    from ttcompress.calibration.budget import check_calib_memory
    from ttcompress.compression.plan import Plan, Rule, plan_layers
    from ttcompress.compression.planfile import plan_from_options
    from ttcompress.formats.cp import CPSettings
    from ttcompress.formats.svd import SVDSettings
    from ttcompress.formats.tt import TTSettings
    from ttcompress.formats.tucker2 import Tucker2Settings
    from ttcompress.sweep import sweep_settings

    cnn = build_arch("seed-cnn")
    return [
        lambda: TTSettings(ranks=0), lambda: TTSettings(eps=1.0), lambda: TTSettings(d=1), lambda: TTSettings(ranks=()),
        lambda: TTSettings(in_modes=[0, 2]), lambda: CPSettings(rank=1, ratio=2.0), lambda: CPSettings(ratio=0.5),
        lambda: CPSettings(options={"tol": object()}), lambda: CPSettings(options={"init": "nope"}), lambda: SVDSettings(ratio=1.0), lambda: SVDSettings(rank=True),
        lambda: Tucker2Settings(ranks=(1, 2, 3)), lambda: Plan(target_ratio=0.5), lambda: Plan(formats=("x",)),
        lambda: Plan(min_saving=2.0), lambda: Plan(max_error=-1.0), lambda: Plan(others="x"),
        lambda: Plan(layers=("",)), lambda: Plan(settings={"svd": {"rank": 0}}), lambda: Plan(settings={"svd": {"x": 1}}),
        lambda: Plan(target_ratio=2.0, tt=TTSettings(ranks=4)), lambda: Rule(""), lambda: Rule("x", format="nope"),
        lambda: Rule("x", format="cp", ranks=(1, 2)), lambda: Rule("x", format="tt", options={"a": 1}),
        lambda: Rule("x", ranks=0), lambda: Rule("x", ranks=2, ratio=3.0), lambda: Rule("x", bogus=1),
        lambda: Plan.from_dict({"bogus": 1}), lambda: Plan.from_dict({"rules": "x"}),
        lambda: Plan.from_dict({"rules": [{"format": "tt"}]}), lambda: plan_from_options(tt_ranks=0),
        lambda: plan_from_options(values={"svd.rank": -1}), lambda: plan_from_options(values={"nope.rank": 1}),
        lambda: plan_from_options(tt_ranks=4, dense=["tt"]), lambda: plan_from_options(dense=["nope"]),
        lambda: check_calib_memory("lots"), lambda: check_calib_memory("1M"), lambda: sweep_settings(tt_ranks=[0]),
        lambda: sweep_settings(values={"svd.rank": [0]}),
        lambda: plan_layers(cnn, Plan(rules=(Rule("features.*", ranks=(1, 2, 3)),))),
        lambda: plan_layers(cnn, Plan(rules=(Rule("classifier.1", format="tt", in_modes=(7, 7), out_modes=(3, 3)),))),
    ]


def test_bad_values_through_the_python_api_raise_user_input_errors() -> None:
    cases = _api_cases()
    assert len(cases) >= 30
    for i, case in enumerate(cases):
        with pytest.raises(UserInputError) as info:
            case()
        assert isinstance(info.value, InputError) and info.value.param, (i, info.value)


def test_flags_come_from_one_table() -> None:
    assert flag_for("tt.ranks") == "--tt-ranks" and flag_for("cp.rank") == "--cp-ranks"
    assert flag_for("svd.rank") == "--svd-rank" and flag_for("tt_ranks") == "--tt-ranks"
    assert flag_for("calib_memory") == "--calib-memory" and flag_for("svd.options") is None
    assert with_flag(InputError("tt.ranks", "must be a positive integer, got 0")) == (
        "tt.ranks (--tt-ranks) must be a positive integer, got 0")
    assert with_flag(InputError("rule 'x'", ": bad")) == "rule 'x': bad"


# ---- a new format: its module and one registration line give it its flag and --set ---------------------------
@dataclass(frozen=True)
class ToySettings:
    """Settings of the toy format (one flagged field, one for --set only)."""

    rank: int | None = setting(group="size", help="Rank of the toy format's Linear layers.", metavar="INT|none")
    scale: float = setting(1.0, kind="float")

    def __post_init__(self) -> None:
        from ttcompress.formats.checks import check_pos_int

        if self.rank is not None:
            check_pos_int(self.rank, "toy.rank")
        if not self.scale > 0:
            raise InputError("toy.scale", f"must be > 0, got {self.scale!r}")


class ToyLinear(nn.Linear):
    """The toy format's layer (only its class matters here: nothing is built)."""


def _toy_format() -> type:
    from ttcompress.formats.base import CompressionFormat, FormatDescription

    class ToyFormat(CompressionFormat):
        name = "toy"
        targets = (nn.Linear,)
        layer_class = ToyLinear
        settings = ToySettings
        summary = "Linear -> toy (a test)"

        def choose(self, module, name, settings, *, aliases=(), lowest=False, settings_of=None):
            rank = 1 if lowest else settings.rank or 2
            out_f, in_f = module.weight.shape
            return self.decision(module, name, {"rank": rank}, rank * (out_f + in_f), aliases, f"toy rank {rank}")

        def build(self, module, options, *, calib=None, name=None):
            raise NotImplementedError

        def describe(self, layer):
            return FormatDescription(self.name, tuple(layer.weight.shape), ())

        def suggest(self, decision):
            return f"toy rank {decision.options['rank']}"

    return ToyFormat


@pytest.fixture()
def toy(monkeypatch):
    """The toy format registered (one line), and the command modules imported after it; undone after the test."""
    from ttcompress.formats import registry

    monkeypatch.setitem(registry._REGISTRY, "toy", _toy_format()())  # what @register_format does
    modules = [importlib.import_module(f"ttcompress.cli.{m}") for m in ("inspect", "decompose", "sweep")]
    for m in modules:
        importlib.reload(m)
    yield
    monkeypatch.undo()
    for m in modules:
        importlib.reload(m)


def test_a_registered_format_gets_its_flag_and_set(toy, cnn_file) -> None:
    assert any(f.flag == "--toy-rank" and f.param == "toy.rank" for f in format_flags())
    inspect = load_command("inspect")
    for args in (["--toy-rank", "3"], ["--set", "toy.rank=3"], ["--set", "toy.rank=3", "--set", "toy.scale=0.5"]):
        result = runner.invoke(inspect, [str(cnn_file), "--arch", "seed-cnn", "--json", *args])
        assert result.exit_code == 0, (result.stdout, result.stderr)
        layers = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
        assert layers["classifier.1"]["suggestion"] == "toy rank 3", layers["classifier.1"]
        assert "not selected" in layers["features.0"]["skipped"]  # the toy option selects the toy format only
    _one_error_line(runner.invoke(inspect, [str(cnn_file), "--arch", "seed-cnn", "--toy-rank", "0"]), "toy.rank (--toy-rank)")
    _one_error_line(runner.invoke(inspect, [str(cnn_file), "--arch", "seed-cnn", "--set", "toy.scale=-1"]), "toy.scale")
    for command in ("decompose", "sweep"):
        assert "--toy-rank" in runner.invoke(load_command(command), ["--help"]).stdout
    from ttcompress.sweep import sweep_settings

    assert [s.key for s in sweep_settings(values={"toy.rank": [2, 4]})] == ["toy-rank2", "toy-rank4"]
