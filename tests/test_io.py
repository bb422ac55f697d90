"""ttcompress.checkpoint.io: every input form round-trips; unsafe pickles are refused; writes are atomic."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from ttcompress.checkpoint import io as tio
from ttcompress.errors import CheckpointError, UnsafePickleError
from ttcompress.checkpoint.io import atomic_write, get_meta, load, load_checkpoint, save, update_meta

ARCH = "seed-cnn"
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tio.build_model(ARCH).eval()


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor = X) -> None:
    """Same weights bit for bit; outputs equal to rounding (an eval-mode layer may pick another exact
    evaluation path by timing)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


class Evil:
    """Unpickling this creates the marker file (stands for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: D105
        return (open, (self.marker, "w"))


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight tensor (built by name: ``tests...:TiedNet``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------
def test_get_meta_defaults_and_copy():
    m = nn.Linear(2, 2)
    assert get_meta(m) == {"arch": None, "layers": {}, "info": {}}
    update_meta(m, arch={"name": "x", "kwargs": {"a": 1}}, info={"k": [1]}, layers={"fc": {"format": "tt"}})
    update_meta(m, info={"j": 2}, layers={"g": {"format": "cp"}})
    meta = get_meta(m)
    assert meta == {"arch": {"name": "x", "kwargs": {"a": 1}}, "layers": {"fc": {"format": "tt"}, "g": {"format": "cp"}},
                    "info": {"k": [1], "j": 2}}
    meta["info"]["k"].append(2)
    assert get_meta(m)["info"]["k"] == [1]  # a deep copy
    assert "ttcompress_meta" not in m.state_dict()


def test_update_meta_rejects_bad_arch():
    with pytest.raises(TypeError, match="arch"):
        update_meta(nn.Linear(2, 2), arch={"kwargs": {}})


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_atomic_write_success_and_failure(tmp_path):
    dest = tmp_path / "sub" / "out.txt"
    with atomic_write(dest, "w") as f:
        f.write("hello")
    assert dest.read_text() == "hello"
    with pytest.raises(RuntimeError):
        with atomic_write(dest, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert dest.read_text() == "hello"  # old content intact
    fresh = tmp_path / "fresh.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(fresh) as f:
            f.write(b"x" * 1000)
            raise KeyboardInterrupt
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out.txt", "sub"]  # no temp files left


def test_atomic_write_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "ab"):
            pass


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tio, "_write_bytes", half_then_fail)
    dest = tmp_path / "model.tt.pt"
    with pytest.raises(OSError, match="simulated"):
        save(_cnn(), dest)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# round trips of every input form
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["pt", "pth-wrapped-state_dict", "wrapped-model", "ddp-prefix", "safetensors"])
def test_state_dict_forms_round_trip(tmp_path, form):
    model = _cnn()
    sd = model.state_dict()
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        obj = {"pt": sd, "pth-wrapped-state_dict": {"state_dict": sd, "epoch": 3},
               "wrapped-model": {"model": sd}, "ddp-prefix": {f"module.{k}": v for k, v in sd.items()}}[form]
        path = tmp_path / ("w.pth" if form.startswith("pth") else "w.pt")
        torch.save(obj, path)
    loaded = load_checkpoint(path, arch=ARCH)
    assert loaded.kind == "state_dict"
    assert get_meta(loaded.model)["arch"] == {"name": ARCH, "kwargs": {}}
    assert not loaded.model.training
    _same(model, loaded.model)


def test_pickled_module_needs_trust(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    path = tmp_path / "mlp.pt"
    torch.save(mlp, path)
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        load(path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert loaded.kind == "pickle"
    assert get_meta(loaded.model)["arch"] is None
    x = torch.randn(2, 8)
    _same(mlp, loaded.model, x)


def test_own_checkpoint_round_trip_is_safetensors(tmp_path):
    model = _cnn()
    update_meta(model, info={"dataset": "mnist-5k"})
    path = save(model, tmp_path / "m.tt.pt", info={"note": "x"})
    assert tio._is_safetensors(path)
    header = tio.read_header(path)
    assert header["format"] == "ttcompress" and header["version"] == 1
    assert header["arch"] == {"name": ARCH, "kwargs": {}}
    loaded = load_checkpoint(path)
    assert loaded.kind == "ttcompress"
    assert get_meta(loaded.model)["info"] == {"dataset": "mnist-5k", "note": "x"}
    assert "note" not in get_meta(model)["info"]  # save's info does not touch the model
    _same(model, loaded.model)
    # Same arch given again is fine; a different one is an error.
    load(path, arch=ARCH)
    with pytest.raises(ValueError, match="self-describing"):
        load(path, arch="lenet5")


def test_arch_kwargs_are_recorded(tmp_path):
    torch.manual_seed(0)
    model = tio.build_model(ARCH, kwargs={"num_classes": 5, "hidden": 32}).eval()
    path = save(model, tmp_path / "m.tt.pt")
    loaded = load(path)
    assert get_meta(loaded)["arch"] == {"name": ARCH, "kwargs": {"num_classes": 5, "hidden": 32}}
    _same(model, loaded)


def test_tied_weights_round_trip(tmp_path):
    name = f"{__name__}:TiedNet"
    torch.manual_seed(0)
    model = tio.build_model(name).eval()
    path = save(model, tmp_path / "tied.tt.pt")
    header = tio.read_header(path)
    assert header["tied"] == {"b.weight": "a.weight"}
    loaded = load(path, arch=name)  # the user names the import path the header records
    assert loaded.a.weight is loaded.b.weight
    x = torch.randn(4, 16)
    _same(model, loaded, x)
    _same(model, load(path, trust_code=True), x)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_unknown_arch_saves_weights_and_plan_and_loads_with_arch(tmp_path):
    """No pickle: a model of unknown architecture is saved as safetensors, rebuilt from ``arch=``."""
    from ttcompress import Plan, TTSettings, compress
    from ttcompress.errors import ArchRequiredError

    torch.manual_seed(0)
    model = compress(_mlp().eval(), Plan(tt=TTSettings(ranks=2)))
    update_meta(model, info={"k": 1})
    path = save(model, tmp_path / "mlp.tt.pt")
    assert tio._is_safetensors(path)
    header = tio.read_header(path)
    assert header["arch"] is None and header["layers"]["0"]["format"] == "tt"
    with pytest.raises(ArchRequiredError, match="arch="):
        load(path)
    with pytest.raises(ArchRequiredError, match="arch="):
        load(path, trust_pickle=True, trust_code=True)  # trust does not make up an architecture
    x = torch.randn(2, 8)
    for arch in (_mlp(), _mlp, f"{__name__}:_mlp"):
        loaded = load_checkpoint(path, arch=arch)
        assert loaded.kind == "ttcompress"
        info = get_meta(loaded.model)["info"]
        assert type(loaded.model[0]) is type(model[0]) and info["k"] == 1
        assert info["plan"] == Plan(tt=TTSettings(ranks=2)).to_dict()  # compress records the plan it applied
        _same(model, loaded.model, x)
    assert get_meta(load(path, arch=f"{__name__}:_mlp"))["arch"]["name"] == f"{__name__}:_mlp"
    skeleton = _mlp()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    load(path, arch=skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())  # the instance is copied
    with pytest.raises(CheckpointError, match="layer '2' does not exist"):
        load(path, arch=nn.Sequential(nn.Linear(8, 16)))  # wrong skeleton: layer '2' missing
    with pytest.raises(CheckpointError, match="layer '2': the architecture has out_features=5, the file's layer 4"):
        load(path, arch=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)))
    with pytest.raises(TypeError, match="not an nn.Module"):
        load(path, arch=lambda: 3)
    with pytest.raises(TypeError, match="arch must be"):
        load(path, arch=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="arch_kwargs"):
        load(path, arch=_mlp(), arch_kwargs={"a": 1})


def test_state_dict_with_module_or_callable_arch(tmp_path):
    torch.manual_seed(0)
    mlp = _mlp().eval()
    torch.save(mlp.state_dict(), tmp_path / "sd.pt")
    for arch in (_mlp(), _mlp):
        _same(mlp, load(tmp_path / "sd.pt", arch=arch), torch.randn(2, 8))


def test_legacy_pickle_checkpoint_needs_trust_pickle(tmp_path):
    """Files written by older versions (torch.save of the module) still load when trusted."""
    torch.manual_seed(0)
    mlp = _mlp().eval()
    path = tmp_path / "old.tt.pt"
    torch.save({"format": "ttcompress", "version": 1, "header": {"info": {"k": 1}}, "model": mlp}, path)
    with pytest.raises(UnsafePickleError):
        load(path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert loaded.kind == "ttcompress-pickle"
    assert get_meta(loaded.model)["info"] == {"k": 1}
    _same(mlp, loaded.model, torch.randn(2, 8))


# ---------------------------------------------------------------------------------------------
# unsafe pickles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["raw-pickle", "torch-save"])
def test_crafted_pickle_is_refused(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "raw-pickle":
        path.write_bytes(pickle.dumps({"state_dict": Evil(marker)}, protocol=4))
    else:
        torch.save({"state_dict": Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="trust-pickle"):
        load(path, arch=ARCH)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    sd = _cnn().state_dict()
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    data = good.read_bytes()
    files = {
        "empty": tmp_path / "empty.pt",
        "garbage": tmp_path / "garbage.pt",
        "truncated-zip": tmp_path / "trunc.pt",
        "bad-safetensors": tmp_path / "bad.safetensors",
        "not-a-state-dict": tmp_path / "list.pt",
    }
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(os.urandom(256))
    files["truncated-zip"].write_bytes(data[: len(data) // 2])
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    files["bad-safetensors"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    torch.save([torch.zeros(2)], files["not-a-state-dict"])
    return files


def test_unreadable_files_raise_checkpoint_error(tmp_path):
    for kind, path in _corrupt_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load(path, arch=ARCH)
        assert "\n" not in str(info.value), kind
        assert isinstance(info.value, CheckpointError) and not isinstance(info.value, UnsafePickleError), kind
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load(tmp_path)


def test_state_dict_mismatches(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_cnn().state_dict(), path)
    with pytest.raises(CheckpointError, match="--arch"):
        load(path)
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): classifier\.5\.weight, classifier\.5\.bias"):
        load(path, arch="lenet5")
    extra = tmp_path / "extra.pt"
    torch.save({**_cnn().state_dict(), "head.weight": torch.zeros(1)}, extra)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): head\.weight"):
        load(extra, arch=ARCH)
    with pytest.raises(CheckpointError, match=r"wrong shape.*classifier\.3\.weight \[10, 128\] vs \[5, 128\]"):
        load(path, arch=ARCH, arch_kwargs={"num_classes": 5})
    with pytest.raises(ValueError, match="unknown"):
        load(path, arch="no-such-arch")


def test_header_from_the_future(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.tt.pt"
    save_file({"w": torch.zeros(1)}, str(path),
              metadata={"format": "ttcompress", "ttcompress": json.dumps({"format": "ttcompress", "version": 99})})
    with pytest.raises(CheckpointError, match="newer"):
        load(path)


@pytest.mark.parametrize("name", ["regnet_x_400mf", "mnasnet0_5"])
def test_torchvision_models_that_do_not_build_on_meta_round_trip(tmp_path, name):
    """RegNet's __init__ reads tensor values (it cannot be built on the meta device) and MNASNet
    needs its state-dict version (safetensors keeps none): both load back and run."""
    import ttcompress
    from ttcompress.compression.plan import Plan, TTSettings

    torch.manual_seed(0)
    model = ttcompress.build_arch(f"torchvision:{name}", kwargs={"num_classes": 10}).eval()
    ttcompress.compress(model, Plan(tt=TTSettings(ranks=2)))
    save(model, tmp_path / "m.tt.pt")
    back = load(tmp_path / "m.tt.pt").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


def test_arch_module_is_imported_outside_the_meta_device(tmp_path, monkeypatch):
    """A module-level tensor of the user's architecture module stays a real tensor after load."""
    import sys

    (tmp_path / "winmod_for_meta_test.py").write_text(
        "import torch\nfrom torch import nn\nWINDOW = torch.hann_window(8)\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(8, 64)\n"
        "    def forward(self, x):\n        return self.fc(x * WINDOW)\n"
        "def make():\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import ttcompress
    from ttcompress.compression.plan import Plan, TTSettings

    model = ttcompress.build_arch("winmod_for_meta_test:make")
    ttcompress.compress(model, Plan(tt=TTSettings(ranks=2)))
    save(model, tmp_path / "w.tt.pt")
    monkeypatch.delitem(sys.modules, "winmod_for_meta_test")  # as in a fresh process
    back = load(tmp_path / "w.tt.pt", arch="winmod_for_meta_test:make")
    assert sys.modules["winmod_for_meta_test"].WINDOW.device.type == "cpu"
    assert back(torch.randn(2, 8)).shape == (2, 64)


@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_archive_is_named_as_such(tmp_path, trust):
    """A torch.jit.save file is neither 'corrupted' nor a model of zero layers: one line says what it is."""
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 3)))
    torch.jit.save(scripted, str(tmp_path / "m_ts.pt"))
    with pytest.raises(CheckpointError, match="TorchScript archive.*state dict"):
        load(tmp_path / "m_ts.pt", trust_pickle=trust)


def test_half_precision_model_loads_with_half_factorized_layers(tmp_path):
    """The rebuilt factorized layers take the stored dtype, like the dense layers beside them."""
    import ttcompress
    from ttcompress.compression.plan import Plan, TTSettings

    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).half()

    model = make()
    ttcompress.compress(model, Plan(tt=TTSettings(ranks=4), layers=("0",)))
    save(model, tmp_path / "h.tt.pt")
    back = load(tmp_path / "h.tt.pt", arch=make)
    assert {p.dtype for p in back.parameters()} == {torch.float16}
    x = torch.randn(3, 64, dtype=torch.float16)
    torch.testing.assert_close(back(x), model(x))
