"""One entry point that turns any model into its sparse-method version: ``sparsify_``.

    model = subkern.sparsify_(model, EdgePopupConfig(k=0.5, init="signed_constant"))

``sparsify_`` walks ``model.named_modules()`` and replaces, in place, every ``nn.Linear`` and
``nn.Conv2d`` (and subclasses that are not already a subkern layer) for which
``filter_fn(module, fqn)`` is true by the layer the config's method builds, then lets the config
adjust the rest of the model (``prepare``). It returns the model; when ``model`` itself is a
Linear/Conv2d (nothing to swap it inside) it returns the new layer.

Extension point (STR, SupSup, ...): subclass ``SparsifyConfig`` as a dataclass, give it a unique
``method`` name, decorate it with ``@register_method`` and implement

* ``convert(module, fqn) -> nn.Module`` the replacement of one eligible layer, and optionally
* ``prepare(model) -> None`` model-wide changes after the swap (freezing, BatchNorm, ...) and
* ``eligible(module) -> bool`` which module types the method handles (default Linear/Conv2d).

``get_config(name, **settings)`` builds a registered config by name (used by the CLI).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .nn.init import INIT_MODES, check_k, check_seed
from .nn.str import STRConv2d, STRLinear, _check_s_init
from .nn.subnet import SubnetConv2d, SubnetLinear

FilterFn = Callable[[nn.Module, str], bool]

METHODS: dict[str, type[SparsifyConfig]] = {}


def register_method(cls: type[SparsifyConfig]) -> type[SparsifyConfig]:
    """Class decorator: make a ``SparsifyConfig`` subclass known under its ``method`` name."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `method` (a non-empty str)")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"sparsify method {name!r} is already registered by "
                         f"{METHODS[name].__name__}")
    METHODS[name] = cls
    return cls


