"""Data sets for the reference training, from local files only (subkern never downloads).

* ``load_digits()``: scikit-learn's embedded 8x8 handwritten digits (1797 images, shipped with
  scikit-learn), as ``1 x 8 x 8`` images with a fixed 80/20 train/test split.
* ``load_mnist(root)``: MNIST from the four idx-ubyte files (optionally ``.gz``) in ``root``.
* ``load_cifar10(root)``: CIFAR-10 from the python pickle batches ``data_batch_1..5`` and
  ``test_batch`` in ``root`` (or ``root/cifar-10-batches-py``).
* ``load_imagenet(root)``: ImageNet from ``root/train/<class>/*`` and ``root/val/<class>/*``
  JPEGs, decoded per item with the official transforms (:mod:`subkern.data.imagenet`).

Every loader returns a ``Split(train, test, num_classes, in_shape)`` of datasets of ``float32``
images ``[C, H, W]`` (normalised with the mean/std the official code uses) and ``int64`` labels:
``TensorDataset``s held in memory, except ImageNet's folders. ``load(name, root)`` dispatches by
name (``DATASETS``).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .imagenet import EVAL_SIZE, ImageFolderDataset

DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "imagenet")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081                       # official data/mnist.py
CIFAR10_MEAN = (0.491, 0.482, 0.447)                          # official data/cifar.py
CIFAR10_STD = (0.247, 0.243, 0.262)
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A data file is missing or not in the expected format."""


@dataclass
class Split:
    """Train and test sets plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_shape: tuple[int, int, int]   # (channels, height, width)


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (images - mean_t) / std_t


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


def load_digits() -> Split:
    """scikit-learn's digits (values 0..16 scaled to [0, 1], then standardised with the training
    set's pixel mean and std); split: a fixed permutation (seed 0), 1438 train / 359 test."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:   # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits data set needs scikit-learn (pip install scikit-learn)") \
            from err
    bunch = _sk_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(DIGITS_TEST_FRACTION * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean = images[train_idx].mean().item()
    std = images[train_idx].std().item()
    images = _normalise(images, mean, std)
    return Split(TensorDataset(images[train_idx], labels[train_idx]),
                 TensorDataset(images[test_idx], labels[test_idx]), 10, (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# MNIST (idx-ubyte)
# ---------------------------------------------------------------------------------------------


def _open_maybe_gz(path: str) -> bytes:
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            try:
                with opener(candidate, "rb") as handle:
                    return handle.read()
            except (OSError, EOFError) as err:
                raise DataError(f"{candidate}: cannot read ({err})") from err
    raise DataError(f"{path}[.gz] not found")


def read_idx(path: str) -> np.ndarray:
    """Read an idx-ubyte file (``path`` or ``path.gz``): magic ``0x0000 0x08 ndim``, ``ndim``
    big-endian uint32 sizes, then the unsigned bytes."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise DataError(f"{path}: not an idx-ubyte file (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"{path}: {len(raw) - header} data bytes, expected {count} for {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(root: str) -> Split:
    """MNIST from ``root`` (the four standard idx-ubyte files, plain or ``.gz``)."""
    arrays = {key: read_idx(os.path.join(root, name)) for key, name in MNIST_FILES.items()}
    sets = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {part}: images {images.shape} and labels {labels.shape} "
                            "do not match")
        if labels.size and labels.max() > 9:
            raise DataError(f"MNIST {part}: label {int(labels.max())} out of range 0..9")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        sets.append(TensorDataset(_normalise(x, MNIST_MEAN, MNIST_STD),
                                  torch.from_numpy(labels.astype(np.int64))))
    height, width = arrays["train_images"].shape[1:]
    return Split(sets[0], sets[1], 10, (1, int(height), int(width)))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# ---------------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds what a CIFAR batch holds: numpy arrays and plain types."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                               "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (no dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: missing 'data' or 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape} are not N x 3072 / N")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels out of range 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str) -> Split:
    """CIFAR-10 from ``root`` or ``root/cifar-10-batches-py``."""
    nested = os.path.join(root, "cifar-10-batches-py")
    if os.path.isdir(nested):
        root = nested
    parts = []
    for names in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
        batches = [_read_cifar_batch(os.path.join(root, name)) for name in names]
        data = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        x = torch.from_numpy(data.astype(np.float32) / 255.0)
        parts.append(TensorDataset(_normalise(x, CIFAR10_MEAN, CIFAR10_STD),
                                   torch.from_numpy(labels)))
    return Split(parts[0], parts[1], 10, (3, 32, 32))


def random_crop_flip(images: torch.Tensor, generator: torch.Generator,
                     padding: int = 4) -> torch.Tensor:
    """CIFAR training augmentation of the official code, batched: zero-pad by ``padding``, crop
    back at a random offset, flip horizontally with probability 1/2 (one draw per image)."""
    n, _, height, width = images.shape
    if n == 0:
        return images
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy:dy + height, dx:dx + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def load_imagenet(root: str, seed: int = 0) -> Split:
    """ImageNet from ``root/train/<class>/*`` and ``root/val/<class>/*`` (``seed``: the training
    transform's random draws). Raises ``DataError`` for a missing or inconsistent folder."""
    try:
        train = ImageFolderDataset(os.path.join(root, "train"), train=True, seed=seed)
        test = ImageFolderDataset(os.path.join(root, "val"), train=False, classes=train.classes)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err)) from err
    return Split(train, test, len(train.classes), (3, EVAL_SIZE, EVAL_SIZE))


def load(name: str, root: str | None = None, seed: int = 0) -> Split:
    """Load data set ``name`` (``DATASETS``); ``root`` is the folder for mnist / cifar10 /
    imagenet; ``seed`` seeds ImageNet's per-item training transform."""
    if name == "digits":
        return load_digits()
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if not root:
        raise DataError(f"--data {name} needs --data-dir (subkern does not download data)")
    if name == "imagenet":
        return load_imagenet(root, seed)
    return load_mnist(root) if name == "mnist" else load_cifar10(root)
