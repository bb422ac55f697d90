"""Calibration inputs: normalise what a user passes as ``calib_data`` into input batches.

Data-aware decomposition only needs inputs, never labels: every accepted form is reduced to an
iterator of input batches whose first dimension is the batch: tensors, or mappings of named
tensors (``input_ids``, ``attention_mask``) that the model takes by keyword.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from ttcompress.errors import DataError
from ttcompress.inputs import batch_size_of, main_tensor, take_rows

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_CALIB_SAMPLES", "HandedOverBatches", "all_finite", "calib_batches", "dataset_targets",
           "gather_in_place", "named_calibration", "sample_calibration_set"]

#: Rows per batch when ``calib_data`` is one big tensor or a map-style ``Dataset``.
DEFAULT_BATCH_SIZE = 128

#: Calibration samples that ``decompose --data``, ``sweep`` and the demo draw from a training split
#: (docs/results.md compares 128 / 512 / 2048).
DEFAULT_CALIB_SAMPLES = 512

#: Values checked for NaN / Inf at a time (bounds the check's temporaries, whatever the batch's size).
_FINITE_BLOCK = 1 << 22


def calib_batches(calib_data: Any, *, max_samples: int | None = None) -> Iterator[Any]:
    """Iterate over the input batches of ``calib_data``; targets are dropped.

    Parameters
    ----------
    calib_data : tensor, iterable, DataLoader or Dataset
        One of: a tensor (its first dimension is the batch; split into batches of
        :data:`DEFAULT_BATCH_SIZE`); a map-style :class:`torch.utils.data.Dataset` (batched by a
        non-shuffling ``DataLoader``); a ``DataLoader`` or any other iterable whose items are
        tensors or ``(input, target, ...)`` tuples / lists with a tensor first (the rest is
        ignored). An input may also be a mapping of names to tensors (a language model's
        ``input_ids`` and ``attention_mask``), passed to the model by keyword.
    max_samples : int, optional
        Stop after this many samples (rows of the first dimension), cutting the last batch.

    Returns
    -------
    iterator of torch.Tensor or dict of str to torch.Tensor
        Batches with at least one sample each. The type of ``calib_data`` is checked at once;
        the items are checked as they are read.

    Raises
    ------
    TypeError
        ``calib_data`` is not one of the accepted forms, or one of its items is not a tensor /
        a tuple or list with a tensor first.
    ValueError
        ``calib_data`` holds no samples, an item is a 0-d tensor, or ``max_samples < 1``.
    DataError
        A sample holds NaN or Inf (the first one is named: its position, and its index in the
        dataset when ``calib_data`` is a ``Subset``); checked as the batches are read.
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)):
        raise TypeError(f"max_samples must be an int, got {type(max_samples).__name__}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() == 0:
            raise ValueError("calib_data must have a batch dimension, got a 0-d tensor")
        items: Iterable[Any] = calib_data.split(DEFAULT_BATCH_SIZE)
    elif isinstance(calib_data, Dataset) and not isinstance(calib_data, IterableDataset):
        if not hasattr(calib_data, "__len__"):
            raise TypeError(f"calib_data is a Dataset without __len__ ({type(calib_data).__name__})")
        items = DataLoader(calib_data, batch_size=DEFAULT_BATCH_SIZE, shuffle=False)
    elif isinstance(calib_data, (str, bytes, dict)) or not isinstance(calib_data, Iterable):
        raise TypeError("calib_data must be a tensor, an iterable of tensors or (input, target) pairs, "
                        f"a DataLoader or a Dataset, got {type(calib_data).__name__}")
    else:
        items = calib_data
    return _batches(items, max_samples, calib_data if isinstance(calib_data, Subset) else None)


def _batches(items: Iterable[Any], max_samples: int | None, subset: Subset | None) -> Iterator[Any]:
    seen = 0
    for index, item in enumerate(items):
        x = _input_of(item, index)
        if max_samples is not None:
            x = take_rows(x, max_samples - seen)
        if batch_size_of(x) == 0:
            continue
        _check_finite(main_tensor(x), seen, subset)
        seen += batch_size_of(x)
        yield x
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise ValueError("calib_data is empty: it holds no input samples")


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN / Inf, checked by blocks of :data:`_FINITE_BLOCK` values (``isfinite``'s
    temporaries of a whole 4,096 x 11,008 weight were 0.2 GB)."""
    return all(bool(torch.isfinite(block).all()) for block in x.reshape(-1).split(_FINITE_BLOCK))


def _check_finite(x: torch.Tensor, start: int, subset: Subset | None) -> None:
    """:class:`DataError` naming the first sample of batch ``x`` (samples ``start``, ...) holding NaN or Inf.

    For a ``Subset`` (of a ``Subset``, ...) the sample's index in the dataset underneath is named too.
    """
    if not (x.is_floating_point() or x.is_complex()):
        return
    # by blocks of samples: the mask of a whole batch (a byte per value) and isfinite's temporaries
    # would be as large as the batch itself (1.4 GB for 16,384 rows of 11,008 features)
    per_sample = max(1, x[0].numel())
    step = max(1, _FINITE_BLOCK // per_sample)
    finite = torch.cat([torch.isfinite(block.reshape(block.shape[0], -1)).all(dim=1) for block in x.split(step)])
    if bool(finite.all()):
        return
    k = start + int((~finite).nonzero()[0, 0])
    where, ds, index = "", subset, k
    with contextlib.suppress(IndexError, TypeError):
        while isinstance(ds, Subset):
            index, ds = int(ds.indices[index]), ds.dataset
        if subset is not None:
            where = f" (sample {index} of the dataset it was drawn from)"
    raise DataError(f"calib_data sample {k}{where} has NaN or Inf values; calibration needs finite inputs")


class HandedOverBatches(list):  # type: ignore[type-arg]
    """Input batches (checked for NaN / Inf) that their maker hands over to the calibration: the
    statistics collector keeps this very list and **empties it** once the last layer's statistics
    are taken (:meth:`~ttcompress.calibration.collector.StatsCollector.release`), so that the data
    are freed before that layer is fitted. Only for data nobody else reads (``decompose --data
    tensors:FILE``: the batches are views of the file's tensor, which nothing else holds); a plain
    list passed to the Python API is never emptied."""


def gather_in_place(subset: Subset) -> torch.Tensor | None:
    """The inputs of ``subset`` as one tensor, gathered in place: no copy of the calibration data.

    For a ``Subset`` (of a ``Subset``, ...) of a :class:`~torch.utils.data.TensorDataset` whose
    indices into it increase (:func:`sample_calibration_set` and the seeded train/test splits sort
    theirs), row ``i`` of the dataset's input tensor is overwritten by the ``i``-th chosen row (a
    chosen row ``j >= i`` is read before anything overwrites it) and its first ``len(subset)`` rows
    are returned as a view: the batches of :func:`calib_batches` are then views too, the same values
    as the ``Subset``'s in the same order. The dataset underneath is **destroyed**: only for data the
    caller loaded itself and reads no more (``decompose --data tensors:FILE``). Its samples are
    checked for NaN / Inf, named by their index in the dataset as for the ``Subset``. None (nothing
    changed) for any other dataset.
    """
    indices, ds = list(range(len(subset))), subset
    while isinstance(ds, Subset):
        indices, ds = [int(ds.indices[i]) for i in indices], ds.dataset
    if type(ds) is not TensorDataset or not indices or any(b <= a for a, b in zip(indices, indices[1:])):
        return None
    x = ds.tensors[0]
    for i, j in enumerate(indices):
        if i != j:
            x[i].copy_(x[j])
    rows = x[:len(indices)]
    _check_finite(rows, 0, subset)
    return rows


@contextlib.contextmanager
def named_calibration(info: Mapping[str, Any] | None) -> Iterator[None]:
    """Inside, a :class:`DataError` about ``calib_data`` names the dataset that ``info["dataset"]`` records."""
    try:
        yield
    except DataError as exc:
        name = (info or {}).get("dataset")
        text = str(exc)
        if name is None or not text.startswith("calib_data "):
            raise
        raise DataError(f"calibration data {name}: {text[len('calib_data '):]}") from None


def _input_of(item: Any, index: int) -> Any:
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, Mapping):
        try:
            first = main_tensor(item)
        except TypeError:
            raise TypeError(f"calib_data item {index} is a mapping without tensors") from None
        if first.dim() == 0 or any(isinstance(v, torch.Tensor) and v.shape[:1] != first.shape[:1] for v in item.values()):
            raise ValueError(f"calib_data item {index}: every tensor of an input mapping needs the same batch dimension")
        return item
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"calib_data item {index} must be a tensor or an (input, target) pair with a "
                        f"tensor input, got {type(item).__name__}")
    if item.dim() == 0:
        raise ValueError(f"calib_data item {index} is a 0-d tensor; inputs need a batch dimension")
    return item


def dataset_targets(dataset: Dataset) -> torch.Tensor | None:
    """The class labels of ``dataset`` as a 1-D int64 tensor, or None when it exposes none.

    Reads a ``targets`` attribute (tensor, array or list, as torchvision datasets and
    :class:`ttcompress.data.ImageTensorDataset` have), looking through
    :class:`torch.utils.data.Subset` wrappers.
    """
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        if parent is None:
            return None
        return parent[torch.as_tensor(list(dataset.indices), dtype=torch.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        t = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.numel() != len(dataset):  # type: ignore[arg-type]
        return None
    return t.to(torch.int64)


def sample_calibration_set(dataset: Dataset, *, n: int, seed: int = 0) -> Subset:
    """A seeded subset of ``n`` samples of ``dataset``, class-balanced when it has labels.

    With labels (see :func:`dataset_targets`) the classes are visited in turn, each giving its
    next sample in a seeded random order, so class counts differ by at most one (a class that
    runs out drops out). Without labels the subset is a seeded random choice. ``n`` larger than
    the dataset takes all of it. Indices are returned in increasing order.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        A map-style dataset with ``__len__``.
    n : int
        Number of samples, ``>= 1``.
    seed : int, default 0
        Seed of the random choice.

    Raises
    ------
    TypeError
        ``dataset`` is not a sized map-style dataset, or ``n`` / ``seed`` are not ints.
    ValueError
        ``n < 1`` or the dataset is empty.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n (number of calibration samples) must be >= 1, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style Dataset with a length, got {type(dataset).__name__}")
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("dataset is empty")
    gen = torch.Generator().manual_seed(seed)
    targets = dataset_targets(dataset)
    if targets is None:
        chosen: Sequence[int] = torch.randperm(size, generator=gen)[:n].tolist()
    else:
        chosen = _balanced(targets, n, gen)
    return Subset(dataset, sorted(chosen))


def _balanced(targets: torch.Tensor, n: int, gen: torch.Generator) -> list[int]:
    per_class = []
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        per_class.append(idx[torch.randperm(idx.numel(), generator=gen)].tolist())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(depth < len(p) for p in per_class):
        chosen.extend(p[depth] for p in per_class if depth < len(p))
        depth += 1
    return chosen[:n]
