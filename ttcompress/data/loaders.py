"""Loaders and subsets: seeded, resumable ``DataLoader`` s, class-balanced subsets, model/data checks."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset, default_collate

from ttcompress.modtree import eval_mode
from ttcompress.data.bundle import DatasetBundle, class_labels, sample_parts
from ttcompress.checkpoint.dtypes import DTYPE_ERROR
from ttcompress.errors import DataError, UserInputError
from ttcompress.inputs import call_model, move_inputs
from ttcompress.outputs import primary_output

__all__ = ["EpochShuffleSampler", "balanced_subset", "check_model_fits", "make_loader"]


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
    targets = class_labels(dataset)
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
    x = move_inputs(default_collate([sample_parts(ds[i])[0] for i in range(n)]), device)
    shape = tuple(bundle.input_shape)
    try:
        with eval_mode(model), torch.no_grad():
            out = primary_output(call_model(model, x), what=what)
    except UserInputError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:  # a mismatch
        # (transformers raises AttributeError for an input it needs and did not get: CLIP's pixel_values)
        text = ' '.join(str(exc).split())[:300]
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.parameters() if t.is_floating_point()})
        mismatched = len(dtypes) > 1 or (x.is_floating_point() and dtypes
                                         and dtypes != [str(x.dtype).removeprefix("torch.")])
        if DTYPE_ERROR.search(text) and mismatched:  # else (e.g. float images where token ids are taken) the data
            raise UserInputError(
                f"{what} has a dtype problem, not a data problem: its parameters are {', '.join(dtypes) or 'not floating'} "
                f"and it cannot run on {bundle.name}'s {str(x.dtype).removeprefix('torch.')} inputs ({text}); "
                "convert it to one dtype (e.g. model.float()) and save it again"
            ) from exc
        raise UserInputError(
            f"{what} does not fit {bundle.name}: it cannot take inputs of shape {shape} "
            f"({' '.join(str(exc).split())[:300]})"
        ) from exc
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
