"""Triton kernels of ``subkern::csr_linear``, ``csr_matmul`` and ``bitmap_linear`` (GPU).

Format and math: :mod:`subkern.ops.sparse_linear`. ``y[b, o] = sum_j values[j] * x[b, col[j]]``
over the nonzeros ``j`` of row ``o`` (``row_ptr[o] <= j < row_ptr[o + 1]``); int16 column indices
are unsigned 16-bit patterns (``& 0xFFFF`` after widening). Every sum is accumulated in float32.

* ``csr_linear`` with batch <= 16 (memory bound, SpMV-style): one program per output row and
  batch block; it walks the row's nonzeros ``BLOCK_N`` at a time, gathers the
  ``[BLOCK_B, BLOCK_N]`` activations ``x[b, col]`` (from ``x`` transposed to ``[in, B]`` when
  B >= 2, so that a nonzero's activations are contiguous) and reduces ``x * values`` over the
  nonzeros.
  The weight is read once per batch block (once in total for batch <= ``BLOCK_B``).
* ``csr_matmul`` (and ``csr_linear`` with a larger batch, run as ``(W @ x^T)^T``): one program per
  output row and ``BLOCK_N``-column block of ``X [in, N]``; per ``BLOCK_K`` nonzeros it loads the
  ``[BLOCK_K, BLOCK_N]`` rows ``X[col, n]`` (coalesced along ``n``) and accumulates
  ``sum_k values[k] * X[col_k, n]``.
* ``bitmap_linear``: one program per output row and batch block; per ``BLOCK_K`` columns it
  expands the row's 32-bit bitmap words into a 0/1 vector ``m``, finds each set bit's value with
  an exclusive prefix sum (``base + cumsum(m) - m``, ``base`` = values consumed so far) and
  accumulates ``x * value`` where ``m = 1``.

Loads are masked to the row's range and columns are masked to ``[0, in)``, so a corrupt
structure never reads out of bounds; the structure itself is validated by the CPU kernels and by
:func:`subkern.ops.sparse_linear.pack_csr` / the deployment loader, not per GPU call (a check
would synchronise the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["csr_linear", "csr_matmul", "bitmap_linear", "SPMV_MAX_BATCH"]

#: csr_linear batches up to this run the SpMV-style kernel; larger ones the tiled SpMM.
SPMV_MAX_BATCH = 16


@triton.jit
def _load_cols(col_ptr, offs, mask, IN, COL16: tl.constexpr):
    c = tl.load(col_ptr + offs, mask=mask, other=0).to(tl.int32)
    if COL16:
        c = c & 0xFFFF
    ok = mask & (c >= 0) & (c < IN)
    return c, ok


@triton.jit
def _csr_spmv_kernel(x_ptr, row_ptr, col_ptr, val_ptr, bias_ptr, y_ptr, B, OUT, IN,
                     stride_xb, stride_xc, COL16: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    o = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    start = tl.load(row_ptr + o)
    end = tl.load(row_ptr + o + 1)
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    j0 = start
    while j0 < end:         # run-time bounds: a while loop (the interpreter's range() rejects them)
        offs = j0 + tl.arange(0, BLOCK_N)
        in_row = offs < end
        cols, ok = _load_cols(col_ptr, offs, in_row, IN, COL16)
        vals = tl.load(val_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
                     + cols.to(tl.int64)[None, :] * stride_xc,
                     mask=mask_b[:, None] & ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * vals[None, :], axis=1)
        j0 += BLOCK_N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(tl.float32)
    tl.store(y_ptr + offs_b.to(tl.int64) * OUT + o, acc, mask=mask_b)


@triton.jit
def _csr_spmm_kernel(row_ptr, col_ptr, val_ptr, X_ptr, Y_ptr, N, IN, COL16: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    o = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    start = tl.load(row_ptr + o)
    end = tl.load(row_ptr + o + 1)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    j0 = start
    while j0 < end:
        offs = j0 + tl.arange(0, BLOCK_K)
        in_row = offs < end
        cols, ok = _load_cols(col_ptr, offs, in_row, IN, COL16)
        vals = tl.load(val_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        xt = tl.load(X_ptr + cols.to(tl.int64)[:, None] * N + offs_n[None, :],
                     mask=ok[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * vals[:, None], axis=0)
        j0 += BLOCK_K
    tl.store(Y_ptr + o.to(tl.int64) * N + offs_n, acc, mask=mask_n)


@triton.jit
def _bitmap_kernel(x_ptr, bits_ptr, row_ptr, val_ptr, bias_ptr, y_ptr, B, OUT, IN, NW32,
                   HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    base = tl.load(row_ptr + o)
    end = tl.load(row_ptr + o + 1)
    WPB: tl.constexpr = BLOCK_K // 32
    shifts = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    k0 = 0
    while k0 < IN:
        offs_w = k0 // 32 + tl.arange(0, WPB)
        words = tl.load(bits_ptr + o.to(tl.int64) * NW32 + offs_w, mask=offs_w < NW32, other=0)
        m = tl.reshape((words[:, None] >> shifts[None, :]) & 1, [BLOCK_K])
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = tl.where(offs_k < IN, m, 0)
        pos = base + tl.cumsum(m, 0) - m
        keep = (m != 0) & (pos < end)
        vals = tl.load(val_ptr + pos, mask=keep, other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * IN + offs_k[None, :],
                     mask=mask_b[:, None] & keep[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * vals[None, :], axis=1)
        base += tl.sum(m, 0)
        k0 += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(tl.float32)
    tl.store(y_ptr + offs_b.to(tl.int64) * OUT + o, acc, mask=mask_b)


def _empty_result(B: int, out: int, bias: torch.Tensor | None, device: torch.device
                  ) -> torch.Tensor:
    y = torch.zeros((B, out), dtype=torch.float32, device=device)
    if bias is not None:
        y += bias.to(torch.float32)
    return y


def csr_matmul(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
               X: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
               relu: bool = False) -> torch.Tensor:
    """``Y [out, N] = relu?(W @ X + bias[:, None])`` for ``X [in_features, N]``; returns ``X``'s
    dtype (the optional bias / ReLU epilogue is applied in float32 after the kernel)."""
    out = row_ptr.shape[0] - 1
    N = X.shape[1]
    Y = torch.zeros((out, N), dtype=torch.float32, device=X.device)
    if out > 0 and N > 0 and values.numel() > 0:
        X = X.contiguous()
        block_n = min(64, max(16, triton.next_power_of_2(N)))
        grid = (out, triton.cdiv(N, block_n))
        _csr_spmm_kernel[grid](row_ptr, col_idx, values, X, Y, N, in_features,
                               COL16=col_idx.dtype == torch.int16, BLOCK_K=16, BLOCK_N=block_n)
    if bias is not None:
        Y += bias.to(torch.float32).unsqueeze(1)
    if relu:
        Y.clamp_min_(0.0)
    return Y.to(X.dtype)


def csr_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               values: torch.Tensor, in_features: int, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """``y [B, out] = x @ W^T + bias`` for ``x [B, in_features]``; returns ``x``'s dtype."""
    B = x.shape[0]
    out = row_ptr.shape[0] - 1
    if B == 0 or out == 0 or values.numel() == 0:
        return _empty_result(B, out, bias, x.device).to(x.dtype)
    if B > SPMV_MAX_BATCH:
        y = csr_matmul(row_ptr, col_idx, values, x.t().contiguous().to(torch.float32),
                       in_features).t()
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).contiguous()
    # batch >= 2 reads x transposed ([in, B]): the activations one nonzero needs are then
    # contiguous (one vector load) instead of B loads `in` elements apart
    xs = x.contiguous() if B == 1 else x.t().contiguous()
    stride_xb, stride_xc = (in_features, 1) if B == 1 else (1, B)
    y = torch.empty((B, out), dtype=torch.float32, device=x.device)
    block_b = max(1, triton.next_power_of_2(B))
    grid = (out, triton.cdiv(B, block_b))
    bias_arg = bias if bias is not None else y
    _csr_spmv_kernel[grid](xs, row_ptr, col_idx, values, bias_arg, y, B, out, in_features,
                           stride_xb, stride_xc, COL16=col_idx.dtype == torch.int16,
                           HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=64)
    return y.to(x.dtype)


def bitmap_linear(x: torch.Tensor, bitmap: torch.Tensor, row_ptr: torch.Tensor,
                  values: torch.Tensor, in_features: int, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """``y [B, out] = x @ W^T + bias`` with ``W`` as bitmap + values; returns ``x``'s dtype."""
    B = x.shape[0]
    out = bitmap.shape[0]
    if B == 0 or out == 0 or values.numel() == 0 or in_features == 0:
        return _empty_result(B, out, bias, x.device).to(x.dtype)
    x = x.contiguous()
    bits32 = bitmap.contiguous().view(torch.int32)          # little-endian 32-bit halves
    y = torch.empty((B, out), dtype=torch.float32, device=x.device)
    block_b = min(16, max(1, triton.next_power_of_2(B)))
    grid = (out, triton.cdiv(B, block_b))
    bias_arg = bias if bias is not None else y
    _bitmap_kernel[grid](x, bits32, row_ptr, values, bias_arg, y, B, out, in_features,
                         bits32.shape[1], HAS_BIAS=bias is not None, BLOCK_B=block_b,
                         BLOCK_K=128)
    return y.to(x.dtype)
