"""Weight initialisations of edge-popup (Ramanujan et al., 2020, section 4 / official ``Builder``).

Every mode draws ``W`` from a distribution whose scale is ``std = gain / sqrt(fan)`` with
``gain = calculate_gain(nonlinearity)`` (``sqrt(2)`` for ReLU) and ``fan`` the layer's fan-in
(``mode="fan_in"``, the official default) or fan-out:

* ``signed_constant``   ``W = std * s`` with ``s`` uniform on ``{-1, +1}`` (the paper's best);
* ``unsigned_constant`` ``W = std`` everywhere;
* ``kaiming_normal``    ``W ~ N(0, std^2)``;
* ``kaiming_uniform``   ``W ~ U(-sqrt(3) std, sqrt(3) std)`` (same variance as kaiming_normal).

``scale_fan=True`` is the paper's "scaled" variant: only the fraction ``k`` of the weights survives
the mask, so the fan is taken as ``fan * k`` and every ``std`` grows by ``1 / sqrt(k)``, which keeps
the variance of the *masked* layer's output at the unmasked Kaiming level. (The official code
multiplies the fan by ``1 - prune_rate``, which equals ``k`` only at ``k = 0.5``; subkern follows
the paper's definition for every ``k``. The official ``kaiming_uniform`` ignores ``scale_fan``;
subkern scales it like the others.)

Scores use ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as the
official ``SubnetConv``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INIT_MODES: tuple[str, ...] = ("signed_constant", "unsigned_constant", "kaiming_normal",
                               "kaiming_uniform")


def check_k(k: float) -> float:
    """Validate the kept fraction ``k`` (``0 < k <= 1``, a finite number); return it as float."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a number in (0, 1], got {type(k).__name__}")
    k = float(k)
    if not (0.0 < k <= 1.0):   # also rejects NaN
        raise ValueError(f"k (the fraction of weights kept) must be in (0, 1], got {k}")
    return k


def init_std(weight: torch.Tensor, k: float = 1.0, scale_fan: bool = False,
             nonlinearity: str = "relu", mode: str = "fan_in") -> float:
    """``gain / sqrt(fan)`` with ``fan`` multiplied by ``k`` when ``scale_fan`` (see module doc)."""
    if weight.dim() < 2:
        raise ValueError("edge-popup inits need a weight with at least 2 dimensions")
    fan = nn.init._calculate_correct_fan(weight, mode)
    if fan == 0:
        raise ValueError(f"cannot initialise a weight of shape {tuple(weight.shape)}: fan is 0")
    if scale_fan:
        fan = fan * check_k(k)
    return nn.init.calculate_gain(nonlinearity) / math.sqrt(fan)


@torch.no_grad()
def init_weight_(weight: torch.Tensor, init: str, k: float = 1.0, scale_fan: bool = False,
                 nonlinearity: str = "relu", mode: str = "fan_in",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``weight`` in place with an edge-popup init (``INIT_MODES``); returns ``weight``.

    ``generator`` makes the draw reproducible independently of the global RNG (the signs of a
    ``signed_constant`` layer can then be regenerated from a seed).
    """
    if init not in INIT_MODES:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INIT_MODES)}")
    std = init_std(weight, k, scale_fan, nonlinearity, mode)
    if init == "signed_constant":
        coin = torch.rand(weight.shape, generator=generator, device="cpu") < 0.5
        signs = torch.where(coin, -1.0, 1.0).to(device=weight.device, dtype=weight.dtype)
        weight.copy_(signs * std)
    elif init == "unsigned_constant":
        weight.fill_(std)
    elif init == "kaiming_normal":
        draw = torch.randn(weight.shape, generator=generator, device="cpu")
        weight.copy_(draw * std)
    else:  # kaiming_uniform
        bound = math.sqrt(3.0) * std
        draw = torch.rand(weight.shape, generator=generator, device="cpu")
        weight.copy_((draw * 2.0 - 1.0) * bound)
    return weight


@torch.no_grad()
def init_scores_(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Official score init ``kaiming_uniform_(a=sqrt(5))``: ``U(-b, b)``, ``b = 1/sqrt(fan_in)``."""
    fan_in = nn.init._calculate_correct_fan(scores, "fan_in")
    if fan_in == 0:
        raise ValueError(f"cannot initialise scores of shape {tuple(scores.shape)}: fan_in is 0")
    bound = 1.0 / math.sqrt(fan_in)
    draw = torch.rand(scores.shape, generator=generator, device="cpu")
    scores.copy_((draw * 2.0 - 1.0) * bound)
    return scores
