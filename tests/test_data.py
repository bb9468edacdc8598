"""Data loaders on files the tests write in the exact standard formats (nothing downloaded)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from subkern import data


def _write_idx(path: str, array: np.ndarray, gz: bool = False) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        with open(path, "wb") as handle:
            handle.write(payload)


def _fake_mnist(root: str, gz: bool, n_train: int = 7, n_test: int = 3):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)),
              "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, 28, 28)),
              "test_labels": rng.integers(0, 10, n_test)}
    for key, name in data.MNIST_FILES.items():
        _write_idx(os.path.join(root, name), arrays[key], gz=gz)
    return arrays


def test_digits_shapes_split_and_normalisation():
    split = data.load_digits()
    x, y = split.train.tensors
    xt, yt = split.test.tensors
    assert x.shape == (1438, 1, 8, 8) and xt.shape == (359, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert split.num_classes == 10 and split.in_shape == (1, 8, 8)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1.0) < 1e-3
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    again = data.load_digits()
    assert torch.equal(again.test.tensors[0], xt) and torch.equal(again.test.tensors[1], yt)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    arrays = _fake_mnist(str(tmp_path), gz)
    split = data.load_mnist(str(tmp_path))
    x, y = split.train.tensors
    assert x.shape == (7, 1, 28, 28) and split.in_shape == (1, 28, 28)
    assert torch.equal(y, torch.as_tensor(arrays["train_labels"], dtype=torch.int64))
    expected = (arrays["test_images"][1] / 255.0 - data.MNIST_MEAN) / data.MNIST_STD
    torch.testing.assert_close(split.test.tensors[0][1, 0],
                               torch.as_tensor(expected, dtype=torch.float32))
    assert torch.equal(data.load("mnist", str(tmp_path)).train.tensors[0], x)


def test_mnist_bad_files_raise_data_error(tmp_path):
    root = str(tmp_path)
    with pytest.raises(data.DataError, match="not found"):
        data.load_mnist(root)
    _fake_mnist(root, gz=False)
    path = os.path.join(root, data.MNIST_FILES["train_images"])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-5])
    with pytest.raises(data.DataError, match="data bytes"):
        data.load_mnist(root)
    open(path, "wb").write(b"\x00\x00\x0d\x03" + raw[4:])       # float dtype code
    with pytest.raises(data.DataError, match="not an idx-ubyte"):
        data.load_mnist(root)
    _write_idx(path, np.zeros((5, 28, 28)))                      # 5 images, 7 labels
    with pytest.raises(data.DataError, match="do not match"):
        data.load_mnist(root)
    gz_root = tmp_path / "gz"
    gz_root.mkdir()
    _fake_mnist(str(gz_root), gz=True)
    gz_path = os.path.join(str(gz_root), data.MNIST_FILES["test_labels"] + ".gz")
    open(gz_path, "wb").write(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_mnist(str(gz_root))


def _fake_cifar(root: str, per_batch: int = 4) -> dict:
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
                 b"filenames": [b"x.png"] * per_batch}
        with open(os.path.join(root, name), "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        batches[name] = batch
    return batches


def test_cifar10_pickle_batches(tmp_path):
    nested = tmp_path / "cifar-10-batches-py"
    nested.mkdir()
    batches = _fake_cifar(str(nested))
    split = data.load_cifar10(str(tmp_path))              # finds the nested folder
    x, y = split.train.tensors
    assert x.shape == (20, 3, 32, 32) and split.test.tensors[0].shape == (4, 3, 32, 32)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    raw = batches["data_batch_2"][b"data"][1].reshape(3, 32, 32) / 255.0
    mean = np.array(data.CIFAR10_MEAN).reshape(3, 1, 1)
    std = np.array(data.CIFAR10_STD).reshape(3, 1, 1)
    torch.testing.assert_close(x[5], torch.as_tensor((raw - mean) / std, dtype=torch.float32))
    assert split.in_shape == (3, 32, 32)


def test_cifar10_refuses_foreign_pickles_and_bad_batches(tmp_path):
    root = str(tmp_path)
    _fake_cifar(root)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(root, "test_batch"), "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(data.DataError, match="refusing"):
        data.load_cifar10(root)
    with open(os.path.join(root, "test_batch"), "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(data.DataError, match="3072"):
        data.load_cifar10(root)
    os.remove(os.path.join(root, "data_batch_3"))
    with pytest.raises(data.DataError, match="not found"):
        data.load_cifar10(root)


def test_load_dispatch_errors():
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load("cifar10", None)
    with pytest.raises(data.DataError, match="unknown data set"):
        data.load("svhn", "/nowhere")


def test_random_crop_flip_is_a_seeded_shifted_view():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    a = data.random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    b = data.random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(a, b) and a.shape == images.shape
    same = data.random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    for i in range(2):                                 # padding 0: the image or its mirror
        assert torch.equal(same[i], images[i]) or torch.equal(same[i], images[i].flip(-1))
    assert data.random_crop_flip(images[:0], torch.Generator()).shape == (0, 3, 6, 6)
