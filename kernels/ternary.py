"""Triton kernel of ``subkern::ternary_linear``: a matmul straight from packed mask / sign bits.

``y[b, o] = scale * sum_i M[o, i] * (S[o, i] ? +x[b, i] : -x[b, i]) + bias[o]``.

The bits arrive as ``int64 [out, W]`` (layout of :mod:`subkern.ops.ternary`); the kernel reads the
same storage as ``int32 [out, 2 W]`` (little-endian: 32-bit word ``j`` holds bits ``32 j .. 32 j +
31`` of the row, least significant first). A program owns ``BLOCK_B`` batch rows x ``BLOCK_O``
output rows and walks the input dimension ``BLOCK_K`` columns at a time: it loads the
``BLOCK_K / 32`` words of every row, expands them in registers to the ternary tile
``t = M * (2 S - 1)`` (``[BLOCK_O, BLOCK_K]``, values -1/0/+1, exact in any float type), and
accumulates ``x_tile @ t^T`` in float32 (``tl.dot`` with IEEE float32 precision). The dense weight
never exists in memory. ``IN`` (the layer's fan-in) is a compile-time constant: one
compilation per layer shape. Columns past ``in_features`` read ``x = 0``, so padding bits do not
matter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ternary_linear"]


@triton.jit
def _ternary_linear_kernel(x_ptr, m_ptr, s_ptr, bias_ptr, y_ptr, B, OUT, scale,
                           IN: tl.constexpr, NW32: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_b = offs_b < B
    mask_o = offs_o < OUT
    WPB: tl.constexpr = BLOCK_K // 32          # 32-bit words per K block
    shifts = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * IN + offs_k[None, :],
                     mask=mask_b[:, None] & (offs_k[None, :] < IN), other=0.0).to(tl.float32)
        offs_w = k0 // 32 + tl.arange(0, WPB)
        wmask = mask_o[:, None] & (offs_w[None, :] < NW32)
        woff = offs_o.to(tl.int64)[:, None] * NW32 + offs_w[None, :]
        mw = tl.load(m_ptr + woff, mask=wmask, other=0)
        sw = tl.load(s_ptr + woff, mask=wmask, other=0)
        # bit j of word w -> column 32 w + j (arithmetic shift, then & 1: any bit pattern works)
        mb = (mw[:, :, None] >> shifts[None, None, :]) & 1
        sb = (sw[:, :, None] >> shifts[None, None, :]) & 1
        t = tl.reshape(mb * (2 * sb - 1), [BLOCK_O, BLOCK_K]).to(tl.float32)
        acc += tl.dot(xt, tl.trans(t), input_precision="ieee")
    y = acc * scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_b.to(tl.int64)[:, None] * OUT + offs_o[None, :], y,
             mask=mask_b[:, None] & mask_o[None, :])


def ternary_linear(x: torch.Tensor, mask_bits: torch.Tensor, sign_bits: torch.Tensor,
                   scale: float, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [B, in]`` (contiguous) times the packed ternary matrix; returns ``x``'s dtype."""
    B = x.shape[0]
    out = mask_bits.shape[0]
    y = torch.empty((B, out), dtype=torch.float32, device=x.device)
    if B == 0 or out == 0:
        return y.to(x.dtype)
    if in_features == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(torch.float32)
        return y.to(x.dtype)
    m32 = mask_bits.contiguous().view(torch.int32)
    s32 = sign_bits.contiguous().view(torch.int32)
    block_b = 16
    block_o = 32
    block_k = 64
    grid = (triton.cdiv(B, block_b), triton.cdiv(out, block_o))
    bias_arg = bias.contiguous() if bias is not None else y
    _ternary_linear_kernel[grid](x, m32, s32, bias_arg, y, B, out, float(scale),
                                 IN=in_features, NW32=m32.shape[1],
                                 HAS_BIAS=bias is not None, BLOCK_B=block_b,
                                 BLOCK_O=block_o, BLOCK_K=block_k)
    return y.to(x.dtype)
