"""What a model file records about its data, as far as the command line may act on it.

A checkpoint is data: the dataset name it records is used as a default only when it is one of the
built-in datasets (no path read, nothing imported because a file says so), and its recorded input
shape lets a command refuse a default dataset the model cannot take before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ttcompress.errors import UserInputError
from ttcompress.checkpoint.io import read_header

__all__ = ["DEFAULT_DATA", "RECORDED_DATASETS", "check_default_data", "recorded_dataset"]

#: The dataset a command uses when neither ``--data`` nor the model file names one.
DEFAULT_DATA = "mnist-5k"
#: Datasets a checkpoint may name for a default: built in, so naming one imports nothing and
#: reads no path taken from the file.
RECORDED_DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "cifar10")
#: Input shapes of the built-in datasets (channels, height, width).
_SHAPES = {"mnist-5k": (1, 28, 28), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _info(model: Path) -> dict[str, Any]:
    if model.is_dir() or not model.is_file():
        return {}
    header = read_header(model)
    info = header.get("info") if isinstance(header, dict) else None
    return info if isinstance(info, dict) else {}


def recorded_dataset(model: Path) -> str | None:
    """The built-in dataset a ttcompress checkpoint says its model was trained on, else ``None``.

    Only the names in :data:`RECORDED_DATASETS` count: a recorded ``tensors:FILE``,
    ``imagefolder:PATH`` or ``package.module:callable`` is never acted on.
    """
    return _dataset_of(_info(model))


def _dataset_of(info: dict[str, Any]) -> str | None:
    name = info.get("dataset")
    return name if isinstance(name, str) and name in RECORDED_DATASETS else None


def check_default_data(model: Path, data: str | None) -> str:
    """The dataset to use when ``--data`` was ``data`` (``None``: not given), checked against the model.

    Not given: the built-in dataset the file records, else :data:`DEFAULT_DATA` -- refused in one
    line (before anything is loaded) when the file records an input shape that dataset does not
    have, so the user is told to pass ``--data`` instead of meeting a shape error later.
    """
    if data is not None:
        return data
    info = _info(model)  # the header is read once
    name = _dataset_of(info) or DEFAULT_DATA
    shape = info.get("input_shape")
    if isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        if tuple(shape) != _SHAPES[name]:
            raise UserInputError(
                f"{model.name} takes inputs of shape {list(shape)} (recorded in the file), and the default dataset "
                f"{name} has {list(_SHAPES[name])}: pass --data with the model's dataset")
    return name
