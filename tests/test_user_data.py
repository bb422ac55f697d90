"""The user's own data and metric: ``--data package.module:callable``, ``--data tensors:FILE``,
label-free distillation (KL on class logits, MSE otherwise) and ``report --metric``.

The data factories live in a small module written to a temporary directory put on ``sys.path``,
as a user's own package would be.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from ttcompress.cli import app
from ttcompress.data import balanced_subset, load_dataset, user_bundle
from ttcompress.errors import DataError, UserInputError
from ttcompress.report.evaluation import distill_loss
from ttcompress.checkpoint.io import load, save, update_meta
from ttcompress.checkpoint.models import build_arch
from ttcompress.training import FinetuneConfig, finetune
from ttcompress.training.loop import distill_kind, holdout_split

runner = CliRunner()
FAST = ["--device", "cpu", "--batch-size", "12", "--epochs", "1"]  # no batch of 1 for BatchNorm
MOD = "ttc_userdata_factory"

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def _xy(n=80, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()   # 3 classes, learnable

    def classes():
        return TensorDataset(*_xy())

    def pair():
        return TensorDataset(*_xy(60, 1)), TensorDataset(*_xy(20, 2))

    def loaders():
        return DataLoader(TensorDataset(*_xy(60, 1)), batch_size=7), DataLoader(TensorDataset(*_xy(20, 2)))

    def unlabelled():
        return TensorDataset(_xy(50, 3)[0])

    def regression():
        x = _xy(50, 4)[0]
        return TensorDataset(x, x[:, :3] * 2.0)

    def wrong_type():
        return {"x": 1}

    def raises():
        raise RuntimeError("no data today")

    def reg_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def mean_abs(outputs, targets):
        return float(outputs.abs().mean())

    def r2(outputs, targets):
        return float(1 - ((outputs - targets) ** 2).sum() / ((targets - targets.mean(0)) ** 2).sum())

    def bad_metric(outputs, targets):
        return "high"
''')


@pytest.fixture(scope="module", autouse=True)
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("userpkg")
    (d / f"{MOD}.py").write_text(FACTORY, encoding="utf-8")
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        sys.path.remove(str(d))
        sys.modules.pop(MOD, None)


def invoke(*args: object):  # noqa: ANN201 - click Result
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, match: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert result.stdout == ""


def _xy(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def write_tensors(path: Path, *, targets: bool = True, x_key: str = "inputs", y_key: str = "targets") -> Path:
    x, y = _xy()
    arrays = {x_key: x, **({y_key: y} if targets else {})}
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    elif path.suffix == ".safetensors":
        save_file(arrays, str(path))
    else:
        torch.save(arrays, path)
    return path


def fc(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_arch("seed-fc3", kwargs={"num_classes": num_classes, "in_features": 8, "hidden": [16]})


# ------------------------------------------------------------------------------------ loading


def test_callable_single_dataset_is_split_90_10_with_a_fixed_seed() -> None:
    a, b = load_dataset(f"{MOD}:classes"), load_dataset(f"{MOD}:classes")
    assert (len(a.train), len(a.test)) == (72, 8)
    assert a.train.indices == b.train.indices and not set(a.train.indices) & set(a.test.indices)
    assert a.split is not None and "90/10" in a.split and "seed 0" in a.split
    assert (a.num_classes, a.input_shape, a.targets) == (3, (8,), "class")
    assert a.info()["split"] == a.split


@pytest.mark.parametrize("name", ["pair", "loaders"])
def test_callable_pair_and_loaders_keep_their_splits(name: str) -> None:
    b = load_dataset(f"{MOD}:{name}")
    assert (len(b.train), len(b.test), b.split, b.num_classes) == (60, 20, None, 3)


@pytest.mark.parametrize(("name", "targets"), [("unlabelled", "none"), ("regression", "regression")])
def test_callable_without_class_labels(name: str, targets: str) -> None:
    b = load_dataset(f"{MOD}:{name}")
    assert (b.targets, b.num_classes, b.classes, b.has_labels) == (targets, None, (), False)


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
@pytest.mark.parametrize("keys", [("inputs", "targets"), ("x", "y")])
def test_tensors_file_every_format(tmp_path: Path, suffix: str, keys: tuple[str, str]) -> None:
    path = write_tensors(tmp_path / f"d{suffix}", x_key=keys[0], y_key=keys[1])
    b = load_dataset(f"tensors:{path}")
    x, y = _xy()
    assert (len(b.train) + len(b.test), b.num_classes, b.input_shape) == (80, 3, (8,))
    i = b.test.indices[0]
    assert torch.equal(b.test[0][0], x[i]) and int(b.test[0][1]) == int(y[i])


def test_tensors_file_without_targets_is_unlabelled(tmp_path: Path) -> None:
    b = load_dataset(f"tensors:{write_tensors(tmp_path / 'd.npz', targets=False)}")
    assert b.targets == "none" and b.num_classes is None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: torch.save({"targets": torch.zeros(3)}, p / "t.pt") or p / "t.pt", "has no inputs"),
        (lambda p: np.savez(p / "o.npz", inputs=np.array([{"a": 1}], dtype=object)) or p / "o.npz", "object array"),
        (lambda p: torch.save({"inputs": torch.zeros(4, 2), "targets": torch.zeros(3)}, p / "m.pt") or p / "m.pt",
         "do not match"),
        (lambda p: (p / "e.csv").write_text("1,2") and p / "e.csv", "must end in"),
    ],
    ids=["no-inputs", "npz-object", "length-mismatch", "extension"],
)
def test_bad_tensors_files(tmp_path: Path, make, match: str) -> None:  # noqa: ANN001
    with pytest.raises(DataError, match=match):
        load_dataset(f"tensors:{make(tmp_path)}")


def test_npz_declaring_more_bytes_than_present_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**9,)}  # 8 GB declared, 16 bytes present
    np.lib.format.write_array_header_1_0(buf, header)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("inputs.npy", buf.getvalue() + b"\0" * 16)
    with pytest.raises(DataError, match="declares shape"):
        load_dataset(f"tensors:{path}")


@pytest.mark.parametrize(
    ("name", "match"),
    [("wrong_type", "must be a map-style Dataset"), ("raises", "no data today"),
     ("absent", "has no attribute"), ("ttc_no_such_module_x:f", "cannot import")],
)
def test_bad_callables(name: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(name if ":" in name else f"{MOD}:{name}")


def test_user_bundle_refuses_a_triple() -> None:
    with pytest.raises(DataError, match=r"\(train, test\) pair"):
        user_bundle((1, 2, 3))


# ------------------------------------------------------------------------ label-free distillation


def test_distill_loss_reference_values() -> None:
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 3.0]])
    temp = 2.0
    p, q = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    kl = float((p * (p.log() - q.log())).sum() * temp * temp)
    assert distill_loss(s, t, kind="kl", temperature=temp).item() == pytest.approx(kl, rel=1e-6)
    assert distill_loss(s, t, kind="mse").item() == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)


def test_distill_loss_kl_on_sequence_logits_is_the_mean_per_token_kl() -> None:
    """(batch, positions, vocab): KL over the vocabulary at each position, averaged per sample."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    temp = 1.5
    p, logq = torch.softmax(t / temp, -1), torch.log_softmax(s / temp, -1)
    per_token = (p * (p.log() - logq)).sum(-1) * temp * temp  # (3, 5)
    got = distill_loss(s, t, kind="kl", temperature=temp)
    assert got.item() == pytest.approx(float(per_token.mean()), rel=1e-6)
    summed = distill_loss(s, t, kind="kl", temperature=temp, reduction="sum")
    assert summed.item() == pytest.approx(float(per_token.mean(1).sum()), rel=1e-6)
    # 2-D logits are the one-position case
    assert distill_loss(s[:, 0], t[:, 0], kind="kl", temperature=temp).item() == pytest.approx(
        float(per_token[:, 0].mean()), rel=1e-6)