def get_config(method: str, **settings) -> SparsifyConfig:
    """The registered config of ``method`` built with ``settings``."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise KeyError(f"unknown sparsify method {method!r}; known: "
                       f"{', '.join(sorted(METHODS))}") from None
    return cls(**settings)


@dataclass
class SparsifyConfig:
    """Base of the per-method configs. ``skip_first`` / ``skip_last`` leave the first / last
    eligible layer (in ``named_modules()`` order) dense, like the official
    ``--first-layer-dense`` / ``--last-layer-dense``."""

    method: ClassVar[str] = ""
    skip_first: bool = False
    skip_last: bool = False

    def eligible(self, module: nn.Module) -> bool:
        """Whether the method can replace ``module`` (default: Linear and Conv2d)."""
        if getattr(module, "_subkern_sparse", False):
            return False
        return isinstance(module, (nn.Linear, nn.Conv2d))

    def convert(self, module: nn.Module, fqn: str) -> nn.Module:
        """The replacement of the eligible ``module`` found at ``fqn`` (each method defines it)."""
        raise NotImplementedError(
            f"{type(self).__name__}.convert: a SparsifyConfig subclass must define convert(); "
            "the base class is not supported by sparsify_ on its own")

    def prepare(self, model: nn.Module) -> None:
        """Model-wide changes after the swap (default: none)."""


def layer_sign_seed(seed: int, fqn: str) -> int:
    """The sign seed of the layer named ``fqn`` under the model-wide ``seed``: the int64
    ``(seed * 1000003 + crc32(fqn)) mod 2^64`` (two's complement), distinct per layer name and
    stable across runs, machines and versions."""
    check_seed(seed)
    value = (seed * 1000003 + zlib.crc32(fqn.encode("utf-8"))) % (1 << 64)
    return value - (1 << 64) if value >= (1 << 63) else value


@register_method
@dataclass
class EdgePopupConfig(SparsifyConfig):
    """Edge-popup (Ramanujan et al., 2020): frozen weights, a trained score per weight, keep the
    top ``k`` fraction of ``|scores|`` in every layer.

    Attributes:
        k: fraction of weights kept per layer, ``0 < k <= 1``.
        init: re-initialise the weights with one of ``subkern.nn.init.INIT_MODES``
            (default ``"signed_constant"``, the paper's best), or ``None`` to keep the model's
            current (e.g. pretrained or default-random) weights.
        scale_fan: the paper's scaled init (std times ``1/sqrt(k)``).
        nonlinearity: gain of the init (``"relu"``).
        freeze_bn: set ``requires_grad=False`` on BatchNorm/LayerNorm/GroupNorm affine
            parameters so that only scores (and skipped dense layers) train. The paper's models
            use non-affine BatchNorm instead; ``freeze_bn`` gives the same for a user's model.
        sign_seed: with ``init="signed_constant"``, draw every layer's weight signs from
            :func:`subkern.nn.init.seeded_signs` with the layer seed
            :func:`layer_sign_seed` ``(sign_seed, fqn)``, so that
            ``export_supermask(..., signs="seed")`` can ship the masks alone (about 32x smaller
            than fp32). ``None`` (default): signs from torch's generator.
    """

    method: ClassVar[str] = "edgepopup"
    k: float = 0.5
    init: str | None = "signed_constant"
    scale_fan: bool = False
    nonlinearity: str = "relu"
    freeze_bn: bool = True
    sign_seed: int | None = None

    def __post_init__(self) -> None:
        self.k = check_k(self.k)
        if self.sign_seed is not None:
            check_seed(self.sign_seed)
            if self.init != "signed_constant":
                raise ValueError("EdgePopupConfig: sign_seed needs init='signed_constant', got "
                                 f"init={self.init!r}")
        if self.init is not None and self.init not in INIT_MODES:
            raise ValueError(f"unknown init {self.init!r}; expected None or one of "
                             f"{', '.join(INIT_MODES)}")

    def convert(self, module: nn.Module, fqn: str) -> nn.Module:
        cls = SubnetConv2d if isinstance(module, nn.Conv2d) else SubnetLinear
        seed = None if self.sign_seed is None else layer_sign_seed(self.sign_seed, fqn)
        return cls.from_dense(module, k=self.k, init=self.init, scale_fan=self.scale_fan,
                              nonlinearity=self.nonlinearity, sign_seed=seed)

    def prepare(self, model: nn.Module) -> None:
        if not self.freeze_bn:
            return
        norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        for module in model.modules():
            if isinstance(module, norms):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)


@register_method
@dataclass
class STRConfig(SparsifyConfig):
    """STR (Kusupati et al., 2020): soft-threshold reparameterization with a learned threshold.

    Every eligible ``nn.Linear`` / ``nn.Conv2d`` becomes an :class:`subkern.nn.str.STRLinear` /
    :class:`~subkern.nn.str.STRConv2d` holding the module's weight and bias (both keep
    training) and a threshold parameter ``s`` (``W_eff = sign(W) relu(|W| - sigmoid(s))``).
    Sparsity emerges from ``s_init`` together with the weight decay, which must include ``s``
    (the official recipes apply the same weight decay to ``W``, ``s`` and BatchNorm).

    Attributes:
        s_init: initial ``s``. The paper's values: about -3200 for ImageNet ResNet-50 (with
            ``sigmoid`` the threshold starts at exactly 0 in float32: training starts dense and
            the weight decay on ``s`` raises it; the final sparsity is chosen through the
            weight decay and ``s_init`` pair); for CIFAR-scale models about -100 with a weight
            decay of ``>= 5e-4``. A higher ``s_init`` (closer to 0) or a larger weight decay
            gives a sparser model; STR itself has no direct target-sparsity knob.
        per_channel: one threshold per output channel instead of one per layer (the official
            code uses one per layer).
        skip_first / skip_last: leave the first / last eligible layer dense (the official
            ResNet-50 runs keep every layer, including the first conv and the fc, sparse).
    """

    method: ClassVar[str] = "str"
    s_init: float = -100.0
    per_channel: bool = False

    def __post_init__(self) -> None:
        self.s_init = _check_s_init(self.s_init)
        for name in ("per_channel", "skip_first", "skip_last"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"STRConfig.{name} must be a bool, got {value!r} (the fields "
                                f"are keyword arguments: STRConfig(s_init=..., ...))")

    def convert(self, module: nn.Module, fqn: str) -> nn.Module:
        cls = STRConv2d if isinstance(module, nn.Conv2d) else STRLinear
        return cls.from_dense(module, s_init=self.s_init, per_channel=self.per_channel)


def sparsify_(model: nn.Module, config: SparsifyConfig,
              filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace, in place, every eligible layer of ``model`` by ``config``'s sparse version.

    Args:
        model: any ``nn.Module`` (an MLP, a ResNet, a user's model).
        config: a ``SparsifyConfig`` subclass instance (e.g. ``EdgePopupConfig``).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers for which it is true are
            swapped (``fqn`` is the name in ``model.named_modules()``, ``""`` for the root).

    Returns ``model`` (or the replacement when ``model`` itself is an eligible layer).
    """
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig (e.g. EdgePopupConfig), "
                        f"got {type(config).__name__}")
    targets: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules(remove_duplicate=False):
        if config.eligible(module):
            targets.append((fqn, module))
    if config.skip_first and targets:
        targets = targets[1:]
    if config.skip_last and targets:
        targets = targets[:-1]
    if filter_fn is not None:
        targets = [(fqn, m) for fqn, m in targets if filter_fn(m, fqn)]
    result = model
    replaced: dict[int, nn.Module] = {}
    for fqn, module in targets:
        new = replaced.get(id(module))
        if new is None:   # a layer shared by two parents is replaced by one shared layer
            new = config.convert(module, fqn)
            replaced[id(module)] = new
        if fqn == "":
            result = new
            continue
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    config.prepare(result)
    return result
