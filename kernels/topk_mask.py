"""Triton kernels of edge-popup's top-k score masking (radix select, no sort).

Semantics as :mod:`subkern.ops.topk_mask_reference`: keep ``keep = n - floor((1 - k) n)`` entries
ranked by ``(|s| descending, flat index ascending)``, NaN lowest.

* Key: ``|s|``'s IEEE bits with the sign cleared, ``+ 1``, and ``0`` for NaN: integer order equals
  the ranking order. fp16/bf16/fp32 use the (exact) fp32 bits, 31 significant bits; fp64 its own
  63 bits. Keys are handled as int64.
* Select (all on the device, no host synchronisation): the threshold key ``T`` (the keep-th
  largest) is found 11 bits at a time from the top (31 bits: 3 passes, 63 bits: 6). Each pass is a
  histogram kernel (``tl.histogram`` per block over the entries whose higher bits equal ``T``'s
  known prefix, added to a global histogram with atomics) and a one-program kernel that walks the
  2048 buckets from the top (reverse ``tl.cumsum``), appends the digit to the prefix and subtracts
  the entries of the higher buckets from ``remaining``. The state ``[prefix, remaining]`` lives in
  a device tensor. At the end ``T = prefix`` and ``remaining`` = ties to keep (>= 1).
* Mask: ``key > T`` kept; ``key == T`` kept while its rank among the ties in flat order is below
  ``remaining``. The rank is ``(ties in earlier blocks) + (ties before it in its block)``: one
  kernel counts the ties per block, ``torch.cumsum`` gives the exclusive prefix, and the mask
  kernel adds the in-block ``tl.cumsum``. Deterministic (atomics only add integers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["topk_mask", "topk_threshold", "topk_mask_batched", "DIGIT_BITS"]

#: Bits of the key resolved per histogram pass.
DIGIT_BITS = 11
_NBINS = 1 << DIGIT_BITS
_BLOCK = 1024


@triton.jit
def _keys(x_ptr, offs, valid, IS_F64: tl.constexpr):
    """int64 ranking keys of the entries at ``offs`` (0 for NaN, |s| bits + 1 otherwise)."""
    if IS_F64:
        x = tl.load(x_ptr + offs, mask=valid, other=0.0)
        b = x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
        key = tl.where(b <= 0x7FF0000000000000, b + 1, 0)
    else:
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        b = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        key = tl.where(b <= 0x7F800000, b + 1, 0)
    return key


@triton.jit
def _hist_kernel(x_ptr, n, state_ptr, hist_ptr, SHIFT: tl.constexpr, HI: tl.constexpr,
                 NBINS: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    key = _keys(x_ptr, offs, valid, IS_F64)
    prefix = tl.load(state_ptr)
    match = valid & ((key >> HI) == (prefix >> HI))
    digit = ((key >> SHIFT) & (NBINS - 1)).to(tl.int32)
    h = tl.histogram(digit, NBINS, mask=match)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist_ptr + bins, h.to(tl.int64), mask=h != 0)


@triton.jit
def _pick_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    offs = tl.arange(0, NBINS)
    h = tl.load(hist_ptr + (NBINS - 1 - offs))  # buckets from the top
    cum = tl.cumsum(h, axis=0)
    remaining = tl.load(state_ptr + 1)
    idx = tl.min(tl.where(cum >= remaining, offs, NBINS), axis=0)
    above = tl.sum(tl.where(offs < idx, h, 0), axis=0)
    digit = (NBINS - 1 - idx).to(tl.int64)
    prefix = tl.load(state_ptr)
    tl.store(state_ptr, prefix | (digit << SHIFT))
    tl.store(state_ptr + 1, remaining - above)


@triton.jit
def _tie_count_kernel(x_ptr, n, state_ptr, ties_ptr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    key = _keys(x_ptr, offs, valid, IS_F64)
    threshold = tl.load(state_ptr)
    eq = (valid & (key == threshold)).to(tl.int64)
    tl.store(ties_ptr + pid, tl.sum(eq, axis=0))


@triton.jit
def _mask_kernel(x_ptr, n, state_ptr, before_ptr, out_ptr, IS_F64: tl.constexpr,
                 ONE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    key = _keys(x_ptr, offs, valid, IS_F64)
    threshold = tl.load(state_ptr)
    ties = tl.load(state_ptr + 1)
    eq = (valid & (key == threshold)).to(tl.int64)
    rank = tl.load(before_ptr + pid) + tl.cumsum(eq, axis=0) - eq
    keep = (key > threshold) | ((eq != 0) & (rank < ties))
    if ONE_BITS != 0:  # bfloat16 output written through an int16 view: the bits of 1.0
        tl.store(out_ptr + offs, tl.where(keep, ONE_BITS, 0).to(tl.int16), mask=valid)
    else:
        tl.store(out_ptr + offs, keep.to(out_ptr.dtype.element_ty), mask=valid)


def _key_bits(dtype: torch.dtype) -> int:
    return 63 if dtype == torch.float64 else 31


def _kept_count(n: int, k: float) -> int:
    """``n - floor((1 - k) n)`` (as subkern.ops.topk_mask_reference.kept_count)."""
    return n - math.floor((1.0 - k) * n)


def _select(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Device state ``[T, ties]``: the keep-th largest key of contiguous ``x`` (1 <= keep <= n)."""
    n = x.numel()
    is_f64 = x.dtype == torch.float64
    bits = _key_bits(x.dtype)
    npass = -(-bits // DIGIT_BITS)
    state = torch.tensor([0, keep], dtype=torch.int64, device=x.device)
    hist = torch.zeros((npass, _NBINS), dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(n, _BLOCK),)
    hi = bits
    for p in range(npass):
        shift = max(bits - DIGIT_BITS * (p + 1), 0)
        _hist_kernel[grid](x, n, state, hist[p], SHIFT=shift, HI=hi, NBINS=_NBINS,
                           IS_F64=is_f64, BLOCK=_BLOCK)
        _pick_kernel[(1,)](hist[p], state, SHIFT=shift, NBINS=_NBINS)
        hi = shift
    return state


def _mask_from_state(x: torch.Tensor, state: torch.Tensor, out: torch.Tensor) -> None:
    n = x.numel()
    is_f64 = x.dtype == torch.float64
    nblocks = triton.cdiv(n, _BLOCK)
    ties = torch.empty(nblocks, dtype=torch.int64, device=x.device)
    _tie_count_kernel[(nblocks,)](x, n, state, ties, IS_F64=is_f64, BLOCK=_BLOCK)
    before = torch.cumsum(ties, 0) - ties
    # bfloat16 is stored as its bits (0x3F80 = 1.0): the interpreter has no bfloat16 stores
    one_bits = 0x3F80 if out.dtype == torch.bfloat16 else 0
    target = out.view(torch.int16) if one_bits else out
    _mask_kernel[(nblocks,)](x, n, state, before, target, IS_F64=is_f64, ONE_BITS=one_bits,
                             BLOCK=_BLOCK)


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """0/1 mask of ``scores``' dtype and shape keeping the ``kept_count`` largest ``|scores|``."""
    x = scores.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    keep = _kept_count(n, k)
    if n == 0:
        return out
    if keep <= 0:
        return out.zero_()
    if keep >= n:
        return out.fill_(1)
    state = _select(x.view(-1), keep)
    _mask_from_state(x.view(-1), state, out.view(-1))
    return out


def topk_threshold(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The smallest kept ``|score|`` (0-d, ``scores``' dtype); ``+inf`` if none, NaN if NaN."""
    x = scores.contiguous().view(-1)
    keep = _kept_count(x.numel(), k)
    if keep <= 0:
        return torch.full((), float("inf"), dtype=scores.dtype, device=scores.device)
    key = _select(x, keep)[0]
    if x.dtype == torch.float64:
        value = (key - 1).view(1).view(torch.float64)[0]
    else:
        value = (key - 1).to(torch.int32).view(1).view(torch.float32)[0]
    value = torch.where(key == 0, torch.full_like(value, float("nan")), value)
    return value.to(scores.dtype)


def topk_mask_batched(scores: Sequence[torch.Tensor], k: Sequence[float]) -> list[torch.Tensor]:
    """:func:`topk_mask` of every tensor (one selection per tensor, launched back to back)."""
    return [topk_mask(s, kk) for s, kk in zip(scores, k, strict=True)]
