"""Fuzz the checkpoint reader: 200 seeded corruptions of a real compressed checkpoint.

Every case must either load or fail with one of our own errors (Python) / one line and exit 2
(``ttcompress inspect``): never a traceback, never a file created by code named in the header,
never more than 2 GB of memory beyond what the process already had. The loop runs in a
subprocess under ``RLIMIT_AS``, so the limit does not touch the rest of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ttcompress.checkpoint.io import save
from ttcompress.checkpoint.models import build_arch
from ttcompress.compression.plan import CPSettings, Plan, TTSettings
from ttcompress.compression.pipeline import compress

ROOT = Path(__file__).resolve().parents[1]
CASES = 200

FUZZ = textwrap.dedent(r'''
    import json, os, random, resource, struct, sys
    from pathlib import Path

    import torch
    import typer
    from click.testing import CliRunner

    from ttcompress.cli import app
    from ttcompress.errors import TTCompressError
    from ttcompress.checkpoint.io import load

    src, work, n_cases, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    marker = work / "MARKER"
    torch.set_num_threads(1)
    # 2 GB on top of what the interpreter (torch, typer, ...) already maps
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st_header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    header = json.loads(st_header["__metadata__"]["ttcompress"])
    rng = random.Random(seed)
    EVIL = [
        {"name": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}},
        {"name": "builtins:open", "kwargs": {"file": str(marker), "mode": "w"}},
        {"name": "pathlib:Path.touch", "kwargs": {"self": str(marker)}},
    ]
    VALUES = [None, -1, 0, 1, 7, 2**31, 2**31 + 1, 10**12, 2**63, -(10**12), 1e308, float("nan"), "x",
              "meta", "cuda", "float64", "", [1, 2], [], {}, {"a": 1}, True, [10**12] * 3]

    def paths(obj, prefix=()):
        yield prefix
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from paths(v, prefix + (i,))

    def mutate(h):
        for _ in range(rng.randint(1, 3)):
            target = rng.choice([p for p in paths(h) if p])
            parent = h
            for key in target[:-1]:
                parent = parent[key]
            op = rng.random()
            if op < 0.15 and isinstance(parent, dict):
                del parent[target[-1]]
            elif op < 0.25 and target[0] == "arch":
                h["arch"] = json.loads(json.dumps(rng.choice(EVIL)))
                return h
            elif op < 0.3 and isinstance(parent, dict):
                parent[rng.choice(["device", "dtype", "weights_only", "extra"])] = rng.choice(VALUES)
            else:
                parent[target[-1]] = rng.choice(VALUES)
        return h

    def with_header(h_text, body_bytes=body, st=st_header):
        st = json.loads(json.dumps(st))
        st["__metadata__"]["ttcompress"] = h_text
        blob = json.dumps(st).encode()
        return struct.pack("<Q", len(blob)) + blob + body_bytes

    def case(i):
        kind = i % 10
        if kind < 7:
            h = mutate(json.loads(json.dumps(header)))
            return with_header(json.dumps(h, allow_nan=True))
        if kind == 7:
            return raw[: rng.randint(1, len(raw) - 1)]  # truncated file
        if kind == 8:
            return with_header(json.dumps(header), body_bytes=body[: rng.randint(0, len(body) - 1)])
        return with_header(rng.choice(["{not json", "[" * 100000 + "]" * 100000, '{"version": 1, "arch": ' * 5000,
                                       json.dumps({"version": 1, "info": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
                                       "null", "1e999999"]))

    runner, command = CliRunner(), typer.main.get_command(app)  # built once: typer rebuilds it per invoke
    failures, outcomes = [], {"loaded": 0, "refused": 0}
    for i in range(n_cases):
        path = work / f"case{i}.tt.pt"
        path.write_bytes(case(i))
        try:
            load(path)
            outcomes["loaded"] += 1
        except TTCompressError as exc:
            outcomes["refused"] += 1
            if "\n" in str(exc):
                failures.append(f"case {i}: load error spans lines: {exc!r}")
        except BaseException as exc:  # noqa: BLE001 - anything else is the failure we look for
            failures.append(f"case {i}: load raised {type(exc).__name__}: {str(exc)[:200]}")
        result = runner.invoke(command, ["inspect", str(path)])
        lines = result.stderr.strip().splitlines()
        if result.exit_code not in (0, 2) or (result.exit_code == 2 and len(lines) != 1) or "Traceback" in result.stderr:
            failures.append(f"case {i}: inspect exit {result.exit_code}, {type(result.exception).__name__}: "
                            f"{result.stderr[-300:]}")
        path.unlink()
        if marker.exists():
            failures.append(f"case {i}: header-named code ran (marker created)")
            marker.unlink()
    print(json.dumps({"failures": failures, "outcomes": outcomes}))
''')


@pytest.fixture(scope="module")
def compressed_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seed-cnn with TT Linear layers and CP convs: every layer format in one header."""
    torch.manual_seed(0)
    model = compress(build_arch("seed-cnn", kwargs={"hidden": 32}), Plan(tt=TTSettings(ranks=2), cp=CPSettings(rank=2)))
    formats = {r["format"] for r in model.ttcompress_meta["layers"].values()}
    assert formats == {"tt", "cp"}
    return save(model, tmp_path_factory.mktemp("fuzz") / "base.tt.pt", info={"input_shape": [1, 28, 28]})


def test_fuzzed_headers_load_or_fail_with_one_line(compressed_ckpt: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ, str(compressed_ckpt), str(tmp_path), str(CASES), "20240909"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], "\n".join(report["failures"][:20])
    # the corpus exercises both outcomes: some mutations are harmless (info, rel_error), most are refused
    assert report["outcomes"]["refused"] > CASES // 2 and report["outcomes"]["loaded"] > 0, report["outcomes"]
    assert not (tmp_path / "MARKER").exists()
