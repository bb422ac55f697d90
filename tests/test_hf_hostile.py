"""Hostile and broken Hugging Face directories, config values and recorded paths (issue 20).

Each case is one ``error:`` line and exit code 2, at once: no hang on a FIFO or ``/dev/zero``, no
allocation sized by a number in a file before it is checked, no traceback. Every test runs under
a deadline (SIGALRM), so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from ttcompress.cli import app  # noqa: E402
from ttcompress.errors import CheckpointError  # noqa: E402
from ttcompress.checkpoint.io import load  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer") or not hasattr(os, "mkfifo"),
                                reason="needs SIGALRM and FIFOs (POSIX)")

runner = CliRunner()


class Hung(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (raise :class:`Hung`) if the block runs longer than ``seconds``."""
    def alarm(*_: object) -> None:
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def invoke(*args: object, seconds: float = 30):  # noqa: ANN201 - click Result
    with deadline(seconds):
        return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, match: str) -> None:  # noqa: ANN001
    """Exit 2, exactly one ``error:`` line on stderr containing ``match``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _gpt2_config(**overrides: object) -> transformers.GPT2Config:
    kw = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**kw, **overrides})


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    transformers.GPT2LMHeadModel(_gpt2_config()).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def gpt2_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence classifier with 3 labels (``score.weight`` is ``(3, 16)``)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "gpt2-cls"
    model = transformers.GPT2ForSequenceClassification(_gpt2_config(num_labels=3, pad_token_id=0))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def _replace(path: Path, kind: str) -> None:
    """Replace a file by a FIFO, a symlink to /dev/zero, a directory or an oversized file."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "oversized":
        with open(path, "wb") as f:  # sparse: no disk used
            f.truncate(17 << 20)


# --------------------------------------------------------------------------------------------------
# Defect 6: JSON files of a directory (and plan files) are regular files, size-capped
# --------------------------------------------------------------------------------------------------
KINDS = {"fifo": "a FIFO", "dev-zero": "a device", "directory": "a directory", "oversized": "larger than 16 MiB"}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["config.json", "ttcompress.json", "model.safetensors.index.json"])
def test_json_files_of_a_directory_are_regular_and_capped(gpt2, tmp_path, name, kind):
    d = _copy(gpt2, tmp_path / "d")
    if name != "config.json":
        (d / name).write_text("{}")
    if name == "model.safetensors.index.json":  # sharded: the index is read for the shard names
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    _replace(d / name, kind)
    start = time.monotonic()
    with deadline(20), pytest.raises(CheckpointError, match=KINDS[kind]):
        load(d)
    assert_refused(invoke("inspect", d), KINDS[kind])
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "oversized"])
def test_plan_files_are_regular_and_capped(tmp_path, kind):
    from ttcompress.compression.planfile import load_plan

    plan = tmp_path / "plan.yaml"
    plan.write_text("tt: {ranks: 2}\n")
    _replace(plan, kind)
    with deadline(10), pytest.raises(ValueError, match=KINDS[kind]):
        load_plan(plan)


# --------------------------------------------------------------------------------------------------
# Also seen: symlinked weights. Followed wherever they point (a hub cache snapshot links into its
# blobs), but what they resolve to must be a regular file.
# --------------------------------------------------------------------------------------------------
def test_weights_symlinked_outside_the_directory_load_like_a_hub_cache(gpt2, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for f in gpt2.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(blobs / f.name)
    assert sum(p.numel() for p in load(snap).parameters()) == sum(p.numel() for p in load(gpt2).parameters())


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "broken"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "shard"])
def test_weights_that_are_not_regular_files_are_refused(gpt2, tmp_path, kind, sharded):
    d = _copy(gpt2, tmp_path / "d")
    weights = d / "model.safetensors"
    if sharded:
        shard = d / "model-00001-of-00001.safetensors"
        weights.rename(shard)
        keys = list(load(gpt2).state_dict())
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard.name)}))
        weights = shard
    if kind == "broken":
        weights.unlink()
        weights.symlink_to(tmp_path / "gone")
    else:
        _replace(weights, kind)
    match = ("is missing" if sharded else "broken symlink") if kind == "broken" else KINDS[kind]
    with deadline(20), pytest.raises(CheckpointError, match=match):
        load(d)
    assert_refused(invoke("inspect", d), match)


