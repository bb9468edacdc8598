"""Triton kernels of edge-popup's masked linear layer: ``y = x (W * M)^T + b`` and its backward.

One tiled matmul kernel (the Triton matmul tutorial's blocking: ``BLOCK_M x BLOCK_N`` output
tiles, a ``BLOCK_K`` reduction loop, grouped tile order for L2 reuse) computes ``C = A @ B`` for
strided ``A [P, R]``, ``B [R, Q]``, with two compile-time options:

* ``MASK_B``: ``B`` is a weight read through a transposed or plain view and a bool mask tensor
  with the same strides rides along; every ``B`` tile is multiplied by its mask tile in
  registers (``b * m``, a multiplication as the reference's ``weight * mask``, so a NaN weight
  gives NaN even where masked), so ``W * M`` is never written to global memory;
* ``EPILOGUE``: 0 stores ``C`` (+ bias), 1 is the weight-gradient epilogue: ``C = G =
  dL/dW_eff`` is rounded to the output dtype and the kernel stores ``grad_scores = (G * W) *
  sign(S)`` and, when asked, ``grad_weight = G * M`` (the products in autograd's order, in the
  output dtype) instead of ``G``.

The three uses (``x2 = x.reshape(-1, in)``, ``g2 = grad_y.reshape(-1, out)``):

* forward:   ``A = x2 [T, in]``,    ``B = W^T [in, out]`` masked,  ``C = y [T, out]`` (+ bias);
* grad_x:    ``A = g2 [T, out]``,   ``B = W [out, in]`` masked,    ``C = grad_x [T, in]``;
* grad_W:    ``A = g2^T [out, T]``, ``B = x2 [T, in]``,  epilogue 1 on ``[out, in]``.

Accumulation is float32 (float64 for float64 inputs). float32 inputs use TF32 tensor cores only
where torch allows it for its own matmuls (``torch.backends.cuda.matmul.allow_tf32``), else IEEE
float32, like cuBLAS in torch.
Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) one small configuration runs;
bfloat16 needs a GPU (the interpreter has no bfloat16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._matmul_common import INTERPRET, grouped_tile, matmul_configs, precision_for, rows_2d

__all__ = ["masked_linear_forward", "masked_linear_backward", "masked_matmul",
           "masked_weight_grads", "materialized_linear_backward"]

@triton.jit
def _mac_step(acc, a_ptr, b_ptr, m_ptr, offs_m, offs_n, offs_k, in_m, in_n, k0, R,
              stride_ap, stride_ar, stride_br, stride_bq, stride_mr, stride_mq,
              MASK_B: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += A[rows, k0:k0+BK] @ (B * M)[k0:k0+BK, cols]`` (the mask applied in registers)."""
    kk = k0 + offs_k
    in_k = kk < R
    a = tl.load(a_ptr + offs_m[:, None] * stride_ap + kk[None, :] * stride_ar,
                mask=in_m[:, None] & in_k[None, :], other=0.0)
    tile = in_k[:, None] & in_n[None, :]
    b = tl.load(b_ptr + kk[:, None] * stride_br + offs_n[None, :] * stride_bq, mask=tile,
                other=0.0)
    if MASK_B:
        keep = tl.load(m_ptr + kk[:, None] * stride_mr + offs_n[None, :] * stride_mq, mask=tile,
                       other=0)
        b = b * keep.to(b.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _store_weight_grads(g, w_ptr, s_ptr, mk_ptr, gs_ptr, gw_ptr, off, inside,
                        WITH_S: tl.constexpr, WITH_GW: tl.constexpr):
    """From ``G`` (the output dtype) at offsets ``off``: ``gs = (G * W) * sign(S)`` (sign 0 for
    +-0 and NaN, as torch.sign) and ``gw = G * M``: autograd's products, in its order."""
    if WITH_S:
        w = tl.load(w_ptr + off, mask=inside, other=0.0)
        s = tl.load(s_ptr + off, mask=inside, other=0.0)
        sgn = ((s > 0).to(tl.int8) - (s < 0).to(tl.int8)).to(g.dtype)
        tl.store(gs_ptr + off, (g * w) * sgn, mask=inside)
    if WITH_GW:
        keep = tl.load(mk_ptr + off, mask=inside, other=0)
        tl.store(gw_ptr + off, g * keep.to(g.dtype), mask=inside)


@triton.autotune(configs=matmul_configs(), key=["P", "Q", "R", "MASK_B", "EPILOGUE", "WITH_GW"],
                 reset_to_zero=None)
@triton.jit
def _masked_matmul_kernel(
    a_ptr, b_ptr, m_ptr, c_ptr, bias_ptr, w_ptr, s_ptr, mk_ptr, gw_ptr,
    P, Q, R,
    stride_ap, stride_ar, stride_br, stride_bq, stride_mr, stride_mq, stride_cp, stride_cq,
    MASK_B: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, WITH_GW: tl.constexpr,
    PRECISION: tl.constexpr, ACC_F64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering of the output tiles (tutorial): GROUP_M tile rows share B tiles in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), P, Q, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    in_m = offs_m < P
    in_n = offs_n < Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_F64 else tl.float32)
    if INTERPRET:
        # the interpreter (with numpy >= 2.4) cannot use a run-time int as a range() bound
        k0 = 0
        while k0 < R:
            acc = _mac_step(acc, a_ptr, b_ptr, m_ptr, offs_m, offs_n, offs_k, in_m, in_n, k0, R,
                            stride_ap, stride_ar, stride_br, stride_bq, stride_mr, stride_mq,
                            MASK_B, PRECISION)
            k0 += BLOCK_K
    else:
        for k0 in range(0, R, BLOCK_K):
            acc = _mac_step(acc, a_ptr, b_ptr, m_ptr, offs_m, offs_n, offs_k, in_m, in_n, k0, R,
                            stride_ap, stride_ar, stride_br, stride_bq, stride_mr, stride_mq,
                            MASK_B, PRECISION)

    out_mask = in_m[:, None] & in_n[None, :]
    c_off = offs_m[:, None] * stride_cp + offs_n[None, :] * stride_cq
    if EPILOGUE == 0:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)
            acc += bias.to(acc.dtype)[None, :]
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        # weight-gradient epilogue on [out, in] tiles; W, S, M, outputs share C's strides
        _store_weight_grads(acc.to(c_ptr.dtype.element_ty), w_ptr, s_ptr, mk_ptr, c_ptr, gw_ptr,
                            c_off, out_mask, True, WITH_GW)


