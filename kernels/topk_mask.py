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
* Batched (:func:`topk_mask_batched`): all tensors of one dtype are selected together, one launch
  per pass for all of them. Their scores are copied once into one flat buffer; a block table maps
  every 1024-entry block to its segment (tensor) and start, so a block never spans two tensors.
  Each segment has its own ``[prefix, remaining]`` state and its own histogram row: the histogram
  kernels add into the row of their block's segment and the pick kernel runs one program per
  segment. Tie ranks restart at every segment (the exclusive scan of the per-block tie counts
  minus the scan at the segment's first block). The masks are written into one output buffer and
  returned as per-tensor views of it.
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
def _pick_kernel_body(hist_ptr, state_ptr, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """Appends the digit of the bucket holding the ``remaining``-th largest key to the prefix."""
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
def _pick_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    _pick_kernel_body(hist_ptr, state_ptr, SHIFT, NBINS)


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


# --------------------------------------------------------------------------------------------
# Batched: many tensors (segments of one flat buffer) per launch
# --------------------------------------------------------------------------------------------

@triton.jit
def _seg_block(blk_seg_ptr, blk_start_ptr, seg_end_ptr, BLOCK: tl.constexpr):
    """Segment, offsets and validity of this program's block of the flat buffer."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(seg_end_ptr + seg)
    offs = start + tl.arange(0, BLOCK)
    return seg, offs, offs < end


@triton.jit
def _seg_hist_kernel(x_ptr, blk_seg_ptr, blk_start_ptr, seg_end_ptr, state_ptr, hist_ptr,
                     SHIFT: tl.constexpr, HI: tl.constexpr, NBINS: tl.constexpr,
                     IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    seg, offs, valid = _seg_block(blk_seg_ptr, blk_start_ptr, seg_end_ptr, BLOCK)
    key = _keys(x_ptr, offs, valid, IS_F64)
    prefix = tl.load(state_ptr + 2 * seg)
    match = valid & ((key >> HI) == (prefix >> HI))
    digit = ((key >> SHIFT) & (NBINS - 1)).to(tl.int32)
    h = tl.histogram(digit, NBINS, mask=match)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist_ptr + seg * NBINS + bins, h.to(tl.int64), mask=h != 0)


@triton.jit
def _seg_pick_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    seg = tl.program_id(0)
    _pick_kernel_body(hist_ptr + seg * NBINS, state_ptr + 2 * seg, SHIFT, NBINS)


@triton.jit
def _seg_tie_count_kernel(x_ptr, blk_seg_ptr, blk_start_ptr, seg_end_ptr, state_ptr, ties_ptr,
                          IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    seg, offs, valid = _seg_block(blk_seg_ptr, blk_start_ptr, seg_end_ptr, BLOCK)
    key = _keys(x_ptr, offs, valid, IS_F64)
    threshold = tl.load(state_ptr + 2 * seg)
    eq = (valid & (key == threshold)).to(tl.int64)
    tl.store(ties_ptr + tl.program_id(0), tl.sum(eq, axis=0))


@triton.jit
def _seg_mask_kernel(x_ptr, blk_seg_ptr, blk_start_ptr, seg_end_ptr, state_ptr, before_ptr,
                     out_ptr, IS_F64: tl.constexpr, ONE_BITS: tl.constexpr,
                     BLOCK: tl.constexpr):
    seg, offs, valid = _seg_block(blk_seg_ptr, blk_start_ptr, seg_end_ptr, BLOCK)
    key = _keys(x_ptr, offs, valid, IS_F64)
    threshold = tl.load(state_ptr + 2 * seg)
    ties = tl.load(state_ptr + 2 * seg + 1)
    eq = (valid & (key == threshold)).to(tl.int64)
    rank = tl.load(before_ptr + tl.program_id(0)) + tl.cumsum(eq, axis=0) - eq
    keep = (key > threshold) | ((eq != 0) & (rank < ties))
    if ONE_BITS != 0:  # bfloat16 output written through an int16 view: the bits of 1.0
        tl.store(out_ptr + offs, tl.where(keep, ONE_BITS, 0).to(tl.int16), mask=valid)
    else:
        tl.store(out_ptr + offs, keep.to(out_ptr.dtype.element_ty), mask=valid)


def _select_segments(flat: torch.Tensor, sizes: list[int], keeps: list[int], out: torch.Tensor
                     ) -> None:
    """Masks of the segments ``sizes`` (each >= 1 entry, 1 <= keep <= size) of the flat buffer
    ``flat`` into ``out`` (same layout): one launch per pass for all segments."""
    device = flat.device
    nseg = len(sizes)
    is_f64 = flat.dtype == torch.float64
    bits = _key_bits(flat.dtype)
    npass = -(-bits // DIGIT_BITS)
    # block table: segment and start of every block; segment ends (host lists -> one copy each)
    seg_blocks = [-(-n // _BLOCK) for n in sizes]
    starts, ends, offset = [], [], 0
    for n in sizes:
        starts.append(offset)
        offset += n
        ends.append(offset)
    blk_seg_host = torch.repeat_interleave(torch.arange(nseg), torch.tensor(seg_blocks))
    first_block = torch.tensor(seg_blocks).cumsum(0) - torch.tensor(seg_blocks)
    blk_start_host = (torch.tensor(starts)[blk_seg_host]
                      + (torch.arange(blk_seg_host.numel()) - first_block[blk_seg_host]) * _BLOCK)
    blk_seg = blk_seg_host.to(device)
    blk_start = blk_start_host.to(device)
    seg_end = torch.tensor(ends, dtype=torch.int64).to(device)
    state = torch.stack([torch.zeros(nseg, dtype=torch.int64), torch.tensor(keeps)], 1).to(device)
    hist = torch.zeros((npass, nseg, _NBINS), dtype=torch.int64, device=device)
    nblocks = blk_seg.numel()
    table = (blk_seg, blk_start, seg_end)
    hi = bits
    for p in range(npass):
        shift = max(bits - DIGIT_BITS * (p + 1), 0)
        _seg_hist_kernel[(nblocks,)](flat, *table, state, hist[p], SHIFT=shift, HI=hi,
                                     NBINS=_NBINS, IS_F64=is_f64, BLOCK=_BLOCK)
        _seg_pick_kernel[(nseg,)](hist[p], state, SHIFT=shift, NBINS=_NBINS)
        hi = shift
    ties = torch.empty(nblocks, dtype=torch.int64, device=device)
    _seg_tie_count_kernel[(nblocks,)](flat, *table, state, ties, IS_F64=is_f64, BLOCK=_BLOCK)
    before = torch.cumsum(ties, 0) - ties  # exclusive scan over all blocks ...
    before = before - before[first_block.to(device)][blk_seg]  # ... restarted per segment
    one_bits = 0x3F80 if out.dtype == torch.bfloat16 else 0
    target = out.view(torch.int16) if one_bits else out
    _seg_mask_kernel[(nblocks,)](flat, *table, state, before, target, IS_F64=is_f64,
                                 ONE_BITS=one_bits, BLOCK=_BLOCK)


def topk_mask_batched(scores: Sequence[torch.Tensor], k: Sequence[float]) -> list[torch.Tensor]:
    """:func:`topk_mask` of every tensor, selected together: per dtype, one copy of all scores
    into a flat buffer and one launch per pass for all tensors. Returns per-tensor views (each
    contiguous, of its tensor's shape) of one output buffer per dtype."""
    scores = list(scores)
    ks = list(k)
    if len(ks) != len(scores):
        raise ValueError(f"one k per tensor: got {len(ks)} values of k for {len(scores)} tensors")
    outs: list[torch.Tensor | None] = [None] * len(scores)
    groups: dict[torch.dtype, list[int]] = {}
    for i, s in enumerate(scores):
        groups.setdefault(s.dtype, []).append(i)
    for dtype, idx in groups.items():
        device = scores[idx[0]].device
        total = sum(scores[i].numel() for i in idx)
        out = torch.empty(total, dtype=dtype, device=device)
        # segments that need a selection (keep < 1 only when k rounds 1 - k to 1: nothing kept)
        sel = [i for i in idx
               if scores[i].numel() > 0 and _kept_count(scores[i].numel(), ks[i]) >= 1]
        offset, where = 0, {}
        for i in idx:
            where[i] = offset
            offset += scores[i].numel()
        for i in idx:
            if scores[i].numel() > 0 and i not in sel:
                out[where[i]:where[i] + scores[i].numel()].zero_()
        if sel:
            if len(sel) == len(idx):
                flat = torch.cat([scores[i].reshape(-1) for i in idx])
                _select_segments(flat, [scores[i].numel() for i in idx],
                                 [_kept_count(scores[i].numel(), ks[i]) for i in idx], out)
            else:  # a flat buffer of the selected segments only, scattered back after
                flat = torch.cat([scores[i].reshape(-1) for i in sel])
                part = torch.empty_like(flat)
                _select_segments(flat, [scores[i].numel() for i in sel],
                                 [_kept_count(scores[i].numel(), ks[i]) for i in sel], part)
                pos = 0
                for i in sel:
                    n = scores[i].numel()
                    out[where[i]:where[i] + n].copy_(part[pos:pos + n])
                    pos += n
        for i in idx:
            outs[i] = out[where[i]:where[i] + scores[i].numel()].view(scores[i].shape)
    return [o for o in outs if o is not None]