# --------------------------------------------------------------------------------------------------
# Defect 1: the source path recorded by decompose is data: only regular files (or a directory of
# them) within the caps are hashed; anything else is "not distilling", at once
# --------------------------------------------------------------------------------------------------
def _hostile_source(tmp_path: Path, kind: str) -> str:
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo")
    if kind == "big-directory":
        big = tmp_path / "many"
        big.mkdir()
        for i in range(1_001):
            (big / str(i)).touch()
        return str(big)
    if kind == "sparse-huge":
        with open(tmp_path / "huge.pt", "wb") as f:
            f.truncate((64 << 30) + 1)
        return str(tmp_path / "huge.pt")
    return {"dev-zero": "/dev/zero", "nul-byte": "/tmp/a\0b", "newline": "/tmp/a\nb", "too-long": "/" + "x" * 5000}[kind]


SOURCES = {"fifo": "a FIFO", "dev-zero": "a device", "big-directory": "more than 1,000 entries",
           "sparse-huge": "larger than 64 GiB", "nul-byte": "is gone", "newline": "is gone", "too-long": "cannot be read"}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_recorded_source_that_is_not_a_model_file_is_not_hashed(tmp_path, kind):
    from ttcompress.checkpoint.teacher import default_teacher, source_record

    path = _hostile_source(tmp_path, kind)
    with deadline(10):
        choice = default_teacher({"source_path": path, "source_sha256": "0" * 64})
        assert source_record(path) == {}
    assert choice.path is None and "no distillation" in choice.message and SOURCES[kind] in choice.message
    assert choice.message.isprintable()


@pytest.mark.parametrize("where", ["checkpoint", "hf-directory"])
def test_finetune_does_not_hash_a_recorded_fifo_or_device(tmp_path, where, capsys):
    from ttcompress.cli.finetune import _recorded_teacher
    from test_trust import rewrite_header  # tests/ is on sys.path under pytest

    os.mkfifo(tmp_path / "fifo")
    for source in (tmp_path / "fifo", "/dev/zero", "/usr"):
        info = {"source_path": str(source), "source_sha256": "0" * 64}
        if where == "checkpoint":
            import ttcompress
            from ttcompress.compression.plan import Plan, TTSettings

            mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
            base = ttcompress.save(ttcompress.compress(mlp, Plan(tt=TTSettings(ranks=2))), tmp_path / "m.tt.pt")
            model = rewrite_header(base, tmp_path / "bad.tt.pt", lambda h, info=info: h.setdefault("info", {}).update(info))
        else:
            model = tmp_path / "d"
            model.mkdir(exist_ok=True)
            (model / "ttcompress.json").write_text(json.dumps({"format": "ttcompress-hf", "version": 1, "info": info}))
        with deadline(10):
            assert _recorded_teacher(model) is None
        err = capsys.readouterr().err
        assert "no distillation" in err and str(source) in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------------------
# Defect 5: ttcompress.json fields are type-checked like a checkpoint header
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "match"), [
    ("arch", "x", "arch must be an object"),
    ("arch", {"name": "hf:GPT2LMHeadModel", "kwargs": "x"}, "arch.kwargs must be an object"),
    ("arch", {"name": "hf:GPT2LMHeadModel", "kwargs": {"conv1d_as_linear": "yes"}}, "conv1d_as_linear must be"),
    ("layers", [1], "layers must be an object"),
    ("layers", {"transformer.h.0.mlp.c_fc": "x"}, "record must be an object"),
    ("info", "x", "info must be an object"),
    ("tied", {"a": 1}, "tied must be an object of strings"),
    ("plan", 3, "plan must be an object"),
])
def test_record_fields_of_the_wrong_type_are_one_line(gpt2, tmp_path, field, value, match):
    d = _copy(gpt2, tmp_path / "d")
    (d / "ttcompress.json").write_text(json.dumps({"format": "ttcompress-hf", "version": 1, field: value}))
    with deadline(20), pytest.raises(CheckpointError, match=match):
        load(d)
    for args in (["inspect", d], ["report", d, d, "--no-latency", "--eval-limit", "4"], ["finetune", d, "-o", tmp_path / "o"]):
        assert_refused(invoke(*args), match)


