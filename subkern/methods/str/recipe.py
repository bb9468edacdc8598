"""STR's training recipes with the official defaults, and the embedded digits default.

Official recipe (RAIVNLab/STR ``configs/largescale/resnet50-str.yaml``, ``main.py``, ``args.py``;
Kusupati et al., ICML 2020), ImageNet ResNet-50:

* SGD, lr 0.256 for batch 256, momentum 0.875, Nesterov **off**, 100 epochs, cosine schedule per
  epoch after a 5-epoch linear warm-up, label smoothing 0.1;
* Kaiming-normal (fan-in, ReLU) init, learned (affine) BatchNorm, no conv/linear biases, the fc
  layer is an STR layer too (unless ``--last-layer-dense``);
* one threshold ``s`` per layer, ``g = sigmoid``, ``s_init = -3200`` and weight decay
  ``2.2518e-5`` for the 90.23%-sparse model (the appendix lists the pair for each sparsity; the
  dense baseline uses ``3.0518e-5``);
* the weight decay applies to every trained tensor: weights, the thresholds ``s`` (``st_decay``,
  default: the same value) and BatchNorm's weight and bias (``--no-bn-decay`` is off in the
  official configs). ``threshold_decay`` and ``bn_decay`` here are those two switches.

``PAPER_RECIPES`` records these settings (and the CIFAR-10 adaptation, whose values are the
METHODS note's "about -100 with wd >= 5e-4" and the usual CIFAR ResNet schedule, not an official
config) for ``STRRecipe.paper(name, ...)``. subkern has no ImageNet loader: the ImageNet entries
run on any data set given (e.g. to check a set-up), their numbers are the paper's reference.

The embedded default is scikit-learn's digits with the edge-popup ``fc`` network (64-300-100-10),
which trains in well under a minute on 2 CPU cores: ``DIGITS_DEFAULTS`` below (found with the
sweep of ``examples/str_digits.py``; smaller nets and ~600 steps need a far less negative
``s_init`` and a larger decay than ImageNet's 500k steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from .._recipe import RecipeMixin
from ..edgepopup.models import MODELS

# digits: 1438 training images, 12 steps per epoch at batch 128
DIGITS_DEFAULTS: dict[str, Any] = {"epochs": 40, "s_init": -4.0, "weight_decay": 1e-2,
                                   "warmup": 0}
MNIST_DEFAULTS: dict[str, Any] = {"epochs": 30, "s_init": -10.0, "weight_decay": 5e-4,
                                  "warmup": 2}
CIFAR10_DEFAULTS: dict[str, Any] = {"epochs": 150, "s_init": -100.0, "weight_decay": 5e-4,
                                    "warmup": 5}
# official configs/largescale/resnet50-str.yaml
IMAGENET_DEFAULTS: dict[str, Any] = {"epochs": 100, "s_init": -3200.0,
                                     "weight_decay": 2.251757813e-5, "warmup": 5}
DATA_DEFAULTS: dict[str, dict[str, Any]] = {"digits": DIGITS_DEFAULTS, "mnist": MNIST_DEFAULTS,
                                            "cifar10": CIFAR10_DEFAULTS,
                                            "imagenet": IMAGENET_DEFAULTS}

PAPER_RECIPES: dict[str, dict[str, Any]] = {
    # official configs/largescale/resnet50-str.yaml (90.23% sparse, 74.31% top-1)
    "imagenet_resnet50": {"data": "imagenet", "model": "resnet50", "lr": 0.256, "batch_size": 256,
                          "momentum": 0.875, "nesterov": False, "epochs": 100, "warmup": 5,
                          "label_smoothing": 0.1, "weight_decay": 2.251757813e-5,
                          "s_init": -3200.0},
    # official configs/largescale/resnet50-dense.yaml
    "imagenet_resnet50_dense": {"data": "imagenet", "model": "resnet50", "lr": 0.256,
                                "batch_size": 256, "momentum": 0.875, "nesterov": False,
                                "epochs": 100, "warmup": 5, "label_smoothing": 0.1,
                                "weight_decay": 3.0517578125e-5, "dense_baseline": True},
    # ResNet-18 with the ResNet-50 schedule (the paper has no ResNet-18 STR run)
    "imagenet_resnet18": {"data": "imagenet", "model": "resnet18", "lr": 0.256, "batch_size": 256,
                          "momentum": 0.875, "nesterov": False, "epochs": 100, "warmup": 5,
                          "label_smoothing": 0.1, "weight_decay": 2.251757813e-5,
                          "s_init": -3200.0},
    # CIFAR-10 adaptation (not in the paper): CIFAR ResNet-18, batch 128, lr 0.1
    "cifar10_cresnet18": {"data": "cifar10", "model": "cresnet18", "lr": 0.1,
                          "batch_size": 128, "momentum": 0.9, "nesterov": False,
                          "epochs": 150, "warmup": 5, "label_smoothing": 0.1,
                          "weight_decay": 5e-4, "s_init": -100.0},
}


@dataclass
class STRRecipe(RecipeMixin):
    """Everything a reference STR run needs (the CLI flags map one-to-one onto these).

    ``None`` for ``epochs``, ``s_init``, ``weight_decay`` or ``warmup`` takes the data set's
    default (``DATA_DEFAULTS``). ``threshold_decay=None``: the thresholds share the weight decay
    (official). ``target_sparsity``: steer the thresholds' decay towards that overall sparsity
    (``subkern.methods.str.target``); ``target_ramp`` is the fraction of the run over which the
    target ramps up. ``dense_baseline=True`` trains the same architecture without thresholds.
    """

    data: str = "digits"
    data_dir: str | None = None
    model: str = "fc"
    width_mult: float = 1.0
    s_init: float | None = None
    per_channel: bool = False
    epochs: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    threshold_decay: float | None = None
    bn_decay: bool = True
    nesterov: bool = False
    label_smoothing: float = 0.1
    warmup: int | None = None
    batch_size: int = 128
    seed: int = 0
    target_sparsity: float | None = None
    target_ramp: float = 0.75
    first_layer_dense: bool = False
    last_layer_dense: bool = False
    augment: bool | None = None      # None: random crop + flip for CIFAR-10 only
    dense_baseline: bool = False
    device: str = "auto"
    out: str | None = None
    resume: str | None = None
    stop_after: int | None = None    # end this invocation after that epoch (resume later)
    progress: bool = True
    workers: int = 0                 # DataLoader worker processes (ImageNet decoding)

    def __post_init__(self) -> None:
        self._check_data_and_model(MODELS)
        self._check_epochs_and_width()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("weight_decay", "threshold_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.s_init is not None and self.s_init != self.s_init:
            raise ValueError("s_init must be a number, got NaN")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.target_sparsity is not None:
            if not 0.0 <= self.target_sparsity < 1.0:
                raise ValueError(f"target_sparsity must be in [0, 1), got "
                                 f"{self.target_sparsity}")
            if self.dense_baseline:
                raise ValueError("target_sparsity and dense_baseline exclude each other")
        if not 0.0 <= self.target_ramp <= 1.0:
            raise ValueError(f"target_ramp must be in [0, 1], got {self.target_ramp}")
        self._check_stop_after()
        self._check_workers()

    @classmethod
    def paper(cls, name: str, **overrides: Any) -> STRRecipe:
        """The recipe ``PAPER_RECIPES[name]`` with ``overrides`` (e.g. ``data_dir``)."""
        try:
            settings = dict(PAPER_RECIPES[name])
        except KeyError:
            raise ValueError(f"unknown paper recipe {name!r}; expected one of "
                             f"{', '.join(PAPER_RECIPES)}") from None
        return cls(**(settings | overrides))

    def _default(self, key: str) -> Any:
        value = getattr(self, key)
        return DATA_DEFAULTS[self.data][key] if value is None else value

    @property
    def num_epochs(self) -> int:
        return int(self._default("epochs"))

    @property
    def s_init_value(self) -> float:
        return float(self._default("s_init"))

    @property
    def weight_decay_value(self) -> float:
        return float(self._default("weight_decay"))

    @property
    def threshold_decay_value(self) -> float:
        return self.weight_decay_value if self.threshold_decay is None \
            else float(self.threshold_decay)

    @property
    def warmup_epochs(self) -> int:
        return int(self._default("warmup"))

    def resolved(self) -> STRRecipe:
        """A copy with every data-dependent default filled in."""
        return replace(self, epochs=self.num_epochs, s_init=self.s_init_value,
                       weight_decay=self.weight_decay_value, warmup=self.warmup_epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.resolved())

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint (data, model, method settings)."""
        keys = ("data", "model", "width_mult", "s_init", "per_channel", "epochs", "lr",
                "momentum", "weight_decay", "threshold_decay", "bn_decay", "nesterov",
                "label_smoothing", "warmup", "batch_size", "target_sparsity", "target_ramp",
                "first_layer_dense", "last_layer_dense", "dense_baseline")
        resolved = self.resolved()
        return {key: getattr(resolved, key) for key in keys}
