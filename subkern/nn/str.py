"""STR layers: a dense weight and a learned soft threshold per layer (or per output channel).

STR ("Soft Threshold Weight Reparameterization for Learnable Sparsity", Kusupati et al., ICML
2020) replaces a layer's weight by

    W_eff = sign(W) * relu(|W| - sigmoid(s))

and trains ``W``, ``s`` (and the bias) with the task loss and weight decay on both ``W`` and
``s``: weights whose magnitude falls under the threshold ``sigmoid(s)`` are exactly zero, and the
sparsity of every layer is learned (a non-uniform budget). ``s`` starts at ``s_init``, very
negative so that training begins dense (``sigmoid(-100) ~ 4e-44``); the weight decay on ``s`` then
pulls it up. The official recipes use per-layer scalars; ``per_channel=True`` gives one threshold
per output channel (an extension: a finer budget, the same gradients per channel).

The layers call the fused ops of :mod:`subkern.ops.soft_threshold` (C++ on CPU, Triton on
CUDA; the reference formulation under ``subkern.use_backend("reference")``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.soft_threshold import soft_threshold, soft_threshold_conv2d, soft_threshold_linear
from ._convert import copy_dense_, layer_config, to_plain

__all__ = ["STRLinear", "STRConv2d", "STRMixin", "str_modules", "overall_sparsity"]

DEFAULT_S_INIT = -100.0


def _check_s_init(s_init: object) -> float:
    if isinstance(s_init, bool) or not isinstance(s_init, (int, float)):
        raise TypeError(f"s_init must be a real number (the initial threshold parameter), got "
                        f"{type(s_init).__name__}")
    value = float(s_init)
    if not math.isfinite(value):
        raise ValueError(f"s_init must be finite, got {value}")
    return value


class STRMixin:
    """Shared state and helpers of the STR layers (``s``, threshold, sparsity, export)."""

    weight: nn.Parameter
    s: nn.Parameter
    bias: nn.Parameter | None
    _subkern_sparse = True   # marker: sparsify_ leaves such modules alone

    def _setup_str(self, s_init: float, per_channel: bool) -> None:
        s_init = _check_s_init(s_init)
        shape = (self.weight.shape[0],) if per_channel else ()
        self.s = nn.Parameter(torch.full(shape, s_init, dtype=self.weight.dtype,
                                         device=self.weight.device))

    @property
    def per_channel(self) -> bool:
        """Whether ``s`` holds one threshold per output channel (``s.shape == [out]``)."""
        return self.s.dim() == 1

    @torch.no_grad()
    def threshold(self) -> torch.Tensor:
        """``sigmoid(s)``: the magnitude under which weights are zero (no gradient)."""
        return torch.sigmoid(self.s.detach())

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The sparse ``W_eff = sign(W) relu(|W| - sigmoid(s))`` the layer applies (detached)."""
        return soft_threshold(self.weight.detach(), self.s.detach())

    @torch.no_grad()
    def nonzeros(self) -> int:
        """Number of non-zero entries of ``W_eff``."""
        return int(torch.count_nonzero(self.effective_weight()))

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of zeros of ``W_eff`` (0.0 for an empty weight)."""
        n = self.weight.numel()
        return 1.0 - self.nonzeros() / n if n else 0.0

    def _str_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_layer"
        return f"threshold={kind}"


class STRLinear(STRMixin, nn.Linear):
    """STR ``Linear``: ``y = x W_eff^T + b``, ``W_eff = sign(W) relu(|W| - sigmoid(s))``.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (weight and bias train).
        s_init: initial value of ``s`` (default -100: dense at the start; see
            :class:`subkern.sparsify.STRConfig` for the paper's values).
        per_channel: one ``s`` per output feature (``s.shape == [out_features]``) instead of one
            per layer (``s.shape == []``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 s_init: float = DEFAULT_S_INIT, per_channel: bool = False,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_str(s_init, per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_threshold_linear(x, self.weight, self.s, self.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear, s_init: float = DEFAULT_S_INIT,
                   per_channel: bool = False) -> STRLinear:
        """An ``STRLinear`` holding a copy of ``module``'s weight and bias."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear, got {type(module).__name__}")
        new = cls(**layer_config(module), s_init=s_init, per_channel=per_channel)
        copy_dense_(module, new)
        return new

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W_eff`` (and the bias): same outputs, no ``s``."""
        return to_plain(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._str_repr()}"


class STRConv2d(STRMixin, nn.Conv2d):
    """STR ``Conv2d``: ``conv2d(x, W_eff) + b``, ``W_eff = sign(W) relu(|W| - sigmoid(s))``.

    Arguments as ``nn.Conv2d`` plus ``s_init`` and ``per_channel`` (one ``s`` per output
    channel) as :class:`STRLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", s_init: float = DEFAULT_S_INIT,
                 per_channel: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._setup_str(s_init, per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if isinstance(padding, str):   # 'same' / 'valid': torch's conv on the fused W_eff
            return F.conv2d(x, soft_threshold(self.weight, self.s), self.bias, self.stride,
                            padding, self.dilation, self.groups)
        return soft_threshold_conv2d(x, self.weight, self.s, self.bias, self.stride, padding,
                                     self.dilation, self.groups)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, s_init: float = DEFAULT_S_INIT,
                   per_channel: bool = False) -> STRConv2d:
        """An ``STRConv2d`` like ``module``, holding a copy of its weight and bias."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module must be an nn.Conv2d, got {type(module).__name__}")
        new = cls(**layer_config(module), s_init=s_init, per_channel=per_channel)
        copy_dense_(module, new)
        return new

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding ``W_eff`` (and the bias): same outputs, no ``s``."""
        return to_plain(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._str_repr()}"


def str_modules(model: nn.Module) -> list[tuple[str, STRMixin]]:
    """``(name, module)`` of every STR layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, STRMixin)]


def overall_sparsity(model: nn.Module) -> float:
    """Zeros / all weights of ``W_eff`` over the STR layers of ``model`` (``nan`` if none)."""
    zeros = total = 0
    for _, module in str_modules(model):
        n = module.weight.numel()
        zeros += n - module.nonzeros()
        total += n
    return zeros / total if total else math.nan
