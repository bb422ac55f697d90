"""Directory outputs (``export --format hf``) are written like files: all or nothing, no temp left behind.

Issue 20, defect 9: SIGTERM during ``export --format hf`` killed the process (exit -15) and left
``.out.tmp-XXXX`` beside the output; after a SIGKILL, the next write did not remove it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ttcompress.fsutil import atomic_dir

ROOT = Path(__file__).resolve().parents[1]


def run_child(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip


def test_sigterm_inside_atomic_dir_removes_the_temp_dir_and_exits_143(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous")
    proc = run_child(f"""
        import os, signal
        from pathlib import Path
        from ttcompress.fsutil import atomic_dir
        with atomic_dir(Path({str(dest)!r}), overwrite=True) as tmp:
            (tmp / "a.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            (tmp / "b.bin").write_bytes(b"never")
        print("not reached")
        """)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dest) == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "previous"


def test_sigterm_during_export_hf_leaves_nothing(tmp_path: Path) -> None:
    """The CLI end to end; the signal arrives deterministically while the weights are being written."""
    pytest.importorskip("transformers")
    src, out = tmp_path / "gpt2", tmp_path / "exported"
    proc = run_child(f"""
        import os, signal, sys
        import safetensors.torch, transformers
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
        transformers.GPT2LMHeadModel(config).save_pretrained({str(src)!r}, safe_serialization=True)
        real = safetensors.torch.save_file

        def save_then_terminated(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), signal.SIGTERM)

        safetensors.torch.save_file = save_then_terminated
        from ttcompress.cli import main
        sys.argv = ["ttcompress", "export", {str(src)!r}, "--format", "hf", "-o", {str(out)!r}]
        main()
        """)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr[-2000:])
    assert sorted(os.listdir(tmp_path)) == ["gpt2"], os.listdir(tmp_path)


def test_a_dead_writers_temp_dirs_are_removed_by_the_next_write(tmp_path: Path) -> None:
    dead, me = dead_pid(), os.getpid()
    stale = [f".out.{dead}.abcd_123.tmpdir", ".out.tmp-k3j4h5g6"]
    kept = [f".out.{me}.abcd_123.tmpdir", f".out.x.{dead}.abcd_123.tmpdir", ".other.tmp-k3j4h5g6", ".out.notours"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"junk")
    with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert not any((tmp_path / n).exists() for n in stale) and all((tmp_path / n).exists() for n in kept)


def test_an_output_displaced_by_a_killed_write_is_put_back(tmp_path: Path) -> None:
    """Killed between its two renames, a write leaves the previous output in ``.NAME.PID.R.olddir``."""
    old = tmp_path / f".out.{dead_pid()}.abcd_123.olddir"
    (old / "out").mkdir(parents=True)
    (old / "out" / "weights").write_text("previous")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(tmp_path / "out", overwrite=False):
            raise AssertionError("not reached: the restored output exists")
    assert (tmp_path / "out" / "weights").read_text() == "previous" and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_write_keeps_the_previous_directory(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "weights").write_text("previous")
    with pytest.raises(RuntimeError, match="check failed"):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
            raise RuntimeError("check failed")
    assert (dest / "weights").read_text() == "previous" and sorted(os.listdir(tmp_path)) == ["out"]
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]
