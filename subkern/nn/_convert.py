"""Conversion between plain ``nn.Linear`` / ``nn.Conv2d`` layers and the reparameterised layers
built on them (STR's :mod:`subkern.nn.str`, edge-popup's :mod:`subkern.nn.subnet`).

* ``layer_config(module)``: the constructor arguments that rebuild a layer of the same shape,
  options, device and dtype (``in/out_features, bias`` for a Linear; the full convolution
  geometry and ``padding_mode`` for a Conv2d);
* ``copy_dense_(src, dst, keep_weight)``: copy a dense layer's weight (unless ``keep_weight`` is
  false) and bias into a reparameterised one;
* ``to_plain(layer)``: the plain ``nn.Linear`` / ``nn.Conv2d`` holding ``layer.effective_weight()``
  and its bias, i.e. the same outputs without the extra parameters.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class _Reparameterised(Protocol):
    weight: torch.Tensor
    bias: torch.Tensor | None

    def effective_weight(self) -> torch.Tensor: ...


def layer_config(module: nn.Linear | nn.Conv2d) -> dict[str, Any]:
    """Keyword arguments that build a layer like ``module`` (shape, options, device, dtype)."""
    common = {"bias": module.bias is not None, "device": module.weight.device,
              "dtype": module.weight.dtype}
    if isinstance(module, nn.Conv2d):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": module.kernel_size, "stride": module.stride,
                "padding": module.padding, "dilation": module.dilation,
                "groups": module.groups, "padding_mode": module.padding_mode} | common
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features} | common
    raise TypeError(f"module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}")


@torch.no_grad()
def copy_dense_(src: nn.Module, dst: nn.Module, keep_weight: bool = True) -> None:
    """Copy ``src``'s weight (when ``keep_weight``) and bias (when both have one) into ``dst``."""
    if keep_weight:
        dst.weight.copy_(src.weight)
    if src.bias is not None and dst.bias is not None:
        dst.bias.copy_(src.bias)


@torch.no_grad()
def to_plain(layer: _Reparameterised) -> nn.Linear | nn.Conv2d:
    """A plain ``nn.Conv2d`` / ``nn.Linear`` like ``layer`` holding ``layer.effective_weight()``
    and ``layer``'s bias."""
    plain_cls = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    dense = plain_cls(**layer_config(layer))
    dense.weight.copy_(layer.effective_weight())
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)
    return dense
