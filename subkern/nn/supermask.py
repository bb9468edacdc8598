"""Inference layers of a trained edge-popup subnetwork stored as bit-packed supermasks.

With signed-constant initialisation every effective weight of an edge-popup layer is ``-c``, ``0``
or ``+c`` (one ``c`` per layer). :class:`SupermaskLinear` and :class:`SupermaskConv2d` store only

* ``mask_bits`` (int64 ``[out, ceil(fan_in / 64)]``): 1 where the weight is kept,
* ``sign_bits`` (same shape): 1 where a kept weight is ``+c``,
* ``scale`` (a float32 0-d buffer, ``c``) and ``bias`` (float32 ``[out]`` buffer, optional),

i.e. 2 bits per weight, 16x less than float32 (layout: :mod:`subkern.ops.ternary`). The forward
runs straight from the bits (no dense weight): on CPUs with AVX-512 through the prepacked nibble
layout (:func:`subkern.ops.ternary.ternary_linear_prepacked`), which the layer builds on its
first CPU forward and keeps as a cache (not in the ``state_dict``; rebuilt when the bits change or
the layer moves to another device), elsewhere through
:func:`subkern.ops.ternary.ternary_linear`.

Sign modes
----------
``sign_mode="bits"`` (default) stores the sign bits. ``sign_mode="seed"`` stores instead the seed
``sign_seed`` (an int64 0-d buffer) that regenerated the signs of a signed-constant layer trained
with ``SubnetLinear(..., sign_seed=s)`` (:func:`subkern.nn.init.seeded_signs`, a
version-independent counter-based generator); ``sign_bits`` is then a non-persistent buffer,
rebuilt from the seed when the ``state_dict`` is loaded (or by :meth:`set_sign_seed`). The
layer's tensors are then the mask bits alone: 1 bit per weight, 32x less than float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import topk_mask_reference
from ..ops.ternary import (
    pack_rows,
    prepacked_preferred,
    ternary_linear,
    ternary_linear_prepacked_cpu,
    ternary_prepack,
    unpack_ternary,
    words_for,
)
from ._tensor_cache import cached_on
from .init import check_seed, seeded_signs

__all__ = ["SupermaskLinear", "SupermaskConv2d", "subnet_weight_and_mask", "SIGN_MODES",
           "EXPORT_SIGNS"]

#: How a Supermask layer keeps its signs: the packed bits, or the seed that regenerates them.
SIGN_MODES = ("bits", "seed")
#: Choices of ``signs`` when converting a trained layer: ``"auto"`` = the seed when it
#: reproduces every kept sign, else the bits.
EXPORT_SIGNS = ("auto", "bits", "seed")

_Pair = tuple[int, int]


def _pair(v: int | tuple[int, ...]) -> _Pair:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _pack_weight_and_mask(weight: torch.Tensor, mask: torch.Tensor, atol: float,
                          signs: str = "bits", sign_seed: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, float, int | None]:
    """``(mask_bits, sign_bits, c, seed)`` of ``weight * mask`` with rows = output channels.

    ``seed`` is ``sign_seed`` when the signs are to be regenerated from it (``signs`` "seed", or
    "auto" and the seed reproduces every kept sign), else None. Raises ``ValueError`` when the
    kept weights are not ``+-c`` for a single ``c``, and for ``signs="seed"`` when there is no
    seed or it does not reproduce the kept signs.
    """
    if signs not in EXPORT_SIGNS:
        raise ValueError(f"signs must be one of {', '.join(EXPORT_SIGNS)}, got {signs!r}")
    if sign_seed is not None:
        check_seed(sign_seed)
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
    positive = w > 0
    seed = None
    if signs != "bits":
        if sign_seed is None:
            if signs == "seed":
                raise ValueError("signs='seed' needs the layer's sign_seed (train it with "
                                 "sign_seed=..., init 'signed_constant'); this layer has none")
        else:
            regenerated = seeded_signs(sign_seed, w.numel(), w.device).reshape(w.shape)
            wrong = int((regenerated != positive)[m].sum())
            if wrong == 0:
                seed = sign_seed
            elif signs == "seed":
                raise ValueError(f"signs='seed': {wrong} of the {int(m.sum())} kept weights have "
                                 f"a sign other than the one sign_seed={sign_seed} regenerates "
                                 "(the weights were changed after init); use signs='bits' or "
                                 "'auto'")
    return pack_rows(m), pack_rows(m & positive), scale, seed


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
                             device: torch.device | str | None, sign_mode: str) -> None:
    """The buffers of a Supermask layer: mask/sign bits ``int64 [rows, words_for(fan_in)]``,
    the scale ``c``, an optional bias (``module.bias = None`` without one) and, in seed mode, the
    persistent ``sign_seed`` (the sign bits are then not persistent)."""
    if sign_mode not in SIGN_MODES:
        raise ValueError(f"sign_mode must be one of {', '.join(SIGN_MODES)}, got {sign_mode!r}")
    nwords = words_for(fan_in)
    module.register_buffer("mask_bits",
                           torch.zeros(rows, nwords, dtype=torch.int64, device=device))
    module.register_buffer("sign_bits",
                           torch.zeros(rows, nwords, dtype=torch.int64, device=device),
                           persistent=sign_mode == "bits")
    if sign_mode == "seed":
        module.register_buffer("sign_seed", torch.zeros((), dtype=torch.int64, device=device))
    module.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
    if bias:
        module.register_buffer("bias", torch.zeros(rows, dtype=torch.float32, device=device))
    else:
        module.bias = None


class _SupermaskBase(nn.Module):
    """Sign modes, packing from a trained layer and the prepacked cache (shared)."""

    mask_bits: torch.Tensor
    sign_bits: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    sign_mode: str

    def _rows_and_fan_in(self) -> tuple[int, int]:
        raise NotImplementedError

    def _fill(self, mask_bits: torch.Tensor, sign_bits: torch.Tensor, scale: float,
              seed: int | None, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.mask_bits.copy_(mask_bits)
            self.sign_bits.copy_(sign_bits)
            self.scale.fill_(scale)
            if bias is not None:
                self.bias.copy_(bias.detach())
        if seed is not None:
            self.set_sign_seed(seed)

    @torch.no_grad()
    def set_sign_seed(self, seed: int) -> None:
        """Seed mode: store ``seed`` and regenerate ``sign_bits`` from it
        (:func:`subkern.nn.init.seeded_signs`, flat weight order)."""
        if self.sign_mode != "seed":
            raise RuntimeError("set_sign_seed needs a layer built with sign_mode='seed'")
        self.sign_seed.fill_(check_seed(int(seed)))
        self._regenerate_signs()

    @torch.no_grad()
    def _regenerate_signs(self) -> None:
        rows, fan_in = self._rows_and_fan_in()
        signs = seeded_signs(int(self.sign_seed), rows * fan_in, self.mask_bits.device)
        self.sign_bits.copy_(pack_rows(signs.reshape(rows, fan_in)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.sign_mode == "seed" and prefix + "sign_seed" in state_dict:
            self._regenerate_signs()

    def _prepacked(self, group: int, rows: slice | None) -> tuple[torch.Tensor, float]:
        """``(prepacked layout of the bits (of rows), float scale)``, built on first use and
        cached while the bits and the scale stay the same tensors with the same versions."""
        buffers = self._buffers  # (nn.Module.__getattr__ costs about 0.5 us per buffer)
        mb, sb, sc = buffers["mask_bits"], buffers["sign_bits"], buffers["scale"]
        scale, packs = cached_on(self, "_prepacked_cache", (mb, sb, sc), lambda: (float(sc), {}))
        packed = packs.get(group)
        if packed is None:
            _, fan_in = self._rows_and_fan_in()
            if rows is not None:
                mb, sb = mb[rows], sb[rows]
            packed = packs[group] = ternary_prepack(mb, sb, fan_in)
        return packed, scale

    def _apply_bits(self, x: torch.Tensor, group: int = 0, rows: slice | None = None
                    ) -> torch.Tensor:
        """``x [..., fan_in]`` times the (``rows`` of the) layer's ternary matrix, plus bias."""
        nrows, fan_in = self._rows_and_fan_in()
        bias = self._buffers.get("bias")   # None when the layer has no bias
        if rows is not None:
            nrows = rows.stop - rows.start
            bias = None if bias is None else bias[rows]
        if prepacked_preferred(x, fan_in):
            packed, scale = self._prepacked(group, rows)
            return ternary_linear_prepacked_cpu(x, packed, scale, fan_in, nrows, bias)
        mb, sb = self.mask_bits, self.sign_bits
        if rows is not None:
            mb, sb = mb[rows], sb[rows]
        return ternary_linear(x, mb, sb, float(self.scale), fan_in, bias)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_prepacked_cache", None)   # a cache: not pickled / deep-copied
        return state

    def _sign_config(self) -> dict:
        return {} if self.sign_mode == "bits" else {"sign_mode": self.sign_mode}

    def _sign_repr(self) -> str:
        return "" if self.sign_mode == "bits" else ", sign_mode='seed'"


