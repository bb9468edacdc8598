"""What the reference training recipes of the methods share (``EdgePopupRecipe``, ``STRRecipe``).

``RecipeMixin`` holds no dataclass fields (so each recipe keeps its own field order and
defaults); it assumes the fields ``data``, ``model``, ``epochs``, ``width_mult``, ``augment``,
``stop_after``, ``out``, ``batch_size``, ``lr``, ``label_smoothing``, ``seed``, ``progress`` and
``resume``, and the members ``num_epochs`` and ``identity()``. It gives the checks every recipe
makes, ``use_augment`` and the ``FitConfig`` of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .. import data as data_mod
from ..training import FitConfig


class RecipeMixin:
    """Checks and derived settings shared by the methods' recipe dataclasses."""

    data: str
    model: str
    epochs: int | None
    width_mult: float
    augment: bool | None
    out: str | None
    stop_after: int | None

    def _check_data_and_model(self, models: Sequence[str]) -> None:
        """``data`` is a known data set and ``model`` one of ``models``."""
        if self.data not in data_mod.DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; expected "
                             f"{', '.join(data_mod.DATASETS)}")
        if self.model not in models:
            raise ValueError(f"unknown model {self.model!r}; expected {', '.join(models)}")

    def _check_epochs_and_width(self) -> None:
        """``epochs`` (when given) is >= 1 and ``width_mult`` > 0."""
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {self.width_mult}")

    def _check_workers(self) -> None:
        """``workers`` (DataLoader processes) is >= 0."""
        workers = getattr(self, "workers", 0)
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")

    def _check_stop_after(self) -> None:
        """``stop_after`` (when given) is >= 1 and comes with an output folder to resume from."""
        if self.stop_after is not None and (self.stop_after < 1 or not self.out):
            raise ValueError("stop_after needs a value >= 1 and an output folder (out) for the "
                             "checkpoint to resume from")

    @property
    def use_augment(self) -> bool:
        """Random crop + flip: ``augment``, or by default for CIFAR-10 only (official)."""
        return self.data == "cifar10" if self.augment is None else self.augment

    def fit_config(self, warmup: int, checkpoint: str | None,
                   log: Callable[[str], None] | None) -> FitConfig:
        """The ``FitConfig`` of this recipe's run: its epochs, batch size, lr, ``warmup`` epochs,
        label smoothing, seed, progress bar, stop-after, ``checkpoint`` path, resume path,
        augmentation and ``identity()`` as the checkpoint's metadata."""
        recipe: Any = self
        return FitConfig(
            epochs=recipe.num_epochs, batch_size=recipe.batch_size, lr=recipe.lr,
            warmup=warmup, label_smoothing=recipe.label_smoothing, seed=recipe.seed,
            progress=recipe.progress, stop_after=recipe.stop_after, checkpoint_path=checkpoint,
            resume_path=recipe.resume,
            augment=data_mod.random_crop_flip if self.use_augment else None,
            num_workers=getattr(recipe, "workers", 0), meta=recipe.identity(), log=log)
