"""Edge-popup layers: frozen random weights, trainable scores, top-k supermask.

For a layer with weight ``W`` (frozen) and scores ``S`` (trained, same shape) the forward pass is

    M = topk_mask(|S|, k)          # 1 for the kept count n - floor((1 - k) n) largest |S|
    y = op(x, W * M) + b           # op = F.linear or F.conv2d; b frozen (usually absent)

and the backward pass is edge-popup's straight-through estimator: the mask is treated as the
identity, so ``dL/dS = (dL/dW_eff) * W * sign(S)`` (the ``sign`` comes from the ``|S|`` of the
official ``clamped_scores``). ``W`` and ``b`` have ``requires_grad=False``; only ``scores`` train.

The fused ops ``subkern.ops.masked.masked_linear`` / ``masked_conv2d`` compute exactly this; when
they are not importable the layers fall back to the plain formulation above (``W * M`` with a
straight-through ``autograd.Function``), which is also the reference the tests compare against.
Ties among equal ``|S|`` are broken by the lower flat index (``subkern.ops.topk_mask_reference``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import topk_mask_reference
from ._convert import copy_dense_, layer_config, to_plain
from .init import INIT_MODES, check_k, check_seed, init_scores_, init_weight_


class _StraightThroughMask(torch.autograd.Function):
    """Forward: the 0/1 top-k mask of its (non-negative) input; backward: the identity."""

    @staticmethod
    def forward(ctx: Any, magnitudes: torch.Tensor, k: float) -> torch.Tensor:
        return topk_mask_reference.topk_mask(magnitudes, k)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def reference_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Edge-popup's ``GetSubnet(|S|, k)`` with the straight-through gradient (through ``|S|``)."""
    return _StraightThroughMask.apply(scores.abs(), k)


def reference_masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, k: float,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W * topk_mask(|S|, k), b)`` with the straight-through score gradient."""
    return F.linear(x, weight * reference_mask(scores, k), bias)


def reference_masked_conv2d(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, k: float,
                            bias: torch.Tensor | None = None, stride: Any = 1, padding: Any = 0,
                            dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, W * topk_mask(|S|, k), b, ...)`` with the straight-through score gradient."""
    return F.conv2d(x, weight * reference_mask(scores, k), bias, stride, padding, dilation, groups)


try:  # the fused ops (written alongside this module); the reference formulation otherwise
    from ..ops.masked import masked_conv2d as _masked_conv2d
    from ..ops.masked import masked_linear as _masked_linear

    USING_FUSED_OPS = True
except ImportError:  # pragma: no cover - depends on what is installed
    _masked_linear = reference_masked_linear
    _masked_conv2d = reference_masked_conv2d
    USING_FUSED_OPS = False

try:  # the fast (histogram-select) mask op; the sort-based reference otherwise
    from ..ops.topk_mask import SUPPORTED_DTYPES as _TOPK_DTYPES
    from ..ops.topk_mask import topk_mask as _fast_topk_mask
except ImportError:  # pragma: no cover - depends on what is installed
    _fast_topk_mask = None
    _TOPK_DTYPES = ()


def current_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """``topk_mask(|scores|, k)`` without gradient, by the fastest available implementation."""
    scores = scores.detach()
    if _fast_topk_mask is not None and scores.dtype in _TOPK_DTYPES:
        return _fast_topk_mask(scores, k)
    return topk_mask_reference.topk_mask(scores.abs(), k)


