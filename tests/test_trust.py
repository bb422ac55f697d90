"""The trust boundary: nothing named in a file runs, and every header field is checked before use.

Crafted headers name callables that would create, delete or truncate files, or unpickle; each is
refused by every command that reads a model file (one line, exit 2, no marker). A test-local
factory is accepted when the user names it (``--arch``) or passes ``--trust-code``.
"""

from __future__ import annotations

import json
import pickle
import struct
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.errors import CheckpointError, UntrustedCodeError
from ttcompress.checkpoint.io import load, read_header, save
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.compression.pipeline import compress

runner = CliRunner()
FAST = ["--device", "cpu", "--batch-size", "16", "--max-batches", "1", "--epochs", "1"]


def invoke(*args: Any):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *matches: str, progress: bool = False) -> None:  # noqa: ANN001
    """Exit 2 and one ``error:`` line on stderr (after progress lines, where the command prints them)."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert (progress or len(lines) == 1) and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and sum(line.startswith("error") for line in lines) == 1
    assert all(m in lines[-1] for m in matches), lines[-1]


def rewrite_header(src: Path, dst: Path, mutate: Callable[[dict[str, Any]], Any]) -> Path:
    """Copy a checkpoint, changing its JSON header with ``mutate`` (which edits it in place)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st = json.loads(raw[8 : 8 + n])
    header = json.loads(st["__metadata__"]["ttcompress"])
    mutate(header)
    st["__metadata__"]["ttcompress"] = json.dumps(header)
    blob = json.dumps(st).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    return dst


