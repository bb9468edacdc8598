"""ImageNet (ILSVRC-2012) from a local folder of JPEGs, with the official codes' transforms.

Layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the class-folder layout torchvision's
``ImageFolder`` reads; the raw validation archive is flat, and the usual ``valprep.sh`` moves its
images into class folders). Classes are the sorted folder names of ``train`` (1000 WordNet ids for
ILSVRC-2012); ``val`` must hold the same folders. Files with the extensions of ``IMAGE_SUFFIXES``
count; others are ignored. Decoding needs Pillow (``pip install pillow``), imported on first use.

Transforms (the official edge-popup and STR ImageNet loaders, torchvision's defaults):

* train: ``RandomResizedCrop(224)`` (area 8-100 % of the image, aspect ratio 3/4 to 4/3,
  10 tries, then a centre crop of the clamped ratio) and a horizontal flip with probability 1/2;
* val: resize the shorter side to 256, centre crop 224;

then ``x / 255`` normalised with the ImageNet mean and std. The random draws of image ``i`` in
epoch ``e`` come from a generator seeded by ``(seed, e, i)`` (``set_epoch``, which the training
loop calls): runs are reproducible, resume exactly and do not depend on the DataLoader's workers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "ImageFolderDataset",
           "random_resized_crop_box"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
TRAIN_SIZE, EVAL_RESIZE, EVAL_SIZE = 224, 256, 224


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the ImageNet loader decodes images with Pillow: pip install pillow"
                          ) from err
    return Image


def random_resized_crop_box(width: int, height: int, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of torchvision's ``RandomResizedCrop``: up to 10 draws of a target
    area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio`` whose box fits, else
    the largest centred box of the clamped aspect ratio."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _scan(split_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"ImageNet: no folder {split_dir!r} (expected "
                                "<root>/train/<class>/* and <root>/val/<class>/*)")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_SUFFIXES):
                samples.append((os.path.join(folder, file), label))
    return classes, samples


class ImageFolderDataset(Dataset):
    """One split of an ImageNet-layout folder: ``(float32 [3, 224, 224], int64 label)`` items.

    ``train=True`` applies the random training transform, else the evaluation one (module
    docstring). ``classes``: the class names to label by (default: this folder's, sorted); the
    validation split passes the training split's so that labels agree.
    """

    def __init__(self, split_dir: str, train: bool, seed: int = 0,
                 classes: list[str] | None = None) -> None:
        found, samples = _scan(split_dir)
        if classes is not None and found != classes:
            missing = sorted(set(classes) - set(found))[:5]
            extra = sorted(set(found) - set(classes))[:5]
            raise ValueError(f"ImageNet: {split_dir!r} has other class folders than the training "
                             f"split (missing e.g. {missing}, extra e.g. {extra})")
        if not samples:
            raise ValueError(f"ImageNet: no images under {split_dir!r} (looked for "
                             f"{', '.join(IMAGE_SUFFIXES)} in class folders)")
        self.split_dir = split_dir
        self.classes = found
        self.samples = samples
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch`` (the training loop calls this every epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _pil()
        try:
            with image.open(path) as opened:
                img = opened.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            raise ValueError(f"ImageNet: cannot decode {path!r}: {err}") from err
        bilinear = image.Resampling.BILINEAR
        if self.train:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch * 7_919_423 + index) % 2**63)
            left, top, w, h = random_resized_crop_box(img.width, img.height, g)
            img = img.resize((TRAIN_SIZE, TRAIN_SIZE), bilinear, box=(left, top, left + w, top + h))
            flip = bool(torch.rand(1, generator=g) < 0.5)
        else:
            short = min(img.width, img.height)
            w = max(1, round(img.width * EVAL_RESIZE / short))
            h = max(1, round(img.height * EVAL_RESIZE / short))
            img = img.resize((w, h), bilinear)
            left, top = (w - EVAL_SIZE) // 2, (h - EVAL_SIZE) // 2
            img = img.crop((left, top, left + EVAL_SIZE, top + EVAL_SIZE))
            flip = False
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        if flip:
            x = x.flip(-1)
        x = (x.float() / 255.0 - self._mean) / self._std
        return x, label
