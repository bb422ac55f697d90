"""Datasets: the embedded mnist-5k split, IDX/CIFAR/ImageFolder readers on tiny fake files, loaders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ttcompress.data import (
    DatasetBundle,
    EpochShuffleSampler,
    ImageTensorDataset,
    load_dataset,
    make_loader,
    read_idx,
)
from ttcompress.errors import DataError

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def fake_idx_dir(directory: Path, *, gz: bool, n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, arr in arrays.items():
        write_idx(directory / IDX_NAMES[key], arr, gz=gz)
    return arrays


def fake_cifar(directory: Path, *, per_batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        out[name] = data
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return out


# ------------------------------------------------------------------------------------ mnist-5k


@pytest.fixture(scope="module")
def mnist5k() -> DatasetBundle:
    return load_dataset("mnist-5k")


def test_mnist5k_split_is_fixed_stratified_and_disjoint(mnist5k: DatasetBundle) -> None:
    assert (len(mnist5k.train), len(mnist5k.test)) == (4000, 1000)
    assert mnist5k.num_classes == 10 and mnist5k.input_shape == (1, 28, 28)
    assert torch.bincount(mnist5k.train.targets).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test.targets).tolist() == [100] * 10
    # disjoint: no test image appears in train (images are distinct digits)
    train_keys = {bytes(x.numpy()) for x in mnist5k.train.images}
    assert not any(bytes(x.numpy()) in train_keys for x in mnist5k.test.images[:200])
    again = load_dataset("mnist-5k")
    assert torch.equal(again.test.images, mnist5k.test.images)


def test_mnist5k_items_are_normalized(mnist5k: DatasetBundle) -> None:
    x, y = mnist5k.train[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y.dtype == torch.int64
    raw = mnist5k.train.images[3].float() / 255
    torch.testing.assert_close(x, (raw - 0.1307) / 0.3081, rtol=0, atol=1e-5)
    batch = mnist5k.train.__getitems__([3, 7])
    torch.testing.assert_close(batch[0][0], x)
    assert int(batch[1][1]) == int(mnist5k.train[7][1])


# ------------------------------------------------------------------------------- IDX datasets


@pytest.mark.parametrize(
    ("name", "layout", "gz"),
    [
        ("mnist", "torchvision", False),
        ("mnist", "flat", True),
        ("fashion-mnist", "torchvision", False),
        ("fashion-mnist", "debian", True),
    ],
)
def test_idx_layouts(tmp_path: Path, name: str, layout: str, gz: bool) -> None:
    folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    directory = tmp_path / folder / "raw" if layout == "torchvision" else tmp_path
    arrays = fake_idx_dir(directory, gz=gz)
    bundle = load_dataset(name, root=tmp_path)
    assert bundle.name == name and bundle.num_classes == 10 and bundle.input_shape == (1, 28, 28)
    assert (len(bundle.train), len(bundle.test)) == (30, 20)
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(arrays["test_images"]))
    assert bundle.train.targets.tolist() == arrays["train_labels"].tolist()
    mean, std = bundle.mean[0], bundle.std[0]
    x, _ = bundle.train[5]
    torch.testing.assert_close(x[0], (torch.from_numpy(arrays["train_images"][5]).float() / 255 - mean) / std)
    if name == "fashion-mnist":
        assert bundle.classes[0] == "T-shirt/top"


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)  # float32 dtype code
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(bad)
    short = write_idx(tmp_path / "y-idx1-ubyte", np.arange(10), gz=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DataError, match="expected 10 values"):
        read_idx(short)
    notgz = tmp_path / "z.gz"
    notgz.write_bytes(b"plain")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(notgz)


def test_mismatched_idx_counts(tmp_path: Path) -> None:
    fake_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / IDX_NAMES["test_labels"], np.zeros(3), gz=False)
    with pytest.raises(DataError, match="do not match"):
        load_dataset("mnist", root=tmp_path)


def test_missing_roots_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a data root"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="needs a data root"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "nope")
    with pytest.raises(DataError, match="no mnist IDX files"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("mnist-5k", image_size=32)


def test_offline_download_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DataError, match="could not download mnist.*offline"):
        load_dataset("mnist", root=tmp_path, download=True)


# -------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_batches(tmp_path: Path, nested: bool) -> None:
    data = fake_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    bundle = load_dataset("cifar10", root=tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (20, 4)
    assert bundle.input_shape == (3, 32, 32) and bundle.classes[3] == "c3"
    assert torch.equal(bundle.test.images, torch.from_numpy(data["test_batch"]).view(4, 3, 32, 32))
    assert torch.equal(bundle.train.images[4:8], torch.from_numpy(data["data_batch_2"]).view(4, 3, 32, 32))
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 10


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    fake_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


# -------------------------------------------------------------------------------- ImageFolder


def _images(directory: Path, classes: dict[str, int], seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, n in classes.items():
        (directory / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(directory / cls / f"{i}.png")


def test_imagefolder_with_train_val(tmp_path: Path) -> None:
    _images(tmp_path / "train", {"cat": 3, "dog": 2})
    _images(tmp_path / "val", {"cat": 1, "dog": 1})
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert bundle.classes == ("cat", "dog") and bundle.num_classes == 2
    assert (len(bundle.train), len(bundle.test)) == (5, 2) and bundle.input_shape == (3, 8, 8)
    x, y = bundle.train[0]
    assert x.shape == (3, 8, 8) and y == 0
    loader = make_loader(bundle.train, batch_size=4, shuffle=False, num_workers=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 8, 8) and yb.tolist() == [0, 0, 0, 1]


def test_imagefolder_single_folder_is_split(tmp_path: Path) -> None:
    _images(tmp_path, {"a": 5, "b": 5})
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert (len(bundle.train), len(bundle.test)) == (8, 2)
    assert sorted(int(bundle.test[i][1]) for i in range(2)) == [0, 1]
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot read image folder"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


# ------------------------------------------------------------------------------------ loaders


def _tiny(n: int = 10) -> ImageTensorDataset:
    images = torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 2, 2)
    return ImageTensorDataset(images, torch.arange(n) % 3, mean=(0.0,), std=(1.0,))


def test_loader_order_depends_only_on_seed_and_epoch() -> None:
    ds = _tiny()
    loader = make_loader(ds, batch_size=4, shuffle=True, seed=3)
    assert loader.num_workers == 0 and isinstance(loader.sampler, EpochShuffleSampler)

    def order(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)
        return [round(float(x[i, 0, 0, 0]) * 255) // 4 for x, _ in loader for i in range(len(x))]

    first, again = order(1), order(1)
    assert first == again and sorted(first) == list(range(10))
    assert order(2) != first
    other = make_loader(ds, batch_size=4, shuffle=True, seed=3)
    other.sampler.set_epoch(1)
    assert [round(float(x[i, 0, 0, 0]) * 255) // 4 for x, _ in other for i in range(len(x))] == first


def test_loader_argument_checks() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(_tiny(), batch_size=0, shuffle=False)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(_tiny(), batch_size=2, shuffle=False, num_workers=-1)
    with pytest.raises(TypeError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2), mean=(0.0,), std=(1.0,))
