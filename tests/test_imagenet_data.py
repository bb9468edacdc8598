"""subkern.data.imagenet: the ImageNet folder loader and its transforms, on a tiny generated
folder of JPEGs (the machines here hold no ImageNet), and `subkern train str --data imagenet`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from subkern import cli
from subkern import data as data_mod
from subkern.data.imagenet import (
    EVAL_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    random_resized_crop_box,
)
from subkern.training import evaluate

Image = pytest.importorskip("PIL.Image")

SIZES = [(300, 200), (180, 260), (50, 40), (224, 224)]


def _write_image(path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def _make_folder(root, classes=("n01440764", "n01443537"), per_class=3, val_per_class=1):
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = SIZES[(i + c) % len(SIZES)]
                _write_image(folder / f"img_{i}.JPEG", w, h, seed=100 * c + i)
            (folder / "notes.txt").write_text("not an image")   # ignored
    return root


def test_load_imagenet_split_shapes_and_labels(tmp_path):
    split = data_mod.load("imagenet", str(_make_folder(tmp_path)))
    assert split.num_classes == 2 and split.in_shape == (3, EVAL_SIZE, EVAL_SIZE)
    assert len(split.train) == 6 and len(split.test) == 2
    x, y = split.train[4]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    xv, yv = split.test[0]
    assert xv.shape == (3, 224, 224) and yv == 0
    assert torch.isfinite(x).all() and torch.isfinite(xv).all()


def test_transforms_are_seeded_per_epoch_and_eval_is_fixed(tmp_path):
    root = _make_folder(tmp_path)
    a = ImageFolderDataset(str(root / "train"), train=True, seed=3)
    b = ImageFolderDataset(str(root / "train"), train=True, seed=3)
    assert torch.equal(a[0][0], b[0][0])             # same seed, epoch, index: same crop
    a.set_epoch(1)
    assert not torch.equal(a[0][0], b[0][0])         # another epoch: another crop
    b.set_epoch(1)
    assert torch.equal(a[0][0], b[0][0])             # resumable: the epoch decides
    val = ImageFolderDataset(str(root / "val"), train=False)
    assert torch.equal(val[1][0], val[1][0])


def test_eval_transform_is_resize_256_centre_crop_224(tmp_path):
    folder = tmp_path / "val" / "c0"
    folder.mkdir(parents=True)
    # a constant image: every output pixel is the normalised colour
    Image.new("RGB", (512, 300), (255, 0, 128)).save(folder / "a.png")
    x, _ = ImageFolderDataset(str(tmp_path / "val"), train=False)[0]
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255 - torch.tensor(IMAGENET_MEAN)) / \
        torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 112, 112], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 2000), height=st.integers(1, 2000), seed=st.integers(0, 2**31))
def test_random_resized_crop_box_fits_and_respects_the_ranges(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    left, top, w, h = random_resized_crop_box(width, height, g)
    assert 0 <= left and 0 <= top and 0 < w and 0 < h
    assert left + w <= width and top + h <= height
    # a drawn box keeps its area in [8 %, 100 %] and its ratio in [3/4, 4/3] (with rounding);
    # the fallback (a centre crop of the clamped ratio) covers a whole side
    drawn = (w * h >= 0.08 * width * height * 0.9
             and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1)
    assert drawn or w == width or h == height


def test_bad_folders_are_refused_clearly(tmp_path):
    with pytest.raises(data_mod.DataError, match="no folder"):
        data_mod.load("imagenet", str(tmp_path))
    root = _make_folder(tmp_path / "a")
    (root / "val" / "n99999999").mkdir()
    with pytest.raises(data_mod.DataError, match="other class folders"):
        data_mod.load("imagenet", str(root))
    empty = tmp_path / "b"
    (empty / "train" / "c0").mkdir(parents=True)
    (empty / "val" / "c0").mkdir(parents=True)
    with pytest.raises(data_mod.DataError, match="no images"):
        data_mod.load("imagenet", str(empty))
    with pytest.raises(data_mod.DataError, match="needs --data-dir"):
        data_mod.load("imagenet", None)


def test_corrupt_image_names_the_file(tmp_path):
    root = _make_folder(tmp_path)
    bad = root / "train" / "n01440764" / "img_0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = ImageFolderDataset(str(root / "train"), train=True)
    with pytest.raises(ValueError, match="cannot decode .*img_0.JPEG"):
        dataset[0]


def test_evaluate_reads_a_decoding_dataset_in_batches(tmp_path):
    split = data_mod.load("imagenet", str(_make_folder(tmp_path)))

    class Constant(torch.nn.Module):   # always predicts class 0
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], dim=1)

    acc = evaluate(Constant(), split.test, torch.device("cpu"), batch_size=1)
    assert math.isclose(acc, 0.5)


def test_train_str_on_an_imagenet_folder(tmp_path, capsys):
    root = _make_folder(tmp_path / "data")
    out = tmp_path / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(["train", "str", "--data", "imagenet", "--data-dir", str(root),
                           "--model", "resnet18", "--width-mult", "0.125", "--epochs", "1",
                           "--batch-size", "3", "--out", str(out), "--no-progress",
                           "--device", "cpu"])
    finally:
        torch.set_num_threads(before)
    assert status == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["recipe"]["data"] == "imagenet"
    assert result["recipe"]["s_init"] == -3200.0       # the official ImageNet default
    assert 0.0 <= result["history"][-1]["test_acc"] <= 1.0


def test_train_edgepopup_on_an_imagenet_folder(tmp_path, capsys):
    root = _make_folder(tmp_path / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(["train", "edgepopup", "--data", "imagenet", "--data-dir", str(root),
                           "--model", "resnet18", "--width-mult", "0.125", "--epochs", "1",
                           "--batch-size", "2", "--no-progress", "--device", "cpu"])
    finally:
        torch.set_num_threads(before)
    assert status == 0, capsys.readouterr().err
    assert "epoch 1/1" in capsys.readouterr().out
