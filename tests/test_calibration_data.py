"""``calib_data`` in every accepted form, and the calibration subset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from ttcompress.calibration.data import calib_batches, dataset_targets, sample_calibration_set
from ttcompress.data import ImageTensorDataset

X = torch.arange(300 * 3, dtype=torch.float32).reshape(300, 3)
Y = torch.arange(300) % 4


@pytest.mark.parametrize("form", [
    "tensor", "list", "pairs", "lists", "generator", "loader", "dataset", "unlabelled_dataset",
])
def test_every_form_gives_the_inputs(form):
    data = {
        "tensor": lambda: X,
        "list": lambda: list(X.split(50)),
        "pairs": lambda: [(x, y) for x, y in zip(X.split(70), Y.split(70))],
        "lists": lambda: [[x, y] for x, y in zip(X.split(70), Y.split(70))],
        "generator": lambda: (x for x in X.split(33)),
        "loader": lambda: DataLoader(TensorDataset(X, Y), batch_size=64),
        "dataset": lambda: TensorDataset(X, Y),
        "unlabelled_dataset": lambda: TensorDataset(X),
    }[form]
    torch.testing.assert_close(torch.cat(list(calib_batches(data()))), X)
    cut = list(calib_batches(data(), max_samples=101))
    torch.testing.assert_close(torch.cat(cut), X[:101])


def test_three_d_inputs_and_integer_inputs_pass_through():
    seq = torch.randn(5, 7, 4)
    assert torch.equal(next(calib_batches([seq])), seq)
    tokens = torch.randint(0, 9, (4, 6))
    assert torch.equal(next(calib_batches((tokens, None) for _ in range(1))), tokens)


@pytest.mark.parametrize("bad,exc", [
    (None, TypeError), ("images", TypeError), ({"x": X}, TypeError), (5, TypeError),
    ([], ValueError), (torch.empty(0, 3), ValueError), (torch.tensor(1.0), ValueError),
    ([1, 2], TypeError), ([torch.tensor(2.0)], ValueError), (TensorDataset(torch.empty(0, 3)), ValueError),
])
def test_bad_calib_data(bad, exc):
    with pytest.raises(exc, match="calib_data"):
        list(calib_batches(bad))


def test_bad_max_samples():
    with pytest.raises(ValueError, match="max_samples"):
        calib_batches(X, max_samples=0)
    with pytest.raises(TypeError, match="max_samples"):
        calib_batches(X, max_samples=1.5)  # type: ignore[arg-type]


def _images(labels: torch.Tensor) -> ImageTensorDataset:
    images = torch.zeros(labels.numel(), 1, 2, 2, dtype=torch.uint8)
    return ImageTensorDataset(images, labels, mean=(0.0,), std=(1.0,))


def test_sample_is_class_balanced_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5 + [3] * 15)
    ds = _images(labels)
    sub = sample_calibration_set(ds, n=40, seed=3)
    counts = torch.bincount(labels[sub.indices], minlength=4).tolist()
    assert sum(counts) == 40 and counts[2] == 5  # the small class gives all it has
    assert max(counts) - min(c for i, c in enumerate(counts) if i != 2) <= 1
    assert sub.indices == sample_calibration_set(ds, n=40, seed=3).indices
    assert sub.indices != sample_calibration_set(ds, n=40, seed=4).indices
    assert sub.indices == sorted(sub.indices)
    inner = Subset(ds, list(range(0, 100, 2)))
    assert torch.equal(dataset_targets(inner), labels[::2])
    assert len(sample_calibration_set(inner, n=8).indices) == 8
    assert len(sample_calibration_set(ds, n=1000).indices) == 100


def test_sample_without_labels_and_bad_n():
    ds = TensorDataset(torch.randn(20, 3))
    assert dataset_targets(ds) is None
    sub = sample_calibration_set(ds, n=7, seed=1)
    assert len(set(sub.indices)) == 7
    with pytest.raises(ValueError, match="n "):
        sample_calibration_set(ds, n=0)
    with pytest.raises(TypeError, match="dataset"):
        sample_calibration_set([1, 2, 3], n=2)  # type: ignore[arg-type]
