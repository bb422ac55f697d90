"""Child process of the fuzz suite (``tests/fuzzing.py``): run many CLI cases in one interpreter.

Usage: ``python fuzz_driver.py CASES.json RESULTS.jsonl MEM_GB``

Importing torch and transformers costs seconds, so one child runs a batch of cases, each through
``ttcompress.cli.main()`` exactly as ``python -m ttcompress ARGS`` would: ``sys.argv`` set, file
descriptors 1 and 2 redirected to files (so warnings and log handlers bound to the real stderr are
captured too), ``SystemExit`` caught for the exit code. After the imports the address space is
capped at what the interpreter maps plus ``MEM_GB`` (``RLIMIT_AS``), and every case has its own
wall-clock limit (``SIGALRM``): a case over it writes ``"timeout"`` and ends the child, which the
parent restarts for the remaining cases. Results are appended to RESULTS.jsonl: a ``start`` record
before each case and a result record after it, so a child that dies is blamed on its case.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import warnings


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _clear_warning_registries() -> None:
    # A fresh process prints every warning once; so must each case (a one-line error must stay one line).
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()


def main() -> None:
    cases_path, results_path, mem_gb = sys.argv[1], sys.argv[2], float(sys.argv[3])
    cases = json.loads(open(cases_path, encoding="utf-8").read())

    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 - imported before the cap, as the HF cases need it anyway

    from ttcompress.cli import COMMANDS, load_command
    from ttcompress.cli import main as cli_main

    for name in COMMANDS:  # command modules imported before the cap too
        load_command(name)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + int(mem_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))

    results = open(results_path, "a", encoding="utf-8")
    scratch = tempfile.mkdtemp(prefix="fuzz-driver-")
    err_path, out_path = os.path.join(scratch, "stderr"), os.path.join(scratch, "stdout")
    saved_out, saved_err = os.dup(1), os.dup(2)
    current: dict[str, object] = {}

    def emit(record: dict[str, object]) -> None:
        results.write(json.dumps(record) + "\n")
        results.flush()

    def restore_fds() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)

    def read_err() -> str:
        with open(err_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-8000:]

    def on_timeout(signum: int, frame: object) -> None:
        restore_fds()
        emit({"id": current["id"], "exit": "timeout", "stderr": read_err(), "seconds": current["timeout"]})
        os._exit(124)

    signal.signal(signal.SIGALRM, on_timeout)
    for case in cases:
        current.update(id=case["id"], timeout=case["timeout"])
        emit({"id": case["id"], "event": "start"})
        _clear_warning_registries()
        warnings.resetwarnings()
        os.chdir(case["cwd"])
        sys.stdout.flush()
        sys.stderr.flush()
        fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        os.close(fd_out)
        os.close(fd_err)
        sys.argv = ["ttcompress", *case["argv"]]
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, case["timeout"])
        try:
            cli_main()
            code: object = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - main() must not raise: report what escaped
            code = f"uncaught {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            restore_fds()
        emit({"id": case["id"], "exit": code, "stderr": read_err(), "seconds": round(time.monotonic() - start, 3)})
    results.close()
    os.unlink(err_path)
    os.unlink(out_path)
    os.rmdir(scratch)


if __name__ == "__main__":
    main()