class _Outputs(nn.Module):
    """Returns ``{field: (batch, 4, 6) values}``, as a transformers ``ModelOutput`` does."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self.field = field
        self.proj = nn.Linear(8, 4 * 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.field: self.proj(x).view(-1, 4, 6)}


def test_auto_picks_kl_for_sequence_logits_fields_only() -> None:
    unlabelled = load_dataset(f"{MOD}:unlabelled")
    assert distill_kind(_Outputs("logits"), _Outputs("logits"), unlabelled) == "kl"
    assert distill_kind(_Outputs("last_hidden_state"), _Outputs("last_hidden_state"), unlabelled) == "mse"
    assert distill_kind(_Outputs("last_hidden_state"), _Outputs("last_hidden_state"), unlabelled,
                        choice="kl") == "kl"


def test_kl_refuses_outputs_without_a_class_dimension() -> None:
    class Maps(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, 1, 1, 8).expand(-1, 2, 2, 8)

    with pytest.raises(UserInputError, match="class logits over the last dimension"):
        distill_kind(Maps(), Maps(), load_dataset(f"{MOD}:unlabelled"), choice="kl")


def _perturbed(model: nn.Module) -> nn.Module:
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return student


@pytest.mark.parametrize("kind", ["regression-mse", "classifier-kl"])
def test_label_free_distillation_reduces_the_distillation_loss(tmp_path: Path, kind: str) -> None:
    if kind == "regression-mse":
        teacher = build_arch(f"{MOD}:reg_model")
    else:
        teacher = fc()
        update_meta(teacher, info={"num_classes": 3})  # trained on 3 classes, as train records
    torch.manual_seed(1)
    student = _perturbed(teacher)
    before = copy.deepcopy(student)
    bundle = load_dataset(f"{MOD}:unlabelled")
    config = FinetuneConfig(epochs=6, batch_size=8, lr=3e-3, schedule="none", device="cpu", val_fraction=0.2)
    result = finetune(student, bundle, output=tmp_path / "s.pt", config=config, teacher=teacher)
    losses = [r.val_loss for r in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(r.val_accuracy is None and r.train_accuracy is None for r in result.history)
    assert result.best_accuracy is None
    # the recorded validation loss is the distillation loss of the kind auto picks, on the held-out part
    _, val = holdout_split(bundle, fraction=0.2)
    x = torch.stack([val[i][0] for i in range(len(val))])
    want = "mse" if kind == "regression-mse" else "kl"
    best = load(tmp_path / "s.pt", trust_code=True).eval()
    with torch.no_grad():
        recorded = next(r.val_loss for r in result.history if r.epoch == result.best_epoch)
        assert distill_loss(best(x), teacher(x), kind=want).item() == pytest.approx(recorded, rel=1e-4)
        assert distill_loss(best(x), teacher(x), kind=want) < distill_loss(before(x), teacher(x), kind=want)
    metrics = [json.loads(line) for line in (tmp_path / "s.metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["val_accuracy"] is None for m in metrics)


def test_label_free_needs_a_teacher(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no targets"):
        finetune(fc(), load_dataset(f"{MOD}:unlabelled"), output=tmp_path / "s.pt",
                 config=FinetuneConfig(epochs=1, device="cpu"))  # fmt: skip
    assert not (tmp_path / "s.pt").exists()


def test_auto_picks_kl_for_labelled_logits_and_mse_for_regression() -> None:
    labelled, unlabelled = load_dataset(f"{MOD}:classes"), load_dataset(f"{MOD}:unlabelled")
    assert distill_kind(fc(), fc(), labelled) == "kl"
    assert distill_kind(fc(), fc(), unlabelled) == "mse"  # no labels, no recorded classes
    reg = build_arch(f"{MOD}:reg_model")
    assert distill_kind(reg, reg, load_dataset(f"{MOD}:regression")) == "mse"
    assert distill_kind(reg, reg, unlabelled, choice="kl") == "kl"


# ------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def fc_file(tmp_path: Path) -> Path:
    path = tmp_path / "fc.pt"
    save(fc(), path)
    return path


@pytest.mark.parametrize("data", ["callable", "tensors"])
def test_train_finetune_report_sweep_on_user_data(tmp_path: Path, fc_file: Path, data: str) -> None:
    spec = f"{MOD}:classes" if data == "callable" else f"tensors:{write_tensors(tmp_path / 'd.safetensors')}"
    r = invoke("train", "--arch", "seed-fc3", "--arch-kwargs", '{"hidden": [16]}', "--data", spec, *FAST,
               "-o", tmp_path / "t.pt")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert load(tmp_path / "t.pt").ttcompress_meta["info"]["num_classes"] == 3
    r = invoke("finetune", fc_file, "--data", spec, *FAST, "-o", tmp_path / "f.pt")
    assert r.exit_code == 0, r.stderr
    r = invoke("report", fc_file, tmp_path / "f.pt", "--data", spec, "--no-latency", "-f", "json",
               "--metric", f"{MOD}:mean_abs")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["meta"]["metric"] == f"{MOD}:mean_abs" and "90/10" in rep["meta"]["data_split"]
    assert all(row["accuracy"] is not None and row["metric"] > 0 for row in rep["rows"])
    r = invoke("sweep", fc_file, "--tt-ranks", "2", "--data", spec, "--epochs", "1", "--batch-size", "12",
               "--device", "cpu", "-o", tmp_path / "sw", "-f", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["rows"]) == 2


def test_cli_label_free_finetune_and_metric_instead_of_top1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = build_arch(f"{MOD}:reg_model")
    save(teacher, tmp_path / "teacher.pt")
    save(_perturbed(teacher), tmp_path / "student.pt")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(9))
    np.savez(tmp_path / "x.npz", x=x.numpy())
    spec = f"tensors:{tmp_path / 'x.npz'}"
    r = invoke("finetune", tmp_path / "student.pt", "--data", spec, "--teacher", tmp_path / "teacher.pt",
               "--trust-code", *FAST, "-o", tmp_path / "ft.pt", "--json")  # our own files  # fmt: skip
    assert r.exit_code == 0, r.stderr
    history = json.loads(r.stdout)["history"]
    assert history[0]["val_accuracy"] is None and history[0]["val_loss"] > 0
    assert "no class labels" in r.stderr
    for fmt in ("json", "csv", "md"):
        r = invoke("report", tmp_path / "teacher.pt", tmp_path / "ft.pt", "--arch", f"{MOD}:reg_model",
                   "--data", spec, "--metric", f"{MOD}:mean_abs", "--no-latency", "-f", fmt)  # fmt: skip
        assert r.exit_code == 0, r.stderr
        if fmt == "json":
            rows = json.loads(r.stdout)["rows"]
            assert [row["accuracy"] for row in rows] == [None, None]
            test = load_dataset(spec).test
            with torch.no_grad():
                want = float(teacher(test.dataset.tensors[0][test.indices]).abs().mean())
            assert rows[0]["metric"] == pytest.approx(want, rel=1e-5)
        elif fmt == "csv":
            assert r.stdout.splitlines()[0].endswith(",metric")
        else:
            assert f"| {MOD}:mean_abs |" in r.stdout and "top-1 |" not in r.stdout


def test_report_metric_on_regression_targets(tmp_path: Path) -> None:
    save(build_arch(f"{MOD}:reg_model"), tmp_path / "m.pt")
    r = invoke("report", tmp_path / "m.pt", tmp_path / "m.pt", "--arch", f"{MOD}:reg_model", "--data",
               f"{MOD}:regression", "--metric", f"{MOD}:r2", "--no-latency", "-f", "json", "--labels", "a,b")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert rows[0]["metric"] == rows[1]["metric"] < 1 and rows[0]["accuracy"] is None


@pytest.mark.parametrize(
    ("data", "match"),
    [(f"{MOD}:wrong_type", "map-style Dataset"), (f"{MOD}:raises", "no data today"),
     ("tensors:{tmp}/noinputs.pt", "has no inputs"), ("tensors:{tmp}/obj.npz", "object array")],
    ids=["wrong-type", "raises", "no-inputs", "npz-object"],
)
@pytest.mark.parametrize("command", ["train", "finetune", "report", "sweep"])
def test_cli_bad_data_is_one_line_exit_2_no_output(tmp_path: Path, fc_file: Path, data: str, match: str,
                                                   command: str) -> None:  # fmt: skip
    torch.save({"targets": torch.zeros(3)}, tmp_path / "noinputs.pt")
    np.savez(tmp_path / "obj.npz", inputs=np.array([None, 1], dtype=object))
    data = data.format(tmp=tmp_path)
    out = tmp_path / "out.pt"
    args = {
        "train": ["train", "--arch", "seed-fc3", *FAST, "-o", out],
        "finetune": ["finetune", fc_file, *FAST, "-o", out],
        "report": ["report", fc_file, fc_file, "--no-latency", "-o", tmp_path / "out.json"],
        "sweep": ["sweep", fc_file, "--tt-ranks", "2", "--device", "cpu", "-o", tmp_path / "sw"],
    }[command]
    assert_user_error(invoke(*args, "--data", data), match)
    assert not out.exists() and not (tmp_path / "out.json").exists() and not (tmp_path / "sw").exists()


def test_cli_bad_metric_and_label_free_without_teacher(tmp_path: Path, fc_file: Path) -> None:
    spec = f"{MOD}:classes"
    assert_user_error(invoke("report", fc_file, fc_file, "--data", spec, "--no-latency", "--metric",
                             f"{MOD}:bad_metric", "-o", tmp_path / "r.json"), "must return a number")  # fmt: skip
    assert_user_error(invoke("report", fc_file, fc_file, "--data", spec, "--metric", "nope_mod_x:f"), "cannot import")
    assert not (tmp_path / "r.json").exists()
    assert_user_error(invoke("finetune", fc_file, "--data", f"{MOD}:unlabelled", *FAST, "-o", tmp_path / "f.pt"),
                      "needs a teacher")
    assert not (tmp_path / "f.pt").exists()
    assert_user_error(invoke("sweep", fc_file, "--tt-ranks", "2", "--data", f"{MOD}:unlabelled", "--device", "cpu",
                             "-o", tmp_path / "sw"), "no class labels")  # fmt: skip
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("labelled", [True, False])
def test_calibration_takes_user_data_inputs(tmp_path: Path, labelled: bool) -> None:
    """Calibration reads inputs only: both forms give the stored inputs, labels or not."""
    from ttcompress.calibration.data import calib_batches

    spec = f"tensors:{write_tensors(tmp_path / 'c.npz', targets=labelled)}"
    for bundle in (load_dataset(spec), load_dataset(f"{MOD}:{'classes' if labelled else 'unlabelled'}")):
        subset = balanced_subset(bundle.train, 20, seed=0)
        x = torch.cat(list(calib_batches(subset)))
        assert x.shape == (20, 8)
        assert torch.equal(x[0], bundle.train[subset.indices[0]][0])
