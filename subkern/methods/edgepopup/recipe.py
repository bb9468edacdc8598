"""Edge-popup's training recipe with the official defaults.

Official defaults (``configs/smallscale``, ``args.py``): SGD, lr 0.1, momentum 0.9, weight decay
1e-4 (applied to the scores, the only trained tensors), Nesterov off, cosine schedule per epoch,
no warm-up, batch 128, 100 epochs, no label smoothing, ``k = 0.5`` kept per layer,
signed-constant init. The epoch count default here depends on the data: 100 for MNIST/CIFAR-10
(the paper's), ``DIGITS_EPOCHS`` for the embedded digits so the default run takes about a minute
on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...nn.init import INIT_MODES, check_k
from .._recipe import RecipeMixin
from .models import MODELS

DIGITS_EPOCHS = 20
PAPER_EPOCHS = 100


@dataclass
class EdgePopupRecipe(RecipeMixin):
    """Everything a reference edge-popup run needs (the CLI flags map one-to-one onto these).

    ``dense_baseline=True`` trains the same architecture normally (all weights, learned
    BatchNorm, no masks) with the same optimiser settings, the paper's comparison.
    """

    data: str = "digits"
    data_dir: str | None = None
    model: str = "fc"
    width_mult: float = 1.0
    k: float = 0.5
    init: str = "signed_constant"
    scale_fan: bool = False
    epochs: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    warmup: int = 0
    batch_size: int = 128
    seed: int = 0
    first_layer_dense: bool = False
    last_layer_dense: bool = False
    augment: bool | None = None      # None: random crop + flip for CIFAR-10 only (official)
    dense_baseline: bool = False
    device: str = "auto"
    out: str | None = None
    resume: str | None = None
    stop_after: int | None = None    # end this invocation after that epoch (resume later)
    progress: bool = True
    workers: int = 0                 # DataLoader worker processes (ImageNet decoding)

    def __post_init__(self) -> None:
        check_k(self.k)
        self._check_data_and_model(MODELS)
        if self.init not in INIT_MODES:
            raise ValueError(f"unknown init {self.init!r}; expected {', '.join(INIT_MODES)}")
        self._check_epochs_and_width()
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("batch size must be >= 1 and lr > 0")
        self._check_stop_after()
        self._check_workers()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def num_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return DIGITS_EPOCHS if self.data == "digits" else PAPER_EPOCHS

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint (data, model, method settings)."""
        keys = ("data", "model", "width_mult", "k", "init", "scale_fan", "dense_baseline",
                "batch_size", "lr", "momentum", "weight_decay", "nesterov", "label_smoothing",
                "first_layer_dense", "last_layer_dense")
        return {key: getattr(self, key) for key in keys} | {"epochs": self.num_epochs}
