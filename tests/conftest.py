"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ttcompress.checkpoint.io import build_model


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    # The test models are tiny: one intra-op thread is faster and steadier than two on the 2-core
    # CI machine (no thread wake-ups per small op), and results do not depend on the core count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed-cnn state dict (seed 0), saved once per test module."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    torch.save(build_model("seed-cnn").state_dict(), path)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is available (``pytest -m cuda`` on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
