"""The user's own data: ``tensors:FILE``, ``package.module:callable`` and :func:`user_bundle`."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from ttcompress.data.bundle import DatasetBundle, sample_parts
from ttcompress.errors import DataError, TTCompressError
from ttcompress.inputs import MASK_KEY, main_tensor
from ttcompress.checkpoint.usercode import import_callable

__all__ = [
    "KeywordTensorDataset",
    "USER_SPLIT_SEED",
    "USER_TEST_FRACTION",
    "load_callable_data",
    "load_tensors_data",
    "random_split",
    "read_tensors_file",
    "user_bundle",
]

#: Fraction of a single user dataset held out as its test split, and the seed of that split.
USER_TEST_FRACTION = 0.1
USER_SPLIT_SEED = 0

_INPUT_KEYS = ("inputs", "x", "input_ids")
_TARGET_KEYS = ("targets", "y")


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
        train, test, split = random_split(full, name)
    x, _ = sample_parts(train[0])
    if isinstance(x, Mapping):  # named inputs, passed by keyword: the main one gives the shape
        x = main_tensor(x)
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


def random_split(full: Dataset, name: str) -> tuple[Dataset, Dataset, str]:
    """A seeded random split of ``full``: (train, test, a note saying how it was made)."""
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


def load_callable_data(spec: str) -> DatasetBundle:
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


class KeywordTensorDataset(Dataset):
    """Token ids with their ``attention_mask``: items are ``{"input_ids", "attention_mask"}``, or
    ``(that, target)`` with targets, so that a model takes them by keyword."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        self.ids, self.mask, self.targets = ids, mask, targets

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> Any:
        inputs = {"input_ids": self.ids[index], MASK_KEY: self.mask[index]}
        return inputs if self.targets is None else (inputs, self.targets[index])


def _checked_mask(mask: torch.Tensor, x: torch.Tensor, path: str) -> torch.Tensor:
    if tuple(mask.shape) != tuple(x.shape):
        raise DataError(f"tensors file {path}: {MASK_KEY} {tuple(mask.shape)} must have the shape of the inputs "
                        f"{tuple(x.shape)}")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError(f"tensors file {path}: {MASK_KEY} must hold only 0 and 1")
    return mask.to(torch.int64)


def load_tensors_data(path: str) -> DatasetBundle:
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
    if MASK_KEY in arrays:
        mask = _checked_mask(arrays[MASK_KEY], x, path)
        return user_bundle(KeywordTensorDataset(x, mask, y), name=f"tensors:{path}")
    return user_bundle(TensorDataset(x) if y is None else TensorDataset(x, y), name=f"tensors:{path}")
