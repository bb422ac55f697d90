"""Seeded fuzzing of the command line: valid seed inputs, mutators, cases, and a batched runner.

Used by ``tests/test_fuzz.py``. A *case* is one ``ttcompress`` command line over inputs made by
mutating a valid seed (a ``.tt.pt`` checkpoint's header or bytes, a Hugging Face directory's
``config.json`` or ``ttcompress.json``, a plan file, an option value). Each case is a pure function
of ``(family, index, seed)``, so a failure is named and replayed by its id.

Cases run in a child process (``tests/fuzz_driver.py``) under a memory cap (``RLIMIT_AS``) and a
per-case time cap; the child runs many cases through ``ttcompress.cli.main()``, so the suite does not
pay for importing torch once per case.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("fuzz_driver.py")

#: Values swapped into JSON fields: wrong types, NaN, zero, negative and huge ints.
VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, 2**31, 2**31 + 1, 2**63, -(2**63), 10**12, 1e308, -0.5, 0.5,
    math.nan, math.inf, "x", "", "2", "/dev/zero", [], [1, 2], [2**31] * 3, [0, 0], {}, {"a": 1},
]  # fmt: skip
INTS = ["0", "-1", "1", "2", "3", "64", "1000", "2147483648", "9223372036854775808", "1e3", "x", "", "none", "nan"]
FLOATS = ["0", "-1", "0.5", "1", "4", "1e9", "1e308", "inf", "nan", "-inf", "x", "", "none"]
SHAPES = ["100000,100000,100000", "1,28,28", "0,28,28", "-1,28,28", "1,28", "1,28,28,1,1", "1,2147483648,1",
          "1,1,1", "x", ""]  # fmt: skip
ARCH_KWARGS = ['{"hidden": 2000000000}', '{"hidden": 2147483648}', '{"hidden": -1}', '{"hidden": 0}',
               '{"hidden": "x"}', '{"hidden": 1e308}', '{"hidden": NaN}', '{"nope": 1}', "[]", "{", "null",
               '{"hidden": 32}', '{"hidden": 100000}']  # fmt: skip
GLOBS = ["*", "", "[", "nomatch", "features.*", "classifier.?"]


@dataclass
class Case:
    id: str
    family: str
    what: str
    argv: list[str]
    cwd: str
    inputs: list[str]
    timeout: float
    expect_ok: bool = False  # an unmutated seed: must succeed
    file_driven: bool = True  # sizes come from a file: "out of memory" is then a failure, not a refusal
    digests: dict[str, str] = field(default_factory=dict)


# ---- seeds ----------------------------------------------------------------------------------------
@dataclass
class Seeds:
    dir: Path
    cnn: Path  # seed-cnn state dict (needs ARCH)
    dense: Path  # the same model as a ttcompress checkpoint (safetensors, records its arch)
    ckpt: Path  # compressed seed-cnn (TT + CP), records source_path = cnn
    gpt2: Path  # Hugging Face directory of a tiny GPT-2
    gpt2_tt: Path  # compressed GPT-2 (TT Linear + TT embedding), a .tt.pt naming hf:GPT2LMHeadModel
    gpt2_hf: Path  # the same exported as a Hugging Face directory with ttcompress.json
    plan: dict[str, Any]


ARCH = ["--arch", "seed-cnn", "--arch-kwargs", '{"hidden": 32}']
PLAN = {
    "tt": {"ranks": 4, "d": 3},
    "cp": {"rank": 2},
    "exclude": ["features.0"],
    "rules": [{"pattern": "classifier.1", "ranks": 3}, {"pattern": "classifier.3", "format": "dense"}],
}


def build_seeds(root: Path, invoke: Callable[..., None]) -> Seeds:
    """Write the valid seed inputs under ``root``; ``invoke(*args)`` runs the CLI and must succeed."""
    import torch
    import transformers

    from ttcompress.checkpoint.io import save
    from ttcompress.checkpoint.models import build_arch

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cnn = root / "cnn.pt"
    model = build_arch("seed-cnn", kwargs={"hidden": 32})
    torch.save(model.state_dict(), cnn)
    dense = save(model, root / "cnn-dense.pt", info={"input_shape": [1, 28, 28]})
    ckpt = root / "cnn.tt.pt"
    invoke("decompose", cnn, *ARCH, "--tt-ranks", "2", "--cp-ranks", "2", "-o", ckpt)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    gpt2 = root / "gpt2"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(gpt2, safe_serialization=True)
    gpt2_tt = root / "gpt2.tt.pt"
    invoke("decompose", gpt2, "--format", "tt,tt_embedding", "--tt-ranks", "4", "-o", gpt2_tt)
    gpt2_hf = root / "gpt2-hf"
    invoke("export", gpt2_tt, "--format", "hf", "-o", gpt2_hf)
    return Seeds(root, cnn, dense, ckpt, gpt2, gpt2_tt, gpt2_hf, PLAN)


# ---- mutators -------------------------------------------------------------------------------------
def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _show(value: Any) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def mutate_json(rng: random.Random, obj: Any, *, focus: tuple[str, ...] = (), n: int | None = None) -> list[str]:
    """Mutate ``obj`` in place 1-3 times; return what was done. ``focus``: path prefixes chosen half the time."""
    done = []
    for _ in range(n or rng.randint(1, 3)):
        paths = list(_paths(obj))
        if not paths:
            break
        focused = [p for p in paths if any(".".join(map(str, p)).startswith(f) for f in focus)]
        path = rng.choice(focused if focused and rng.random() < 0.5 else paths)
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        where = ".".join(map(str, path))
        op = rng.random()
        if op < 0.12 and isinstance(parent, dict):
            del parent[key]
            done.append(f"del {where}")
        elif op < 0.2 and isinstance(parent, dict):
            extra = rng.choice(["device", "dtype", "extra", "d", "ranks", "rank", "in_modes"])
            parent[extra] = rng.choice(VALUES)
            done.append(f"add {where.rpartition('.')[0] or '<root>'}.{extra}={_show(parent[extra])}")
        elif op < 0.35 and isinstance(old, int) and not isinstance(old, bool):
            new = rng.choice([old * 2**31, -old, 0, 2**31, 2**63, str(old), float(old), [old]])
            parent[key] = new
            done.append(f"set {where}: {_show(old)} -> {_show(new)}")
        elif op < 0.45 and isinstance(old, list) and old:
            new = rng.choice([old[:-1], old + old[-1:], [*old[:-1], 2**31], list(reversed(old)), old * 100])
            parent[key] = new
            done.append(f"set {where}: {_show(old)} -> {_show(new)}")
        else:
            parent[key] = rng.choice(VALUES)
            done.append(f"set {where}={_show(parent[key])}")
    return done


def dump_json(rng: random.Random, obj: Any, what: list[str]) -> str:
    """JSON text of ``obj``, sometimes with a key duplicated (the last one wins in Python's parser)."""
    text = json.dumps(obj, allow_nan=True, indent=1)
    if isinstance(obj, dict) and obj and rng.random() < 0.15:
        key = rng.choice(list(obj))
        value = rng.choice(VALUES)
        text = "{" + f"{json.dumps(key)}: {json.dumps(value, allow_nan=True)}, " + text.lstrip()[1:]
        what.append(f"duplicate key {key!r} (first={_show(value)})")
    return text


def mutate_bytes(rng: random.Random, data: bytes, what: list[str], *, header_end: int | None = None) -> bytes:
    op = rng.random()
    if op < 0.4:
        cut = rng.randint(0, len(data) - 1)
        what.append(f"truncated to {cut} of {len(data)} bytes")
        return data[:cut]
    buf = bytearray(data)
    hi = header_end if header_end and op < 0.8 else len(buf)
    spots = sorted(rng.sample(range(hi), min(hi, rng.randint(1, 8))))
    for i in spots:
        buf[i] ^= 1 << rng.randrange(8)
    what.append(f"flipped bits at {spots}")
    return bytes(buf)


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(table: dict[str, Any], body: bytes, table_text: str | None = None) -> bytes:
    blob = (table_text if table_text is not None else json.dumps(table, allow_nan=True)).encode()
    return struct.pack("<Q", len(blob)) + blob + body


# ---- case families --------------------------------------------------------------------------------
# Each family: (rng, seeds, case directory, long run?) -> (what, argv, inputs); argv may name
# the case's ``out`` directory for outputs. Slow commands (report, finetune) only in a long run.
def _out(d: Path, name: str) -> str:
    return str(d / "out" / name)


def _ckpt_command(rng: random.Random, path: Path, d: Path, long: bool) -> list[str]:
    choices = [["inspect", str(path)], ["decompose", str(path), "--tt-ranks", "2", "-o", _out(d, "x.tt.pt")],
               ["inspect", str(path), "--json"]]
    if path.name.startswith("cnn"):
        choices.append(["export", str(path), "--format", "dense", "-o", _out(d, "x.pt"), "--input-shape", "1,28,28"])
    if long:
        choices += [["report", str(path), str(path), "--no-latency", "--eval-limit", "8", "-f", "json"],
                    ["finetune", str(path), "-o", _out(d, "f.tt.pt"), "--epochs", "1", "--max-batches", "1",
                     "--eval-batch-size", "64", "--val-fraction", "0.02"],
                    ["export", str(path), "--format", "torchscript", "-o", _out(d, "x.ts"), "--input-shape", "1,28,28"]]  # fmt: skip
    return rng.choice(choices)


def fam_header(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """The ttcompress header of a compressed checkpoint (seed-cnn, or GPT-2 with hf: arch)."""
    src = rng.choice([s.ckpt, s.ckpt, s.gpt2_tt])
    table, body = split_safetensors(src.read_bytes())
    header = json.loads(table["__metadata__"]["ttcompress"])
    what = [src.name]
    what += mutate_json(rng, header, focus=("layers", "arch.kwargs", "info.source_path", "info.input_shape",
                                            "arch.kwargs.config.n_", "arch.kwargs.config.num_labels"))  # fmt: skip
    if rng.random() < 0.1:
        header["arch"]["name"] = rng.choice(["hf:GPT2ForSequenceClassification", "x", "hf:x", "torchvision:x"])
        what.append(f"set arch.name={header['arch']['name']}")
    table["__metadata__"]["ttcompress"] = dump_json(rng, header, what)
    path = d / "in" / src.name
    path.write_bytes(join_safetensors(table, body))
    return "; ".join(what), _ckpt_command(rng, path, d, long), [path]


def fam_source(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """``info.source_path`` pointing at something that is not a regular file (finetune hashes it)."""
    table, body = split_safetensors(s.ckpt.read_bytes())
    header = json.loads(table["__metadata__"]["ttcompress"])
    fifo = d / "in" / "fifo"
    target = rng.choice(["/dev/zero", "/usr", str(fifo), "/nonexistent/x.pt", "", "/proc/self/mem", 7])
    if target == str(fifo):
        os.mkfifo(fifo)
    header["info"]["source_path"] = target
    table["__metadata__"]["ttcompress"] = json.dumps(header)
    path = d / "in" / "src.tt.pt"
    path.write_bytes(join_safetensors(table, body))
    argv = ["finetune", str(path), "-o", _out(d, "f.tt.pt"), "--epochs", "1", "--max-batches", "1",
            "--eval-batch-size", "64", "--val-fraction", "0.02"]  # fmt: skip
    return f"info.source_path={target!r}", argv, [path]


def fam_bytes(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """Truncation, bit flips, or an edited tensor table of a compressed checkpoint."""
    src = rng.choice([s.ckpt, s.gpt2_tt])
    data = src.read_bytes()
    what = [src.name]
    if rng.random() < 0.4:
        table, body = split_safetensors(data)
        names = [k for k in table if k != "__metadata__"]
        name = rng.choice(names)
        op = rng.choice(["del", "shape", "dtype", "offsets", "dup"])
        text = None
        if op == "del":
            del table[name]
        elif op == "shape":
            table[name]["shape"] = rng.choice([[2**31, 0], [0], [], [2**62, 2**62], [-1], table[name]["shape"][::-1]])
        elif op == "dtype":
            table[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "BOOL", "U8", "X"])
        elif op == "offsets":
            table[name]["data_offsets"] = rng.choice([[0, 2**40], [8, 4], [0, 0], [-4, 4]])
        else:  # the same tensor name twice in the table: the first copy with other offsets
            first = json.dumps({name: {**table[name], "data_offsets": [0, 4]}})[1:-1]
            text = "{" + first + ", " + json.dumps(table)[1:]
        what.append(f"tensor table: {op} {name}" + ("" if op in ("del", "dup") else f" -> {_show(table[name])}"))
        data = join_safetensors(table, body, text)
    else:
        (n,) = struct.unpack("<Q", data[:8])
        data = mutate_bytes(rng, data, what, header_end=8 + n)
    path = d / "in" / src.name
    path.write_bytes(data)
    return "; ".join(what), _ckpt_command(rng, path, d, long), [path]


def fam_weights(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """NaN, Inf or huge values in the weights of a dense or a compressed checkpoint."""
    src = rng.choice([s.dense, s.dense, s.ckpt])
    table, body = split_safetensors(src.read_bytes())
    body = bytearray(body)
    name = rng.choice(sorted(k for k in table if k != "__metadata__" and table[k]["dtype"] == "F32"))
    start, end = table[name]["data_offsets"]
    value = rng.choice([math.nan, math.inf, -math.inf, 3e38])
    count = rng.choice([1, (end - start) // 4])
    for i in rng.sample(range((end - start) // 4), count):
        struct.pack_into("<f", body, start + 4 * i, value)
    path = d / "in" / src.name
    path.write_bytes(join_safetensors(table, bytes(body)))
    out = _out(d, "x.tt.pt")
    choices = [["decompose", str(path), "--target-ratio", "4", "-o", out],
               ["decompose", str(path), "--tt-ranks", "2", "--cp-ranks", "2", "-o", out],
               ["decompose", str(path), "--format", "svd,tucker2", "-o", out],
               ["inspect", str(path)]]  # fmt: skip
    if long:
        choices += [["report", str(s.dense), str(path), "--no-latency", "--eval-limit", "8", "-f", "json"],
                    ["decompose", str(path), "--target-ratio", "4", "--data", "mnist-5k", "--calib-samples", "32",
                     "-o", out]]  # fmt: skip
    return f"{src.name}: {count} value(s) of {name} = {value}", rng.choice(choices), [path]


def _hf_command(rng: random.Random, path: Path, d: Path, long: bool) -> list[str]:
    choices = [["inspect", str(path)], ["decompose", str(path), "--tt-ranks", "2", "-o", _out(d, "x.tt.pt")],
               ["decompose", str(path), "--tt-ranks", "2", "--dry-run"]]
    if long:
        choices.append(["export", str(path), "--format", "hf", "-o", _out(d, "hf")])
    return rng.choice(choices)


CONFIG_FOCUS = ("n_head", "n_layer", "n_embd", "vocab_size", "n_positions", "num_labels", "model_type",
                "architectures", "n_inner", "layer_norm_epsilon", "tie_word_embeddings", "auto_map")  # fmt: skip


def fam_config(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """``config.json`` of a Hugging Face directory: fields, or the file replaced by a non-file."""
    src = rng.choice([s.gpt2, s.gpt2, s.gpt2_hf])
    path = d / "in" / src.name
    shutil.copytree(src, path)
    cfg_path = path / "config.json"
    what = [src.name]
    op = rng.random()
    if op < 0.12:
        special = rng.choice(["fifo", "dev-zero", "dir", "huge", "empty", "deep"])
        cfg_path.unlink()
        if special == "fifo":
            os.mkfifo(cfg_path)
        elif special == "dev-zero":
            cfg_path.symlink_to("/dev/zero")
        elif special == "dir":
            cfg_path.mkdir()
        elif special == "huge":
            cfg_path.write_text('{"model_type": "gpt2", "pad": "' + "x" * (64 * 2**20) + '"}')
        elif special == "deep":
            cfg_path.write_text("[" * 100_000 + "]" * 100_000)
        else:
            cfg_path.write_text("")
        what.append(f"config.json is {special}")
    else:
        config = json.loads(cfg_path.read_text())
        if rng.random() < 0.2:
            config["num_labels"] = rng.choice([2**31, 10**6, -1, 0, "2"])
            config["architectures"] = ["GPT2ForSequenceClassification"]
            what.append(f"num_labels={config['num_labels']}, architectures=[GPT2ForSequenceClassification]")
        else:
            what += mutate_json(rng, config, focus=CONFIG_FOCUS)
        cfg_path.write_text(dump_json(rng, config, what))
    return "; ".join(what), _hf_command(rng, path, d, long), [path]


def fam_record(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """``ttcompress.json`` of an exported Hugging Face directory (arch, layer configs, source_path)."""
    path = d / "in" / s.gpt2_hf.name
    shutil.copytree(s.gpt2_hf, path)
    rec_path = path / "ttcompress.json"
    record = json.loads(rec_path.read_text())
    what: list[str] = []
    op = rng.random()
    if op < 0.15:
        record["arch"] = rng.choice(["x", "hf:x", {"name": "x"}, {"name": "hf:GPT2LMHeadModel", "kwargs": "x"}, None, 3])
        what.append(f"set arch={_show(record['arch'])}")
    elif op < 0.3:
        layer = rng.choice(list(record["layers"]))
        record["layers"][layer]["config"]["d"] = rng.choice([2**31, 1000, 0, -1, "3"])
        what.append(f"set layers.{layer}.config.d={record['layers'][layer]['config']['d']!r}")
    elif op < 0.4:
        record.setdefault("info", {})["source_path"] = rng.choice(["/dev/zero", "/usr", "/nonexistent"])
        what.append(f"set info.source_path={record['info']['source_path']}")
    else:
        what += mutate_json(rng, record, focus=("layers", "arch", "format", "version"))
    rec_path.write_text(dump_json(rng, record, what))
    return "; ".join(what), _hf_command(rng, path, d, long), [path]


def fam_plan(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """A plan file (YAML or JSON) with mutated fields, or broken text."""
    plan = json.loads(json.dumps(s.plan))
    what = mutate_json(rng, plan)
    suffix = rng.choice([".yaml", ".json"])
    if suffix == ".json":
        text = dump_json(rng, plan, what)
    else:
        import yaml

        text = yaml.safe_dump(plan)
    if rng.random() < 0.15:
        extra = rng.choice(["trunc", "alias", "deep", "tab"])
        if extra == "trunc":
            text = text[: rng.randint(0, len(text))]
        elif extra == "alias":
            text = "a: &a [1, 2]\nb: *a\n" + text
        elif extra == "deep":
            text = "[" * 5000 + "]" * 5000
        else:
            text = "\t" + text
        what.append(f"text: {extra}")
    path = d / "in" / f"plan{suffix}"
    path.write_text(text)
    cmd = rng.choice([["inspect", str(s.cnn), *ARCH, "--plan", str(path)],
                      ["decompose", str(s.cnn), *ARCH, "--plan", str(path), "--dry-run"],
                      ["decompose", str(s.cnn), *ARCH, "--plan", str(path), "-o", _out(d, "x.tt.pt")]])  # fmt: skip
    return f"{suffix}: " + "; ".join(what), cmd, [path, s.cnn]


def fam_cli(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """Option values: ranks, --tt-d, --target-ratio, --input-shape, --arch-kwargs, ..."""
    out = _out(d, "x.tt.pt")
    kwargs = rng.choice(ARCH_KWARGS)
    options = {
        "--tt-ranks": INTS, "--tt-d": INTS, "--cp-ranks": INTS, "--tt-eps": FLOATS, "--cp-ratio": FLOATS,
        "--target-ratio": FLOATS, "--min-saving": FLOATS, "--max-error": FLOATS, "--layers": GLOBS,
        "--exclude": GLOBS, "--format": ["tt", "cp", "svd", "tucker2", "auto", "tt_embedding", "x", "", "tt,x"],
    }  # fmt: skip
    kind = rng.choice(["decompose", "decompose", "inspect", "export", "report"] if long else
                      ["decompose", "decompose", "inspect", "export"])  # fmt: skip
    if kind in ("decompose", "inspect"):
        base = ["decompose", str(s.cnn), "--arch", "seed-cnn", "-o", out] if kind == "decompose" else \
               ["inspect", str(s.cnn), "--arch", "seed-cnn"]  # fmt: skip
        picked = rng.sample(sorted(options), rng.randint(1, 2))
        argv = [*base, "--arch-kwargs", kwargs]
        what = [f"--arch-kwargs {kwargs}"]
        for opt in picked:
            value = rng.choice(options[opt])
            argv += [opt, value]
            what.append(f"{opt} {value!r}")
        if kind == "decompose" and rng.random() < 0.3:
            argv.append("--dry-run")
    elif kind == "export":
        shape, batch = rng.choice(SHAPES), rng.choice(["1", "0", "-1", "2147483648", "100000", "x"])
        fmt = rng.choice(["dense", "torchscript", "onnx"] if long else ["dense"])
        argv = ["export", str(s.ckpt), "--format", fmt, "-o", _out(d, "x.out"), "--input-shape", shape, "--batch-size", batch]
        what = [f"--input-shape {shape!r} --batch-size {batch!r}"]
    else:
        shape, limit = rng.choice(SHAPES), rng.choice(["8", "0", "-1", "2147483648", "x"])
        argv = ["report", str(s.cnn), str(s.ckpt), "--arch", "seed-cnn", "--arch-kwargs", kwargs, "--no-latency",
                "--input-shape", shape, "--eval-limit", limit, "-f", "json"]  # fmt: skip
        what = [f"--arch-kwargs {kwargs} --input-shape {shape!r} --eval-limit {limit!r}"]
    return "; ".join(what), argv, [s.cnn, s.ckpt]


def fam_output(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """An output that is, or lies inside, an input (must be refused, the input left as it was)."""
    hf = d / "in" / "gpt2"
    shutil.copytree(s.gpt2, hf)
    ck = d / "in" / "c.tt.pt"
    shutil.copyfile(s.ckpt, ck)
    argv = rng.choice([
        ["decompose", str(hf), "--tt-ranks", "2", "-o", str(hf / "model.safetensors"), "--overwrite"],
        ["decompose", str(hf), "--tt-ranks", "2", "-o", str(hf / "new.tt.pt")],
        ["decompose", str(ck), "--tt-ranks", "2", "-o", str(ck), "--overwrite"],
        ["export", str(ck), "--format", "dense", "-o", str(ck), "--overwrite"],
        ["export", str(hf), "--format", "hf", "-o", str(hf), "--overwrite"],
        ["export", str(hf), "--format", "hf", "-o", str(hf / "sub"), "--overwrite"],
    ])  # fmt: skip
    return "output inside input", argv, [hf, ck]


def fam_seed(rng: random.Random, s: Seeds, d: Path, long: bool) -> tuple[str, list[str], list[Path]]:
    """Unmutated seeds through every fast command: the harness itself must see exit 0 here."""
    argv = rng.choice([
        ["inspect", str(s.ckpt)], ["inspect", str(s.gpt2)], ["inspect", str(s.gpt2_hf)], ["inspect", str(s.gpt2_tt)],
        ["decompose", str(s.gpt2), "--tt-ranks", "2", "-o", _out(d, "x.tt.pt")],
        ["decompose", str(s.cnn), *ARCH, "--plan", str(d / "in" / "plan.yaml"), "-o", _out(d, "x.tt.pt")],
        ["export", str(s.ckpt), "--format", "dense", "-o", _out(d, "x.pt"), "--input-shape", "1,28,28"],
        ["decompose", str(s.dense), "--target-ratio", "4", "-o", _out(d, "x.tt.pt")],
    ])  # fmt: skip
    import yaml

    (d / "in" / "plan.yaml").write_text(yaml.safe_dump(s.plan))
    return "unmutated seed", argv, [Path(a) for a in argv if a.startswith(str(s.dir))]


FAMILIES: dict[str, Callable[[random.Random, Seeds, Path, bool], tuple[str, list[str], list[Path]]]] = {
    "seed": fam_seed,
    "header": fam_header,
    "bytes": fam_bytes,
    "config": fam_config,
    "record": fam_record,
    "plan": fam_plan,
    "cli": fam_cli,
    "output": fam_output,
    "weights": fam_weights,
    "source": fam_source,
}
#: Cases per family in the default (short) run; a long run spreads its cases evenly over FAMILIES.
SHORT = {"seed": 4, "header": 6, "bytes": 4, "config": 5, "record": 4, "plan": 4, "cli": 5, "output": 2, "source": 1, "weights": 3}
TIMEOUT = {"source": 60.0}  # finetune: data loading and one step


def case_ids(total: int | None) -> list[str]:
    """Ids of the default run (``total`` None) or of a long run of ``total`` cases."""
    if total is None:
        return [f"{fam}-{i}" for fam, n in SHORT.items() for i in range(n)]
    fams = list(FAMILIES)
    return [f"{fams[k % len(fams)]}-{k // len(fams)}" for k in range(total)]


def make_case(case_id: str, seeds: Seeds, work: Path, *, seed: int, long: bool) -> Case:
    family, _, index = case_id.rpartition("-")
    rng = random.Random(f"{seed}:{family}:{index}")
    d = work / case_id
    (d / "in").mkdir(parents=True)
    (d / "out").mkdir()
    what, argv, inputs = FAMILIES[family](rng, seeds, d, long)
    timeout = float(os.environ.get("TTCOMPRESS_FUZZ_TIMEOUT", TIMEOUT.get(family, 30.0)))
    case = Case(case_id, family, what, [str(a) for a in argv], str(d / "out"), [str(p) for p in inputs], timeout,
                expect_ok=family == "seed", file_driven=family != "cli")  # fmt: skip
    case.digests = {p: digest(Path(p)) for p in case.inputs}
    return case


# ---- checks ---------------------------------------------------------------------------------------
def digest(path: Path) -> str:
    """Content hash of a file or a directory tree, without following links or opening FIFOs/devices."""
    h = hashlib.sha256()
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        for child in sorted(path.iterdir()):
            h.update(f"{child.name}\0{digest(child)}\0".encode())
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            h.update(f.read())
    elif stat.S_ISLNK(st.st_mode):
        h.update(f"link:{os.readlink(path)}".encode())
    else:
        h.update(f"mode:{stat.S_IFMT(st.st_mode)}".encode())
    return h.hexdigest()


def leftovers(case: Case) -> list[str]:
    """Temporary files or directories (``.NAME.PID.*.tmp``, ``.NAME.tmp-*``) left in the case's folders."""
    found = []
    for top in Path(case.cwd).parent.iterdir():
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                if ".tmp" in name:
                    found.append(os.path.join(dirpath, name))
    return found


def problems(case: Case, result: dict[str, Any]) -> list[str]:
    """What is wrong with a case's result (empty: it passed)."""
    code, stderr = result.get("exit"), result.get("stderr", "")
    lines = stderr.strip().splitlines()
    found = []
    if code not in (0, 2):
        found.append(f"exit {code}")
    elif code == 2 and (len(lines) != 1 or not lines[0].startswith("error: ")):
        found.append(f"exit 2 with {len(lines)} stderr lines (one 'error: ...' line expected)")
    if "Traceback" in stderr:
        found.append("traceback on stderr")
    if case.expect_ok and code != 0:
        found.append("an unmutated seed failed")
    if code == 2 and case.file_driven and lines and lines[-1].startswith("error: out of memory"):
        found.append("a number in a file sized an allocation up to the memory cap")
    for path, before in case.digests.items():
        if digest(Path(path)) != before:
            found.append(f"input changed: {path}")
    found += [f"left behind: {p}" for p in leftovers(case)]
    return found


def describe(case: Case, result: dict[str, Any]) -> str:
    lines = result.get("stderr", "").strip().splitlines()
    first = next((ln for ln in lines if ln.startswith(("error:", "internal error:"))), lines[0] if lines else "")
    return (f"{case.id} [{case.what}]\n  $ ttcompress {' '.join(case.argv)}\n  exit {result.get('exit')} "
            f"after {result.get('seconds')} s: {first[:300]}")  # fmt: skip


# ---- runner ---------------------------------------------------------------------------------------
def _outer_limits() -> None:  # preexec_fn: a backstop; the driver tightens the cap after its imports
    resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cases(cases: list[Case], work: Path, *, mem_gb: float = 2.0) -> dict[str, dict[str, Any]]:
    """Run ``cases`` in driver children (restarted after a case that kills one); results by id."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "160"}  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    pending = list(cases)
    for attempt in range(len(cases) + 1):
        if not pending:
            break
        cases_file, results_file = work / f"driver-{attempt}.json", work / f"driver-{attempt}.jsonl"
        cases_file.write_text(json.dumps([asdict(c) for c in pending]))
        results_file.write_text("")
        budget = sum(c.timeout for c in pending) + 120
        try:
            proc = subprocess.run([sys.executable, str(DRIVER), str(cases_file), str(results_file), str(mem_gb)],
                                  env=env, capture_output=True, text=True, timeout=budget, preexec_fn=_outer_limits,
                                  cwd=work)  # fmt: skip
            rc, tail = proc.returncode, proc.stderr[-3000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = "killed after the batch time limit", str(exc.stderr or "")[-3000:]
        started, before = None, len(results)
        for line in results_file.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "start":
                started = record["id"]
            else:
                results[record["id"]] = record
                started = None
        if started is not None and started not in results:
            results[started] = {"id": started, "exit": f"child died (rc {rc})", "stderr": tail, "seconds": None}
        elif len(results) == before:
            raise RuntimeError(f"fuzz driver failed outside any case (rc {rc}):\n{tail}")
        pending = [c for c in pending if c.id not in results]
    return results