class SupermaskLinear(_SupermaskBase):
    """``y = c * x @ (M * (2 S - 1))^T + bias`` from packed bits (an edge-popup Linear).

    ``sign_mode``: ``"bits"`` (store the sign bits) or ``"seed"`` (store the seed that
    regenerates them; module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, sign_mode: str = "bits") -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.sign_mode = sign_mode
        _register_packed_buffers(self, self.out_features, self.in_features, bias, device,
                                 sign_mode)

    def _rows_and_fan_in(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def deploy_config(self) -> dict:
        """Constructor keyword arguments (JSON-able) for the deployment module tree
        (``sign_mode`` only in seed mode, so that bits-mode trees stay readable by subkerns that
        predate it)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **self._sign_config()}

    @classmethod
    def from_weight_and_mask(cls, weight: torch.Tensor, mask: torch.Tensor,
                             bias: torch.Tensor | None = None, atol: float = 1e-6, *,
                             signs: str = "bits", sign_seed: int | None = None
                             ) -> SupermaskLinear:
        """Pack ``weight * mask`` (kept weights must be ``+-c`` for one ``c``, within ``atol``
        relative). ``signs``: ``"bits"``, ``"seed"`` (``sign_seed`` must regenerate every kept
        sign, else ``ValueError``) or ``"auto"`` (the seed when it does, else the bits)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
        mask_bits, sign_bits, scale, seed = _pack_weight_and_mask(weight, mask, atol, signs,
                                                                  sign_seed)
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, sign_mode="bits" if seed is None else "seed")
        layer._fill(mask_bits, sign_bits, scale, seed, bias)
        return layer

    @classmethod
    def from_subnet(cls, module: nn.Module, atol: float = 1e-6, signs: str = "bits"
                    ) -> SupermaskLinear:
        """From a trained SubnetLinear (``weight``, ``scores``, ``k``, ``bias``, and
        ``sign_seed`` for ``signs`` "seed" / "auto")."""
        weight, mask = subnet_weight_and_mask(module)
        return cls.from_weight_and_mask(weight, mask, getattr(module, "bias", None), atol,
                                        signs=signs, sign_seed=getattr(module, "sign_seed", None))

    def dense_weight(self) -> torch.Tensor:
        """The effective float32 weight ``[out, in]`` (for checks; the forward never builds it)."""
        return unpack_ternary(self.mask_bits, self.sign_bits, float(self.scale), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_bits(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{self._sign_repr()}")


class SupermaskConv2d(_SupermaskBase):
    """An edge-popup Conv2d from packed bits.

    The bits hold the weight ``[out, in / groups, kh, kw]`` flattened per output channel
    (``fan_in = in / groups * kh * kw`` bits per row, in PyTorch's weight order). The forward is
    im2col + the ternary matmul per group: ``F.unfold`` materialises the
    ``[N * Hout * Wout, in / groups * kh * kw]`` patch matrix (``kh * kw`` times the input size
    for stride 1), so the memory is that of an im2col convolution, never that of a dense weight.
    Only zero padding (``padding_mode='zeros'``) is supported. ``sign_mode`` as
    :class:`SupermaskLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 device: torch.device | str | None = None, sign_mode: str = "bits") -> None:
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
        self.sign_mode = sign_mode
        _register_packed_buffers(self, self.out_channels, self.fan_in, bias, device, sign_mode)

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def _rows_and_fan_in(self) -> tuple[int, int]:
        return self.out_channels, self.fan_in

    def deploy_config(self) -> dict:
        """Constructor keyword arguments (JSON-able) for the deployment module tree (as
        :meth:`SupermaskLinear.deploy_config`)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias is not None, **self._sign_config()}

    @classmethod
    def from_weight_and_mask(cls, weight: torch.Tensor, mask: torch.Tensor,
                             bias: torch.Tensor | None = None, *,
                             stride: int | tuple[int, int] = 1,
                             padding: int | tuple[int, int] = 0,
                             dilation: int | tuple[int, int] = 1, groups: int = 1,
                             atol: float = 1e-6, signs: str = "bits",
                             sign_seed: int | None = None) -> SupermaskConv2d:
        """As :meth:`SupermaskLinear.from_weight_and_mask` for a 4-D weight."""
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4-D [out, in/groups, kh, kw], got "
                             f"{tuple(weight.shape)}")
        mask_bits, sign_bits, scale, seed = _pack_weight_and_mask(weight, mask, atol, signs,
                                                                  sign_seed)
        out, cin_g, kh, kw = weight.shape
        layer = cls(cin_g * groups, out, (kh, kw), stride, padding, dilation, groups,
                    bias=bias is not None, device=weight.device,
                    sign_mode="bits" if seed is None else "seed")
        layer._fill(mask_bits, sign_bits, scale, seed, bias)
        return layer

    @classmethod
    def from_subnet(cls, module: nn.Module, atol: float = 1e-6, signs: str = "bits"
                    ) -> SupermaskConv2d:
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
                                        atol=atol, signs=signs,
                                        sign_seed=getattr(module, "sign_seed", None))

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
            rows = None if self.groups == 1 else slice(g * cout_g, (g + 1) * cout_g)
            y = self._apply_bits(cols, g, rows)
            outs.append(y.reshape(n, hout * wout, cout_g))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return y.transpose(1, 2).reshape(n, self.out_channels, hout, wout)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}{self._sign_repr()}")
