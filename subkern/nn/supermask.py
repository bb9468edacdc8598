"""Inference layers of a trained edge-popup subnetwork stored as bit-packed supermasks.

With signed-constant initialisation every effective weight of an edge-popup layer is ``-c``, ``0``
or ``+c`` (one ``c`` per layer). :class:`SupermaskLinear` and :class:`SupermaskConv2d` store only

* ``mask_bits`` (int64 ``[out, ceil(fan_in / 64)]``): 1 where the weight is kept,
* ``sign_bits`` (same shape): 1 where a kept weight is ``+c``,
* ``scale`` (a float32 0-d buffer, ``c``) and ``bias`` (float32 ``[out]`` buffer, optional),

i.e. 2 bits per weight, 16x less than float32 (layout: :mod:`subkern.ops.ternary`). The forward
runs :func:`subkern.ops.ternary.ternary_linear` straight from the bits (no dense weight).

The variant that regenerates the signs from the initialisation seed instead of storing sign bits
is not provided: it would tie the artifact to the exact random stream of the training code's init
function, which the deployment format is meant not to depend on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import topk_mask_reference
from ..ops.ternary import pack_rows, ternary_linear, unpack_ternary, words_for

__all__ = ["SupermaskLinear", "SupermaskConv2d", "subnet_weight_and_mask"]

_Pair = tuple[int, int]


def _pair(v: int | tuple[int, ...]) -> _Pair:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _pack_weight_and_mask(weight: torch.Tensor, mask: torch.Tensor, atol: float
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mask_bits, sign_bits, c)`` of ``weight * mask`` with rows = output channels.

    Raises ``ValueError`` when the kept weights are not ``+-c`` for a single ``c``.
    """
    if weight.shape != mask.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ in "
                         "shape")
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    m = mask.detach().reshape(mask.shape[0], -1)
    if m.dtype != torch.bool:
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("mask must hold only 0/1 (or bool) values")
        m = m != 0
    kept = w[m]
    if not bool(torch.isfinite(kept).all()):
        raise ValueError("kept weights hold NaN or infinite values")
    scale = 1.0
    if kept.numel():
        mags = kept.abs()
        lo, hi = float(mags.min()), float(mags.max())
        if lo == 0.0 or hi - lo > atol * hi:
            raise ValueError(
                f"the kept weights are not +-c for a single c (magnitudes from {lo!r} to {hi!r}); "
                "a supermask layer needs a signed-constant weight (Subnet init "
                "'signed_constant'), or a larger atol")
        scale = hi
    return pack_rows(m), pack_rows(m & (w > 0)), scale