def masked_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
                  mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  grads_of: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  grad_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out = a @ (b * mask) (+ bias)``, or the weight-gradient epilogue (see the module doc).

    ``a [P, R]``, ``b [R, Q]`` and ``mask`` (bool, ``b``'s shape and strides) may be strided
    views; ``out [P, Q]`` is written in place. ``grads_of = (weight, scores, mask)`` (contiguous,
    ``out``'s shape) switches to epilogue 1: ``out = (G * W) * sign(S)`` and, when
    ``grad_weight`` is given, ``grad_weight = G * M``.
    """
    P, R = a.shape
    Q = b.shape[1]
    if P == 0 or Q == 0:
        return out
    if R == 0:  # empty reduction: C = 0 (+ bias)
        if grads_of is None:
            out.copy_(bias.expand(P, Q) if bias is not None else out.new_zeros(()).expand(P, Q))
        else:
            out.zero_()
            if grad_weight is not None:
                grad_weight.zero_()
        return out
    mask_u8 = mask.view(torch.uint8) if mask is not None else b
    epilogue = 0 if grads_of is None else 1
    w, s, mk = grads_of if grads_of is not None else (out, out, out)
    mk = mk.view(torch.uint8) if grads_of is not None else mk
    gw = grad_weight if grad_weight is not None else out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]),)

    _masked_matmul_kernel[grid](
        a, b, mask_u8, out, bias if bias is not None else out, w, s, mk, gw,
        P, Q, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), mask_u8.stride(0), mask_u8.stride(1),
        out.stride(0), out.stride(1),
        MASK_B=mask is not None, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
        WITH_GW=grad_weight is not None, PRECISION=precision_for(a.dtype),
        ACC_F64=a.dtype == torch.float64, INTERPRET=INTERPRET,
    )
    return out


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (W * M)^T + b`` for ``x [..., in]``, ``W``/``M`` ``[out, in]`` (mask bool)."""
    out_features, in_features = weight.shape
    x2 = rows_2d(x)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    masked_matmul(x2, weight.t(), y, mask=mask.t(), bias=bias)
    return y.view(*x.shape[:-1], out_features)


def masked_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           scores: torch.Tensor, mask: torch.Tensor,
                           output_mask: tuple[bool, bool, bool]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_scores, grad_weight)``; a gradient not asked for is an empty tensor.

    ``grad_x = grad_y @ (W * M)``; ``G = grad_y^T @ x``; ``grad_scores = (G * W) * sign(S)``;
    ``grad_weight = G * M``.
    """
    need_x, need_s, need_w = output_mask
    out_features, in_features = weight.shape
    g2 = rows_2d(grad_y)
    x2 = rows_2d(x)
    empty = weight.new_empty((0,))
    grad_x = grad_scores = grad_weight = empty
    if need_x:
        gx = torch.empty((g2.shape[0], in_features), dtype=x.dtype, device=x.device)
        masked_matmul(g2, weight, gx, mask=mask)
        grad_x = gx.view(x.shape)
    if need_s or need_w:
        w = weight.contiguous()
        s = scores.contiguous()
        m = mask.contiguous()
        gs = torch.empty_like(w)
        gw = torch.empty_like(w) if need_w else None
        masked_matmul(g2.t(), x2, gs, grads_of=(w, s, m), grad_weight=gw)
        grad_scores = gs if need_s else empty
        grad_weight = gw if need_w else empty
    return grad_x, grad_scores, grad_weight


# --------------------------------------------------------------------------------------------
# The materialize strategy (subkern/ops/matmul_strategy.py): W * M by an elementwise pass,
# torch's GEMMs, the weight-gradient epilogue as one elementwise pass over G
# --------------------------------------------------------------------------------------------

@triton.jit
def _masked_weight_grads_kernel(g_ptr, w_ptr, s_ptr, mk_ptr, gs_ptr, gw_ptr, n,
                                WITH_S: tl.constexpr, WITH_GW: tl.constexpr,
                                BLOCK: tl.constexpr):
    """The matmul kernel's weight-gradient epilogue as one elementwise pass over contiguous
    tensors of ``n`` elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    _store_weight_grads(g, w_ptr, s_ptr, mk_ptr, gs_ptr, gw_ptr, offs, inside, WITH_S, WITH_GW)


_ELEMENTWISE_BLOCK = 256 if INTERPRET else 2048


def masked_weight_grads(grad_weff: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                        mask: torch.Tensor, need_scores: bool, need_weight: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_scores, grad_weight)`` from ``G = dL/dW_eff`` in one pass: ``(G * W) * sign(S)``
    and ``G * M`` (an empty tensor for a gradient not asked for)."""
    g = grad_weff.contiguous()
    empty = weight.new_empty((0,))
    gs = torch.empty_like(g) if need_scores else empty
    gw = torch.empty_like(g) if need_weight else empty
    n = g.numel()
    if n and (need_scores or need_weight):
        w = weight.contiguous() if need_scores else g
        s = scores.contiguous() if need_scores else g
        mk = mask.contiguous().view(torch.uint8) if need_weight else g
        _masked_weight_grads_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
            g, w, s, mk, gs if need_scores else g, gw if need_weight else g, n,
            WITH_S=need_scores, WITH_GW=need_weight, BLOCK=_ELEMENTWISE_BLOCK)
    return gs, gw


def materialized_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 scores: torch.Tensor, mask: torch.Tensor,
                                 output_mask: tuple[bool, bool, bool]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`masked_linear_backward` with ``W * M`` materialized and torch's GEMMs (cuBLAS):
    ``grad_x = grad_y @ (W * M)``, ``G = grad_y^T @ x``, then :func:`masked_weight_grads`."""
    need_x, need_s, need_w = output_mask
    g2 = rows_2d(grad_y)
    empty = weight.new_empty((0,))
    grad_x = empty
    if need_x:
        grad_x = torch.mm(g2, weight * mask).view(x.shape)
    if not (need_s or need_w):
        return grad_x, empty, empty
    grad_weff = torch.mm(g2.t(), rows_2d(x))
    grad_scores, grad_weight = masked_weight_grads(grad_weff, weight, scores, mask, need_s, need_w)
    return grad_x, grad_scores, grad_weight
