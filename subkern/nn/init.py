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

Seed-regenerated signs
----------------------
``signed_constant`` with ``sign_seed=s`` draws the signs from :func:`seeded_signs` instead of a
torch RNG: a counter-based generator (a hash of the seed and the weight's flat index) that does
not depend on the torch version, the device or the order of draws. A deployed supermask can then
store the seed instead of one sign bit per weight (:class:`subkern.nn.SupermaskLinear`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

INIT_MODES: tuple[str, ...] = ("signed_constant", "unsigned_constant", "kaiming_normal",
                               "kaiming_uniform")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_CHUNK = 1 << 15   # indices per step: the int64 temporaries stay in cache


def _i64(v: int) -> int:
    """The int64 with the bit pattern of the unsigned 64-bit ``v``."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns, in place on ``z``."""
    # int64 multiplication wraps modulo 2^64 like the unsigned one (same low 64 bits)
    z ^= _shr(z, 30)
    z *= _i64(_MIX1)
    z ^= _shr(z, 27)
    z *= _i64(_MIX2)
    z ^= _shr(z, 31)
    return z


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def check_seed(seed: object, name: str = "sign_seed") -> int:
    """Validate a sign seed: an int in ``[-2^63, 2^63)`` (it is stored as int64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 63):
        raise ValueError(f"{name} must fit in int64, got {seed}")
    return seed


def seeded_signs(seed: int, numel: int, device: torch.device | str | None = None
                 ) -> torch.Tensor:
    """``bool [numel]``: ``True`` where the signed-constant weight with flat index ``i`` is ``+``.

    Bit-exact definition (all arithmetic on unsigned 64-bit integers, modulo ``2^64``; this is
    SplitMix64's output function applied to a counter, so any language can reproduce it)::

        mix(z) = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                 z ^= z >> 27; z *= 0x94D049BB133111EB;  z ^= z >> 31;  return z
        key    = mix(seed mod 2^64)                    # seed as a two's-complement int64
        h_i    = mix(key + (i + 1) * 0x9E3779B97F4A7C15)
        sign_i = +1 if (h_i >> 63) == 1 else -1        # the top bit of h_i

    ``i`` is the row-major flat index in the layer's weight (``[out, in]`` or
    ``[out, in / groups, kh, kw]``), i.e. the order of the packed sign bits. Computed in chunks of
    ``2^15`` indices with torch ``int64`` ops (which wrap like unsigned arithmetic).
    """
    seed = check_seed(seed)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    key = _mix64_int(seed)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, _CHUNK):
        stop = min(numel, start + _CHUNK)
        i = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device)
        i *= _i64(_GOLDEN)
        i += _i64(key)
        z = _mix64(i)
        out[start:stop] = z < 0          # top bit set
    return out


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
                 generator: torch.Generator | None = None, sign_seed: int | None = None
                 ) -> torch.Tensor:
    """Fill ``weight`` in place with an edge-popup init (``INIT_MODES``); returns ``weight``.

    ``generator`` makes the draw reproducible independently of the global RNG. ``sign_seed``
    (``signed_constant`` only) takes the signs from :func:`seeded_signs` instead, so that they can
    be regenerated from the seed alone (e.g. by a deployed supermask).
    """
    if init not in INIT_MODES:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INIT_MODES)}")
    if sign_seed is not None:
        check_seed(sign_seed)
        if init != "signed_constant":
            raise ValueError(f"sign_seed applies to init 'signed_constant' only, got {init!r}")
    std = init_std(weight, k, scale_fan, nonlinearity, mode)
    if init == "signed_constant":
        if sign_seed is not None:
            coin = ~seeded_signs(sign_seed, weight.numel()).reshape(weight.shape)
        else:
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