def subnet_weight_and_mask(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, 0/1 mask)`` of a trained edge-popup layer.

    Uses the module's own mask method when it has one (``mask()``, ``get_mask()`` or
    ``compute_mask()``), else edge-popup's definition: the top-``k`` fraction of ``|scores|``
    (:func:`subkern.ops.topk_mask_reference.topk_mask`, ties to the lower flat index).
    """
    for attr in ("weight", "scores", "k"):
        if not hasattr(module, attr):
            raise TypeError(f"{type(module).__name__} is not an edge-popup layer: no {attr!r}")
    weight = module.weight.detach()
    with torch.no_grad():
        for name in ("mask", "get_mask", "compute_mask"):
            fn = getattr(module, name, None)
            if callable(fn) and not isinstance(fn, torch.Tensor):
                mask = fn()
                break
        else:
            mask = topk_mask_reference.topk_mask(module.scores.detach(), float(module.k))
    return weight, mask.detach().reshape(weight.shape)


def _register_packed_buffers(module: nn.Module, rows: int, fan_in: int, bias: bool,
                             device: torch.device | str | None) -> None:
    """The buffers of a Supermask layer: mask/sign bits ``int64 [rows, words_for(fan_in)]``,
    the scale ``c`` and an optional bias (``module.bias = None`` without one)."""
    nwords = words_for(fan_in)
    for name in ("mask_bits", "sign_bits"):
        module.register_buffer(name, torch.zeros(rows, nwords, dtype=torch.int64, device=device))
    module.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
    if bias:
        module.register_buffer("bias", torch.zeros(rows, dtype=torch.float32, device=device))
    else:
        module.bias = None


class SupermaskLinear(nn.Module):
    """``y = c * x @ (M * (2 S - 1))^T + bias`` from packed bits (an edge-popup Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        _register_packed_buffers(self, self.out_features, self.in_features, bias, device)

    @classmethod
    def from_weight_and_mask(cls, weight: torch.Tensor, mask: torch.Tensor,
                             bias: torch.Tensor | None = None, atol: float = 1e-6
                             ) -> SupermaskLinear:
        """Pack ``weight * mask`` (kept weights must be ``+-c`` for one ``c``, within ``atol``
        relative)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
        mask_bits, sign_bits, scale = _pack_weight_and_mask(weight, mask, atol)
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device)
        layer.mask_bits.copy_(mask_bits)
        layer.sign_bits.copy_(sign_bits)
        layer.scale.fill_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_subnet(cls, module: nn.Module, atol: float = 1e-6) -> SupermaskLinear:
        """From a trained SubnetLinear (``weight``, ``scores``, ``k``, ``bias``)."""
        weight, mask = subnet_weight_and_mask(module)
        return cls.from_weight_and_mask(weight, mask, getattr(module, "bias", None), atol)

    def dense_weight(self) -> torch.Tensor:
        """The effective float32 weight ``[out, in]`` (for checks; the forward never builds it)."""
        return unpack_ternary(self.mask_bits, self.sign_bits, float(self.scale), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(x, self.mask_bits, self.sign_bits, float(self.scale),
                              self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class SupermaskConv2d(nn.Module):
    """An edge-popup Conv2d from packed bits.

    The bits hold the weight ``[out, in / groups, kh, kw]`` flattened per output channel
    (``fan_in = in / groups * kh * kw`` bits per row, in PyTorch's weight order). The forward is
    im2col + :func:`~subkern.ops.ternary.ternary_linear` per group: ``F.unfold`` materialises the
    ``[N * Hout * Wout, in / groups * kh * kw]`` patch matrix (``kh * kw`` times the input size
    for stride 1), so the memory is that of an im2col convolution, never that of a dense weight.
    Only zero padding (``padding_mode='zeros'``) is supported.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        _register_packed_buffers(self, self.out_channels, self.fan_in, bias, device)

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @classmethod
    def from_weight_and_mask(cls, weight: torch.Tensor, mask: torch.Tensor,
                             bias: torch.Tensor | None = None, *,
                             stride: int | tuple[int, int] = 1,
                             padding: int | tuple[int, int] = 0,
                             dilation: int | tuple[int, int] = 1, groups: int = 1,
                             atol: float = 1e-6) -> SupermaskConv2d:
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4-D [out, in/groups, kh, kw], got "
                             f"{tuple(weight.shape)}")
        mask_bits, sign_bits, scale = _pack_weight_and_mask(weight, mask, atol)
        out, cin_g, kh, kw = weight.shape
        layer = cls(cin_g * groups, out, (kh, kw), stride, padding, dilation, groups,
                    bias=bias is not None, device=weight.device)
        layer.mask_bits.copy_(mask_bits)
        layer.sign_bits.copy_(sign_bits)
        layer.scale.fill_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_subnet(cls, module: nn.Module, atol: float = 1e-6) -> SupermaskConv2d:
        """From a trained SubnetConv2d (an ``nn.Conv2d`` with ``scores`` and ``k``)."""
        mode = getattr(module, "padding_mode", "zeros")
        if mode != "zeros":
            raise ValueError(f"SupermaskConv2d supports padding_mode='zeros' only, got {mode!r}")
        padding = module.padding
        if isinstance(padding, str):
            raise ValueError(f"SupermaskConv2d needs numeric padding, got {padding!r}")
        weight, mask = subnet_weight_and_mask(module)
        return cls.from_weight_and_mask(weight, mask, getattr(module, "bias", None),
                                        stride=module.stride, padding=padding,
                                        dilation=module.dilation, groups=module.groups,
                                        atol=atol)

    def dense_weight(self) -> torch.Tensor:
        """The effective float32 weight ``[out, in / groups, kh, kw]``."""
        w = unpack_ternary(self.mask_bits, self.sign_bits, float(self.scale), self.fan_in)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        hout = math.floor((h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1)
                          / self.stride[0] + 1)
        wout = math.floor((w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1)
                          / self.stride[1] + 1)
        scale = float(self.scale)
        cin_g = self.in_channels // self.groups
        cout_g = self.out_channels // self.groups
        outs = []
        for g in range(self.groups):
            xg = x[:, g * cin_g:(g + 1) * cin_g]
            # [N, cin_g * kh * kw, L] -> [N * L, cin_g * kh * kw]; column order (c, i, j) matches
            # the weight's flattening.
            cols = F.unfold(xg, self.kernel_size, dilation=self.dilation, padding=self.padding,
                            stride=self.stride)
            cols = cols.transpose(1, 2).reshape(-1, self.fan_in)
            rows = slice(g * cout_g, (g + 1) * cout_g)
            bias = None if self.bias is None else self.bias[rows]
            y = ternary_linear(cols, self.mask_bits[rows], self.sign_bits[rows], scale,
                               self.fan_in, bias)
            outs.append(y.reshape(n, hout * wout, cout_g))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return y.transpose(1, 2).reshape(n, self.out_channels, hout, wout)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")