class _Touch:
    """Pickles to ``open(path, "w")``: unpickling it creates the marker."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save(build_arch("seed-cnn", kwargs={"hidden": 16}), tmp_path_factory.mktemp("trust") / "base.tt.pt")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = compress(build_arch("seed-cnn", kwargs={"hidden": 32}), Plan(tt=TTSettings(ranks=2), cp=CPSettings(rank=2)))
    return save(model, tmp_path_factory.mktemp("trust") / "small.tt.pt")


EVIL = ["subprocess:run", "shutil:rmtree", "os:remove", "builtins:open", "torch:load"]


def evil_arch(name: str, tmp: Path) -> tuple[dict[str, Any], Callable[[], bool]]:
    """A header arch naming ``name``, and a check that its side effect did not happen."""
    marker, victim = tmp / "MARKER", tmp / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("keep")
    kwargs: dict[str, Any] = {
        "subprocess:run": {"args": ["touch", str(marker)]},
        "shutil:rmtree": {"path": str(victim)},
        "os:remove": {"path": str(victim / "keep.txt")},
        "builtins:open": {"file": str(victim / "keep.txt"), "mode": "w"},
        "torch:load": {"f": str(tmp / "payload.pkl"), "weights_only": False},
    }[name]
    with open(tmp / "payload.pkl", "wb") as f:
        pickle.dump(_Touch(marker), f)
    return {"name": name, "kwargs": kwargs}, lambda: not marker.exists() and (victim / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("name", EVIL)
def test_header_named_callable_is_refused_by_load(name: str, base: Path, tmp_path: Path) -> None:
    arch, untouched = evil_arch(name, tmp_path)
    evil = rewrite_header(base, tmp_path / "evil.tt.pt", lambda h: h.update(arch=arch))
    with pytest.raises(UntrustedCodeError, match="trust_code=True") as info:
        load(evil)
    assert "header field arch.name" in str(info.value) and "--trust-code" in str(info.value)
    with pytest.raises(UntrustedCodeError):
        load(evil, trust_pickle=True)  # trusting pickles is not trusting code
    assert untouched()


@pytest.mark.parametrize("name", EVIL)
@pytest.mark.parametrize("command", ["inspect", "report", "report-baseline", "finetune", "finetune-teacher"])
def test_header_named_callable_is_refused_by_every_command(name: str, command: str, base: Path, tmp_path: Path) -> None:
    arch, untouched = evil_arch(name, tmp_path)
    evil = rewrite_header(base, tmp_path / "evil.tt.pt", lambda h: h.update(arch=arch))
    out = tmp_path / "out.pt"
    args = {
        "inspect": ["inspect", evil],
        "report": ["report", base, evil, "--no-latency", "--eval-limit", "8"],
        "report-baseline": ["report", evil, base, "--no-latency", "--eval-limit", "8"],
        "finetune": ["finetune", evil, "-o", out, *FAST],
        "finetune-teacher": ["finetune", base, "--teacher", evil, "-o", out, *FAST],
    }[command]
    assert_one_line_error(invoke(*args), "names the import path", "--trust-code")
    assert untouched() and not out.exists()


def test_sweep_refuses_a_cached_model_whose_header_names_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    baseline = save(build_arch("seed-cnn", kwargs={"hidden": 16}), tmp_path / "base.pt")
    out = tmp_path / "sweep"
    args = ["sweep", baseline, "--tt-ranks", "2", "--cp-ranks", "none", "-o", out, "--no-latency", *FAST]
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    cached = [p for p in out.rglob("*.pt") if read_header(p) is not None]
    assert cached
    arch, untouched = evil_arch("subprocess:run", tmp_path)
    for p in cached:
        rewrite_header(p, p, lambda h: h.update(arch=arch))
    assert_one_line_error(invoke(*args), "names the import path", progress=True)
    assert untouched()


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's own architecture module, importable for this test only."""
    (tmp_path / "trustmod_ttc.py").write_text(textwrap.dedent("""
        from torch import nn

        def net(width=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "trustmod_ttc:net"


def test_user_named_factory_is_allowed_by_arch_or_trust_code(factory: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_arch(factory, kwargs={"width": 4})  # Python arch= is the user naming it
    ckpt = save(model, tmp_path / "own.tt.pt")
    assert_one_line_error(invoke("inspect", ckpt), "trustmod_ttc:net", "--trust-code")
    assert invoke("inspect", ckpt, "--trust-code").exit_code == 0
    assert invoke("inspect", ckpt, "--arch", factory).exit_code == 0
    x = torch.randn(2, 1, 28, 28)
    for loaded in (load(ckpt, trust_code=True), load(ckpt, arch=factory)):
        torch.testing.assert_close(loaded(x), model.eval()(x))
    report = invoke("report", ckpt, ckpt, "--arch", factory, "--no-latency", "--eval-limit", "8")
    assert report.exit_code == 0, report.stderr
    finetune = invoke("finetune", ckpt, "--trust-code", "-o", tmp_path / "ft.pt", *FAST)
    assert finetune.exit_code == 0, finetune.stderr
    # a bare state dict names no code: --arch does
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    result = invoke("inspect", tmp_path / "sd.pth", "--arch", factory, "--arch-kwargs", '{"width": 4}')
    assert result.exit_code == 0, result.stderr


def _layer(h: dict[str, Any], fmt: str) -> dict[str, Any]:
    return next(r for r in h["layers"].values() if r["format"] == fmt)


BAD_HEADERS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("record-str", lambda h: h["layers"].update({next(iter(h["layers"])): "tt"}), "record must be an object"),
    ("record-none", lambda h: h["layers"].update({next(iter(h["layers"])): None}), "record must be an object"),
    ("unknown-format", lambda h: _layer(h, "tt").update(format="xx"), "unknown format 'xx'"),
    ("device-cuda", lambda h: _layer(h, "tt")["config"].update(device="cuda"), "'device' is refused"),
    ("device-meta", lambda h: _layer(h, "cp")["config"].update(device="meta"), "'device' is refused"),
    ("dtype", lambda h: _layer(h, "cp")["config"].update(dtype="float64"), "'dtype' is refused"),
    ("arch-device", lambda h: h["arch"]["kwargs"].update(device="meta"), "arch.kwargs.device is refused"),
    ("arch-weights", lambda h: h["arch"]["kwargs"].update(weights="DEFAULT"), "arch.kwargs.weights is refused"),
    ("unknown-config", lambda h: _layer(h, "tt")["config"].update(weights_only=False), "unknown field 'weights_only'"),
    ("huge-cp-rank", lambda h: _layer(h, "cp")["config"].update(rank=2 * 10**7), "does not match the file"),
    ("huge-tt-rank", lambda h: _layer(h, "tt")["config"]["ranks"].__setitem__(1, 10**6), "does not match the file"),
    ("core-1e12", lambda h: _layer(h, "tt")["config"].update(ranks=[1, 10**12, 1]), "out of range"),
    ("zero-size", lambda h: _layer(h, "cp")["config"].update(out_channels=0), "cannot rebuild layer"),
    ("negative-rank", lambda h: _layer(h, "cp")["config"].update(rank=-3), "cannot rebuild layer"),
    ("num-classes-str", lambda h: h["arch"]["kwargs"].update(num_classes="ten"), "cannot build arch"),
    ("arch-str", lambda h: h.update(arch="seed-cnn"), "arch must be an object"),
    ("kwargs-list", lambda h: h["arch"].update(kwargs=[1]), "arch.kwargs must be an object"),
    ("unknown-arch", lambda h: h["arch"].update(name="no-such-net"), "cannot build arch"),
    ("version-str", lambda h: h.update(version="1"), "version must be a positive int"),
    ("version-new", lambda h: h.update(version=99), "newer than"),
    ("layers-list", lambda h: h.update(layers=[]), "layers must be an object"),
    ("tied-missing", lambda h: h.update(tied={"x.weight": "nope"}), "not in the file"),
    ("rel-error-str", lambda h: _layer(h, "tt").update(rel_error="0.1"), "rel_error must be a non-negative number"),
    ("input-shape", lambda h: h["info"].update(input_shape=[10**6, 10**6]), "info.input_shape"),
    ("deep-info", lambda h: h["info"].update(deep=json.loads("[" * 40 + "]" * 40)), "nested deeper"),
    ("no-layer", lambda h: h["layers"].update({"nope": dict(_layer(h, "tt"))}), "does not exist"),
]


@pytest.mark.parametrize(("case", "mutate", "match"), BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_bad_header_fields_get_one_line(case: str, mutate: Callable[[dict[str, Any]], Any], match: str,
                                        compressed: Path, tmp_path: Path) -> None:  # fmt: skip
    bad = rewrite_header(compressed, tmp_path / "bad.tt.pt", mutate)
    with pytest.raises(CheckpointError, match=match.replace("(", r"\(")):
        load(bad)
    assert_one_line_error(invoke("inspect", bad), match)


def test_sizes_are_checked_against_the_file_before_allocating(base: Path, compressed: Path, tmp_path: Path) -> None:
    huge = {"num_classes": 10**9}
    bad = rewrite_header(base, tmp_path / "bad.tt.pt", lambda h: h["arch"]["kwargs"].update(huge))
    assert_one_line_error(invoke("inspect", bad), "does not match the file", "16,000,000,000 elements")
    # in a compressed model the dense classifier is replaced: its recorded size is never allocated
    odd = rewrite_header(compressed, tmp_path / "odd.tt.pt", lambda h: h["arch"]["kwargs"].update(huge, hidden=32))
    assert load(odd)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_missing_and_extra_tensors_name_the_layer(compressed: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(compressed), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layer = next(n for n, r in json.loads(meta["ttcompress"])["layers"].items() if r["format"] == "cp")
    missing = {k: v for k, v in tensors.items() if k != f"{layer}.kh_factor"}
    save_file(missing, tmp_path / "missing.tt.pt", metadata=meta)
    with pytest.raises(CheckpointError, match=f"layer '{layer}' needs tensor '{layer}.kh_factor'"):
        load(tmp_path / "missing.tt.pt")
    save_file({**tensors, f"{layer}.extra": torch.zeros(2)}, tmp_path / "extra.tt.pt", metadata=meta)
    with pytest.raises(CheckpointError, match=f"layer '{layer}' does not match the file: 1 tensor"):
        load(tmp_path / "extra.tt.pt")


def test_saved_configs_hold_no_build_fields(compressed: Path) -> None:
    header = read_header(compressed)
    for record in header["layers"].values():
        assert not {"device", "dtype"} & set(record["config"])


class _ArrayBomb:
    """Pickles to a NumPy array declaring ``shape`` but carrying only ``raw``."""

    def __init__(self, shape: tuple[int, ...], raw: bytes, start: tuple[int, ...] = (0,)) -> None:
        self.shape, self.raw, self.start = shape, raw, start

    def __reduce__(self) -> tuple[Any, ...]:
        import numpy as np

        return (np.ndarray.__reduce__(np.zeros(0, np.uint8))[0], (np.ndarray, self.start, b"b"),
                (1, self.shape, np.dtype(np.uint8), False, self.raw))  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_ArrayBomb((10**9, 3072), b"\0" * 16), "bytes are present"),
        (_ArrayBomb((0,), b"", start=(10**9, 3072)), "refusing array reconstruction"),
        (_Touch(Path("MARKER")), "refusing to load"),
    ],
    ids=["declared-shape", "reconstruct-shape", "code"],
)
def test_cifar10_batches_are_bounded_by_their_bytes(payload: Any, match: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from ttcompress.data import load_dataset
    from ttcompress.errors import DataError

    monkeypatch.chdir(tmp_path)
    blob = pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2)
    assert len(blob) < 400
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match=match):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "aliases"),
        ("!!python/object/apply:os.system ['touch MARKER']\n", "could not determine a constructor"),
        ("tt: !!python/object:builtins.dict {}\n", "could not determine a constructor"),
        ("[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    ],
    ids=["alias-bomb", "python-apply", "python-object", "deep"],
)
def test_plan_files_are_safe_yaml_without_aliases(text: str, match: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from ttcompress.compression.planfile import load_plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_plan(tmp_path / "plan.yaml")
    assert not (tmp_path / "MARKER").exists()


def test_model_built_for_real_is_capped_by_the_file(tmp_path: Path) -> None:
    """RegNet cannot be built on the meta device, so it is built for real: a header whose kwargs ask
    for 10^9 classes is refused before that allocation, not after (or by the OOM killer)."""
    torch.manual_seed(0)
    model = build_arch("torchvision:regnet_x_400mf", kwargs={"num_classes": 10})
    compress(model, Plan(tt=TTSettings(ranks=2)))
    good = save(model, tmp_path / "r.tt.pt")
    assert type(load(good)).__name__ == "RegNet"

    def mutate(h: dict[str, Any]) -> None:
        h["arch"]["kwargs"]["num_classes"] = 10**9

    bad = rewrite_header(good, tmp_path / "bad.tt.pt", mutate)
    with pytest.raises(CheckpointError, match="num_classes = 1000000000 exceeds every dimension"):
        load(bad)


def test_allocation_cap_refuses_before_allocating() -> None:
    from ttcompress.checkpoint.rebuild import _AllocationCap

    with _AllocationCap(10_000, Path("f.tt.pt")):
        torch.nn.Linear(50, 50)  # 2,550 elements: fine
        with pytest.raises(CheckpointError, match="more than the file holds"):
            torch.nn.Linear(10**6, 10**6)  # would be 4 TB: refused before the allocation
