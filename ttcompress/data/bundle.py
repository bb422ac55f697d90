"""The dataset bundle and in-memory image dataset shared by every data source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ttcompress.errors import DataError

__all__ = ["DatasetBundle", "ImageTensorDataset", "class_labels", "dataset_targets", "sample_parts"]


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


def class_labels(dataset: Dataset) -> np.ndarray | None:
    """Int class labels of every sample (see :func:`dataset_targets`), or None when there are none."""
    try:
        labels = dataset_targets(dataset)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError, DataError):  # e.g. token labels
        return None
    return labels


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