class SubnetMixin:
    """Shared state and helpers of the Subnet layers (``k``, ``scores``, mask, export).

    ``k`` is the fraction of weights KEPT (the official flag calls it ``prune_rate``), and is part
    of the ``state_dict`` (as extra state), so a round trip restores it.
    """

    weight: nn.Parameter
    scores: nn.Parameter
    bias: nn.Parameter | None
    _subkern_sparse = True   # marker: sparsify_ leaves such modules alone

    def _setup_subnet(self, k: float, init: str | None, scale_fan: bool, nonlinearity: str,
                      generator: torch.Generator | None, sign_seed: int | None = None) -> None:
        if init is not None and init not in INIT_MODES:
            raise ValueError(f"unknown init {init!r}; expected None or one of "
                             f"{', '.join(INIT_MODES)}")
        if sign_seed is not None:
            check_seed(sign_seed)
            if init != "signed_constant":
                raise ValueError("sign_seed needs init='signed_constant' (it seeds the signs of "
                                 f"the constant weights), got init={init!r}")
        self.sign_seed = sign_seed
        self._k = check_k(k)
        self.init = init
        self.scale_fan = bool(scale_fan)
        self.nonlinearity = nonlinearity
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        self._init_subnet(generator)

    def _init_subnet(self, generator: torch.Generator | None) -> None:
        if self.init is not None:
            init_weight_(self.weight, self.init, self._k, self.scale_fan, self.nonlinearity,
                         generator=generator, sign_seed=self.sign_seed)
        init_scores_(self.scores, generator=generator)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def k(self) -> float:
        """Fraction of weights kept, ``0 < k <= 1``."""
        return self._k

    @k.setter
    def k(self, value: float) -> None:
        self._k = check_k(value)

    def num_kept(self) -> int:
        """``n - floor((1 - k) n)``: how many weights the mask keeps."""
        return topk_mask_reference.kept_count(self.weight.numel(), self._k)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The current 0/1 mask ``topk_mask(|S|, k)`` (weight's dtype, no gradient)."""
        return current_mask(self.scores, self._k).to(self.weight.dtype)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``W * M``, the weight the layer applies (no gradient)."""
        return self.weight.detach() * self.mask()

    def get_extra_state(self) -> dict:
        return {"k": self._k, "init": self.init, "scale_fan": self.scale_fan,
                "sign_seed": self.sign_seed}

    def set_extra_state(self, state: dict) -> None:
        self._k = check_k(state["k"])
        self.init = state.get("init", self.init)
        self.scale_fan = bool(state.get("scale_fan", self.scale_fan))
        seed = state.get("sign_seed", self.sign_seed)
        self.sign_seed = None if seed is None else check_seed(int(seed))

    def _subnet_repr(self) -> str:
        seed = "" if self.sign_seed is None else f", sign_seed={self.sign_seed}"
        return f"k={self._k}, init={self.init}, scale_fan={self.scale_fan}{seed}"


class SubnetLinear(SubnetMixin, nn.Linear):
    """Edge-popup ``Linear``: ``y = x (W * M)^T + b`` with ``M = topk_mask(|scores|, k)``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: add a (frozen) bias; default ``False`` as edge-popup's layers.
        k: fraction of weights kept, ``0 < k <= 1``.
        init: weight init (``subkern.nn.init.INIT_MODES``) or ``None`` for torch's default.
        scale_fan: the paper's scaled init (std times ``1/sqrt(k)``).
        nonlinearity: for the init's gain (default ``"relu"``).
        generator: optional RNG for the weight and score draws.
        sign_seed: with ``init="signed_constant"``, draw the weight signs from
            :func:`subkern.nn.init.seeded_signs` with this seed (instead of the RNG), so that a
            deployed supermask can store the seed instead of the sign bits
            (``export_supermask(..., signs="seed")``). Default ``None``: the RNG, as before.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, k: float = 0.5,
                 init: str | None = "signed_constant", scale_fan: bool = False,
                 nonlinearity: str = "relu", generator: torch.Generator | None = None,
                 device: Any = None, dtype: Any = None, sign_seed: int | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_subnet(k, init, scale_fan, nonlinearity, generator, sign_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _masked_linear(x, self.weight, self.scores, self._k, self.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear, k: float = 0.5, init: str | None = None,
                   scale_fan: bool = False, nonlinearity: str = "relu",
                   generator: torch.Generator | None = None, sign_seed: int | None = None
                   ) -> SubnetLinear:
        """A ``SubnetLinear`` of ``module``'s shape; keeps its weight and bias unless ``init``."""
        new = cls(**layer_config(module), k=k, init=init, scale_fan=scale_fan,
                  nonlinearity=nonlinearity, generator=generator, sign_seed=sign_seed)
        copy_dense_(module, new, keep_weight=init is None)
        return new

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W * M`` (and the bias): same outputs, no scores."""
        return to_plain(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._subnet_repr()}"


class SubnetConv2d(SubnetMixin, nn.Conv2d):
    """Edge-popup ``Conv2d``: ``conv2d(x, W * M) + b`` with ``M = topk_mask(|scores|, k)``.

    Arguments as ``nn.Conv2d`` (bias default ``False``) plus ``k``, ``init``, ``scale_fan``,
    ``nonlinearity``, ``generator`` and ``sign_seed`` as ``SubnetLinear``. The mask is chosen over
    the whole weight tensor (all output channels together), as the official ``SubnetConv``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", k: float = 0.5,
                 init: str | None = "signed_constant", scale_fan: bool = False,
                 nonlinearity: str = "relu", generator: torch.Generator | None = None,
                 device: Any = None, dtype: Any = None, sign_seed: int | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._setup_subnet(k, init, scale_fan, nonlinearity, generator, sign_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if isinstance(padding, str):   # 'same' / 'valid': the reference handles them
            return reference_masked_conv2d(x, self.weight, self.scores, self._k, self.bias,
                                           self.stride, padding, self.dilation, self.groups)
        return _masked_conv2d(x, self.weight, self.scores, self._k, self.bias, self.stride,
                              padding, self.dilation, self.groups)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, k: float = 0.5, init: str | None = None,
                   scale_fan: bool = False, nonlinearity: str = "relu",
                   generator: torch.Generator | None = None, sign_seed: int | None = None
                   ) -> SubnetConv2d:
        """A ``SubnetConv2d`` like ``module``; keeps its weight and bias unless ``init``."""
        new = cls(**layer_config(module), k=k, init=init, scale_fan=scale_fan,
                  nonlinearity=nonlinearity, generator=generator, sign_seed=sign_seed)
        copy_dense_(module, new, keep_weight=init is None)
        return new

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding ``W * M`` (and the bias): same outputs, no scores."""
        return to_plain(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._subnet_repr()}"


def subnet_modules(model: nn.Module) -> list[tuple[str, SubnetMixin]]:
    """``(name, module)`` of every Subnet layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SubnetMixin)]


def set_k_(model: nn.Module, k: float) -> nn.Module:
    """Set ``k`` of every Subnet layer of ``model`` (official ``set_model_prune_rate``)."""
    k = check_k(k)
    for _, module in subnet_modules(model):
        module.k = k
    return model


def kept_fraction(model: nn.Module) -> float:
    """Kept / all weights over the Subnet layers of ``model`` (``nan`` if there are none)."""
    kept = total = 0
    for _, module in subnet_modules(model):
        kept += module.num_kept()
        total += module.weight.numel()
    return kept / total if total else math.nan