# --------------------------------------------------------------------------------------------------
# Defect 4: config values of the wrong type, zero or negative sizes, NaN: one line, before
# transformers sees them (any exception transformers raises on a file's values is one line too)
# --------------------------------------------------------------------------------------------------
BAD_VALUES = [
    ({"n_head": 0}, "n_head must be a positive int, got 0"),
    ({"n_head": "2"}, "n_head must be an int, got '2'"),
    ({"n_head": True}, "n_head must be an int, got True"),
    ({"n_head": 2.0}, "n_head must be an int, got 2.0"),
    ({"vocab_size": float("nan")}, "vocab_size must be a finite number, got nan"),
    ({"vocab_size": -1}, "vocab_size must be a positive int, got -1"),
    ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),  # GPT-2's alias of n_embd
    ({"n_layer": -1}, "n_layer must be a non-negative int, got -1"),
    ({"layer_norm_epsilon": "x"}, "layer_norm_epsilon must be a finite number, got 'x'"),
    ({"layer_norm_epsilon": float("inf")}, "layer_norm_epsilon must be a finite number, got inf"),
    ({"use_cache": "yes"}, "use_cache must be true or false, got 'yes'"),
    ({"n_head": 3}, "must be divisible by num_heads"),  # transformers' own check, one line
    ({"activation_function": "nope"}, "cannot build GPT2LMHeadModel from the config"),
    ({"vocab_size": 10**23}, "cannot build GPT2LMHeadModel from the config"),
]


@pytest.mark.parametrize(("change", "match"), BAD_VALUES, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))
                                                               for c, _ in BAD_VALUES])
def test_config_values_are_checked_before_transformers(gpt2, tmp_path, change, match):
    d = _copy(gpt2, tmp_path / "d")
    _edit_json(d / "config.json", **change)
    with deadline(20), pytest.raises(CheckpointError, match=match.replace("(", r"\(")):
        load(d)
    assert_refused(invoke("inspect", d), match)


def test_config_values_in_a_nested_config_are_checked_against_its_class(tmp_path):
    from ttcompress.checkpoint.hf import build_hf_model

    config = {"model_type": "clip", "text_config": {"vocab_size": "many"}}
    with pytest.raises(CheckpointError, match="text_config.vocab_size must be an int, got 'many'"):
        build_hf_model("CLIPModel", config, device="meta")


# --------------------------------------------------------------------------------------------------
# Defect 7: num_labels / id2label / label2id are bounded by the tensors present before
# transformers builds a dict of that many labels
# --------------------------------------------------------------------------------------------------
def _label_bound(d: Path) -> int:
    from safetensors import safe_open

    from ttcompress.checkpoint.hf_config import label_bound

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return label_bound(f.get_slice(k).get_shape() for k in f.keys())  # noqa: SIM118


def test_label_bound_is_set_by_the_tensors_present():
    from ttcompress.checkpoint.hf_config import MAX_LABELS, label_bound

    assert label_bound([(3, 16), (10, 4)]) == 3 * 16 + 10 * 4  # a factorized head has fewer rows than labels
    assert label_bound([(2_000_000, 8)]) == 2_000_000  # a dense head: its rows
    assert label_bound([(4096, 4096)]) == MAX_LABELS
    assert label_bound([(1,)]) == 2 and label_bound([]) == 2


@pytest.mark.parametrize(("change", "match"), [
    ({"num_labels": 2**31}, "num_labels must be an int from 1 to {bound:,}"),
    ({"num_labels": 0}, "num_labels must be an int from 1 to {bound:,}"),
    ({"num_labels": "3"}, "num_labels must be an int"),
    ("id2label", "id2label has {n:,} labels, more than {bound:,}"),
    ({"label2id": [1, 2]}, "label2id must be an object"),
])
def test_label_counts_in_config_json_are_bounded_by_the_tensors(gpt2_cls, tmp_path, change, match):
    d = _copy(gpt2_cls, tmp_path / "d")
    bound = _label_bound(d)
    if change == "id2label":
        change = {"id2label": {str(i): "x" for i in range(bound + 1)}}
    match = match.format(bound=bound, n=bound + 1)
    _edit_json(d / "config.json", **change)
    with deadline(20), pytest.raises(CheckpointError, match=match):
        load(d)
    assert_refused(invoke("inspect", d), match)


def test_label_counts_in_a_header_hf_config_are_bounded_by_the_tensors(gpt2_cls, tmp_path):
    """Through a ``.tt.pt`` whose header names ``hf:GPT2ForSequenceClassification``: refused before
    transformers builds a 2^31-entry id2label (5.6 GB before)."""
    import ttcompress
    from ttcompress.compression.plan import Plan, TTSettings
    from test_trust import rewrite_header

    base = ttcompress.save(ttcompress.compress(load(gpt2_cls), Plan(tt=TTSettings(ranks=2))), tmp_path / "c.tt.pt")
    assert load(base) is not None
    bad = rewrite_header(base, tmp_path / "bad.tt.pt", lambda h: h["arch"]["kwargs"]["config"].update(num_labels=2**31))
    with deadline(20), pytest.raises(CheckpointError, match="num_labels must be an int from 1 to .* got 2147483648"):
        load(bad)
    assert_refused(invoke("inspect", bad), "(bounded by the tensors present), got 2147483648")


