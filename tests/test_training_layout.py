"""Where the training code lives: reports measure without the loop; ``ttcompress.train`` is the function."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ttcompress.training as training
from ttcompress.cli.progress import RichProgress
from ttcompress.report.evaluation import evaluate, resolve_device
from ttcompress.training.records import TrainCallback


def test_report_and_evaluation_do_not_import_the_training_loop() -> None:
    code = (
        "import sys, ttcompress.report.compare, ttcompress.report.evaluation\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('ttcompress.training'))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_library_does_not_import_the_cli() -> None:
    code = (
        "import sys, ttcompress.training, ttcompress.sweep, ttcompress.demo\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('ttcompress.cli'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_public_train_is_the_training_function() -> None:
    import ttcompress

    assert ttcompress.train is training.train  # no submodule named ``train`` can shadow it
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ttcompress.train(object(), object(), output="unused.pt")


def test_rich_progress_is_a_train_callback() -> None:
    assert issubclass(RichProgress, TrainCallback)