def test_label_counts_without_tensors_are_capped(tmp_path):
    from ttcompress.checkpoint.hf import build_hf_model
    from ttcompress.checkpoint.hf_config import MAX_LABELS

    config = {**_gpt2_config().to_dict(), "num_labels": MAX_LABELS + 1}
    with deadline(10), pytest.raises(CheckpointError, match=f"num_labels must be an int from 1 to {MAX_LABELS:,}"):
        build_hf_model("GPT2ForSequenceClassification", config, device="meta")


# --------------------------------------------------------------------------------------------------
# Defect 15: transformers' log lines and warnings are shown only with --debug
# --------------------------------------------------------------------------------------------------
def test_library_warnings_do_not_break_the_one_line_rule(gpt2, tmp_path):
    """transformers warns about an out-of-vocabulary eos_token_id, then its own error follows: one
    line. In a subprocess, since transformers binds its log handler to the process's stderr."""
    import subprocess
    import sys

    d = _copy(gpt2, tmp_path / "d")
    _edit_json(d / "config.json", eos_token_id=500, n_head=3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")]))}
    env.pop("TRANSFORMERS_VERBOSITY", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ttcompress", *args], capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)

    quiet = run("inspect", str(d))
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1, quiet.stderr
    assert quiet.stderr.startswith("error: ") and "divisible by num_heads" in quiet.stderr


def test_library_log_lines_and_warnings_show_with_debug():
    import logging
    import warnings

    from ttcompress.cli._common import quiet_libraries, set_debug

    logger = logging.getLogger("transformers")
    before = logger.level
    with quiet_libraries():
        assert not logger.isEnabledFor(logging.ERROR) and os.environ["TRANSFORMERS_VERBOSITY"] == "critical"
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("hidden", UserWarning, "x.py", 1, module="transformers.configuration_utils")
        assert seen == []
    assert logger.level == before
    set_debug(True)
    try:
        with quiet_libraries():
            assert logger.level == before
    finally:
        set_debug(False)


@pytest.mark.parametrize(("change", "match"), [
    ({"n_head": 0}, "n_head must be a positive int, got 0"),
    ({"n_head": "2"}, "n_head must be an int, got '2'"),
    ({"vocab_size": -1}, "vocab_size must be a positive int, got -1"),
])
def test_config_values_in_a_header_hf_config_are_checked(gpt2_cls, tmp_path, change, match):
    import ttcompress
    from ttcompress.compression.plan import Plan, TTSettings
    from test_trust import rewrite_header

    base = ttcompress.save(ttcompress.compress(load(gpt2_cls), Plan(tt=TTSettings(ranks=2))), tmp_path / "c.tt.pt")
    bad = rewrite_header(base, tmp_path / "bad.tt.pt", lambda h: h["arch"]["kwargs"]["config"].update(change))
    with deadline(20), pytest.raises(CheckpointError, match=match):
        load(bad)
    assert_refused(invoke("inspect", bad), match)


def test_the_default_configs_of_transformers_pass_the_value_checks():
    """The checks refuse nothing transformers itself writes (llava's vision_feature_layer is -2,
    vitdet's window_size 0): a sample of model types, their default configs as config.json holds them."""
    from ttcompress.checkpoint.hf_config import check_config_values

    for model_type in ("gpt2", "bert", "llama", "vit", "clip", "t5", "llava", "vitdet", "vilt", "whisper", "resnet"):
        cls = transformers.CONFIG_MAPPING[model_type]
        check_config_values(json.loads(cls().to_json_string(use_diff=False)), cls, model_type)


def test_label_bound_ignores_tensors_without_elements(gpt2_cls, tmp_path):
    """A zero-element tensor of shape ``[2**31, 0]`` costs nothing to store: its dimensions bound
    nothing (else ``num_labels: 2**31`` would pass and transformers build a 2^31-entry id2label)."""
    from safetensors.torch import load_file, save_file

    from ttcompress.checkpoint.hf_config import label_bound

    assert label_bound([(2**31, 0), (3, 16)]) == 3 * 16
    d = _copy(gpt2_cls, tmp_path / "d")
    tensors = load_file(str(d / "model.safetensors"))
    save_file({**tensors, "junk": torch.empty(2**31, 0)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    _edit_json(d / "config.json", num_labels=2**31)
    with deadline(20), pytest.raises(CheckpointError, match="num_labels must be an int from 1 to .* got 2147483648"):
        load(d)
