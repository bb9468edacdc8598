"""Triton kernels of STR's soft-threshold linear layer: ``y = x W_eff^T + b`` and its backward.

``W_eff = sign(W) * relu(|W| - g)`` with ``g = sigmoid(s)`` per layer or per output channel
(STR, Kusupati et al., 2020). One tiled matmul kernel (the Triton matmul tutorial's blocking:
``BLOCK_M x BLOCK_N`` output tiles, a ``BLOCK_K`` reduction loop, grouped tile order for L2
reuse) computes ``C = A @ B`` for strided ``A [P, R]``, ``B [R, Q]`` with two compile-time
options:

* ``THRESH_B``: ``B`` is the weight read through a transposed (1: the threshold of column ``q``
  is ``g[q]``) or plain (2: the threshold of row ``r`` is ``g[r]``) view; every ``B`` tile is
  soft-thresholded in registers (in float32, float64 for float64, then rounded to the input
  dtype, as the reference), so ``W_eff`` is never written to global memory;
* ``EPILOGUE``: 0 stores ``C`` (+ bias); 1 is the weight-gradient epilogue on ``[out, in]``
  tiles: ``G = C`` is rounded to the weight's dtype, ``keep = |W| > g[row]``, the kernel stores
  ``grad_weight = keep ? G : 0`` (when asked) and the tile's per-row sums of
  ``keep ? G * sign(W) : 0`` into its own slot of a partial-sum buffer
  ``[cdiv(in, min BLOCK_N), out]`` (no atomics: deterministic); ``grad_s = -g (1 - g)`` times
  those sums (summed over the layer for a per-layer ``s``) is finished in torch.

Two elementwise kernels serve the conv layer and the standalone ``soft_threshold`` op on the
GPU (the convolution itself is cuDNN's): ``soft_threshold_forward`` (``W_eff`` in one pass) and
``soft_threshold_grads`` (``grad_weight`` and the per-block partial sums of ``grad_s`` in one pass
over ``G`` and ``W``).

The three uses of the matmul (``x2 = x.reshape(-1, in)``, ``g2 = grad_y.reshape(-1, out)``):

* forward:   ``A = x2 [T, in]``,    ``B = W^T [in, out]`` thresholded per column, ``C = y``;
* grad_x:    ``A = g2 [T, out]``,   ``B = W [out, in]`` thresholded per row,    ``C = grad_x``;
* grad_W:    ``A = g2^T [out, T]``, ``B = x2 [T, in]``, epilogue 1 on ``[out, in]``.

Accumulation is float32 (float64 for float64 inputs); float32 inputs use TF32 tensor cores only
where torch allows it for its own matmuls (``torch.backends.cuda.matmul.allow_tf32``). Under the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) one small configuration runs; bfloat16
needs a GPU (the interpreter has no bfloat16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._matmul_common import INTERPRET, grouped_tile, matmul_configs, precision_for, rows_2d

__all__ = ["soft_threshold_linear_forward", "soft_threshold_linear_backward",
           "soft_threshold_matmul", "soft_threshold_forward", "soft_threshold_grads",
           "materialized_linear_backward"]

_CONFIGS = matmul_configs()
#: slots of the partial-sum buffer are per BLOCK_N columns of the smallest configuration
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _CONFIGS)


@triton.jit
def _soft(b, t):
    """``sign(b) * relu(|b| - t)`` in ``t``'s dtype (a NaN stays NaN)."""
    bf = b.to(t.dtype)
    d = tl.abs(bf) - t
    m = tl.where(d <= 0, 0.0, d)
    return tl.where(bf < 0, -m, m)


@triton.jit
def _mac_step(acc, a_ptr, b_ptr, t_ptr, offs_m, offs_n, offs_k, in_m, in_n, k0, R,
              stride_ap, stride_ar, stride_br, stride_bq, stride_t,
              THRESH_B: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += A[rows, k0:k0+BK] @ soft(B)[k0:k0+BK, cols]`` (the threshold in registers)."""
    kk = k0 + offs_k
    in_k = kk < R
    a = tl.load(a_ptr + offs_m[:, None] * stride_ap + kk[None, :] * stride_ar,
                mask=in_m[:, None] & in_k[None, :], other=0.0)
    tile = in_k[:, None] & in_n[None, :]
    b = tl.load(b_ptr + kk[:, None] * stride_br + offs_n[None, :] * stride_bq, mask=tile,
                other=0.0)
    if THRESH_B == 1:    # the threshold of output column q (B = W^T)
        t = tl.load(t_ptr + offs_n * stride_t, mask=in_n, other=0.0)
        b = _soft(b, t[None, :]).to(b.dtype)
    elif THRESH_B == 2:  # the threshold of reduction row r (B = W)
        t = tl.load(t_ptr + kk * stride_t, mask=in_k, other=0.0)
        b = _soft(b, t[:, None]).to(b.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.autotune(configs=_CONFIGS, key=["P", "Q", "R", "THRESH_B", "EPILOGUE", "WITH_GW"],
                 reset_to_zero=["part_ptr"])
@triton.jit
def _soft_threshold_matmul_kernel(
    a_ptr, b_ptr, t_ptr, c_ptr, bias_ptr, w_ptr, part_ptr,
    P, Q, R,
    stride_ap, stride_ar, stride_br, stride_bq, stride_t, stride_cp, stride_cq,
    THRESH_B: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
    WITH_GW: tl.constexpr, WITH_S: tl.constexpr, MIN_BLOCK_N: tl.constexpr,
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
            acc = _mac_step(acc, a_ptr, b_ptr, t_ptr, offs_m, offs_n, offs_k, in_m, in_n, k0, R,
                            stride_ap, stride_ar, stride_br, stride_bq, stride_t,
                            THRESH_B, PRECISION)
            k0 += BLOCK_K
    else:
        for k0 in range(0, R, BLOCK_K):
            acc = _mac_step(acc, a_ptr, b_ptr, t_ptr, offs_m, offs_n, offs_k, in_m, in_n, k0, R,
                            stride_ap, stride_ar, stride_br, stride_bq, stride_t,
                            THRESH_B, PRECISION)

    out_mask = in_m[:, None] & in_n[None, :]
    c_off = offs_m[:, None] * stride_cp + offs_n[None, :] * stride_cq
    if EPILOGUE == 0:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)
            acc += bias.to(acc.dtype)[None, :]
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        # weight-gradient epilogue on [out, in] tiles; W and grad_weight share C's strides
        g = acc.to(c_ptr.dtype.element_ty)
        w = tl.load(w_ptr + c_off, mask=out_mask, other=0.0)
        t = tl.load(t_ptr + offs_m * stride_t, mask=in_m, other=0.0)
        wf = w.to(t.dtype)
        keep = (tl.abs(wf) > t[:, None]) & out_mask
        if WITH_GW:
            tl.store(c_ptr + c_off, tl.where(keep, g, 0.0), mask=out_mask)
        if WITH_S:
            gf = g.to(t.dtype)
            signed = tl.where(wf < 0, -gf, gf)
            row = tl.sum(tl.where(keep, signed, 0.0), axis=1)
            slot = pid_n * (BLOCK_N // MIN_BLOCK_N)
            tl.store(part_ptr + slot * P + offs_m, row, mask=in_m)


@triton.jit
def _soft_threshold_rows_kernel(w_ptr, t_ptr, out_ptr, rows, cols, stride_t,
                                BLOCK: tl.constexpr):
    """``out = soft(W)`` over a contiguous ``[rows, cols]`` view, one column block per program."""
    pid = tl.program_id(0)
    nb = tl.cdiv(cols, BLOCK)
    r = (pid // nb).to(tl.int64)
    offs = (pid % nb) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < cols
    w = tl.load(w_ptr + r * cols + offs, mask=inside, other=0.0)
    t = tl.load(t_ptr + r * stride_t)
    tl.store(out_ptr + r * cols + offs, _soft(w, t).to(w.dtype), mask=inside)


@triton.jit
def _soft_threshold_grads_kernel(g_ptr, w_ptr, t_ptr, gw_ptr, part_ptr, rows, cols, stride_t,
                                 WITH_GW: tl.constexpr, WITH_S: tl.constexpr,
                                 BLOCK: tl.constexpr):
    """One pass over ``G`` and ``W`` (contiguous ``[rows, cols]``): ``grad_weight = keep ? G :
    0`` and the block's sum of ``keep ? G * sign(W) : 0`` into ``part[block, row]``."""
    pid = tl.program_id(0)
    nb = tl.cdiv(cols, BLOCK)
    r = (pid // nb).to(tl.int64)
    cb = pid % nb
    offs = cb * BLOCK + tl.arange(0, BLOCK)
    inside = offs < cols
    t = tl.load(t_ptr + r * stride_t)
    g = tl.load(g_ptr + r * cols + offs, mask=inside, other=0.0)
    w = tl.load(w_ptr + r * cols + offs, mask=inside, other=0.0)
    wf = w.to(t.dtype)
    keep = (tl.abs(wf) > t) & inside
    if WITH_GW:
        tl.store(gw_ptr + r * cols + offs, tl.where(keep, g, 0.0), mask=inside)
    if WITH_S:
        gf = g.to(t.dtype)
        signed = tl.where(wf < 0, -gf, gf)
        tl.store(part_ptr + cb * rows + r, tl.sum(tl.where(keep, signed, 0.0), axis=0))


_ELEMENTWISE_BLOCK = 256 if INTERPRET else 1024


def soft_threshold_forward(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W_eff = sign(W) relu(|W| - sigmoid(s))`` (a fresh contiguous tensor), one pass."""
    w = weight.contiguous()
    out = torch.empty_like(w)
    rows = w.shape[0]
    cols = w.numel() // rows if rows else 0
    if w.numel() == 0:
        return out
    thr = torch.sigmoid(s.to(_compute_dtype(w.dtype))).reshape(-1).contiguous()
    grid = (rows * triton.cdiv(cols, _ELEMENTWISE_BLOCK),)
    _soft_threshold_rows_kernel[grid](w, thr, out, rows, cols, 0 if thr.numel() == 1 else 1,
                                      BLOCK=_ELEMENTWISE_BLOCK)
    return out


def soft_threshold_grads(grad_weff: torch.Tensor, weight: torch.Tensor, s: torch.Tensor,
                         need_weight: bool, need_s: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_weight, grad_s)`` from ``G = dL/dW_eff`` in one pass (an empty tensor for a
    gradient not asked for): ``G * 1[|W| > g]`` and ``-g'(s) sum(G sign(W) 1[|W| > g])``."""
    w = weight.contiguous()
    g = grad_weff.contiguous()
    acc = _compute_dtype(w.dtype)
    rows = w.shape[0]
    cols = w.numel() // rows if rows else 0
    thr = torch.sigmoid(s.to(acc)).reshape(-1).contiguous()
    nb = triton.cdiv(cols, _ELEMENTWISE_BLOCK) if cols else 0
    gw = torch.empty_like(w) if need_weight else w.new_empty((0,))
    partial = torch.zeros((nb, rows), dtype=acc, device=w.device) if need_s else None
    if w.numel() and (need_weight or need_s):
        _soft_threshold_grads_kernel[(rows * nb,)](
            g, w, thr, gw if need_weight else w, partial if need_s else thr, rows, cols,
            0 if thr.numel() == 1 else 1, WITH_GW=need_weight, WITH_S=need_s,
            BLOCK=_ELEMENTWISE_BLOCK)
    if not need_s:
        return gw, s.new_empty((0,))
    per_row = partial.sum(0)
    total = per_row.sum() if s.numel() == 1 else per_row
    grad_s = (-total * (thr * (1 - thr))).to(s.dtype).reshape(s.shape)
    return gw, grad_s


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def soft_threshold_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
                          thresholds: torch.Tensor | None = None, thresh_axis: int = 0,
                          bias: torch.Tensor | None = None,
                          grads_of: torch.Tensor | None = None, with_grad_weight: bool = True,
                          partial: torch.Tensor | None = None) -> torch.Tensor:
    """``out = a @ soft(b) (+ bias)``, or the weight-gradient epilogue (see the module doc).

    ``a [P, R]`` and ``b [R, Q]`` may be strided views; ``out [P, Q]`` is written in place.
    ``thresholds``: 1-D, compute dtype, one element (stride 0 broadcast) or one per row
    (``thresh_axis=0``: ``b``'s rows) / column (``thresh_axis=1``) of ``b``; None: plain matmul.
    ``grads_of = weight`` (``out``'s shape and strides) switches to epilogue 1 with the
    thresholds per row of ``out``: ``out = grad_weight`` (when ``with_grad_weight``) and
    ``partial [cdiv(Q, _MIN_BLOCK_N), P]`` (zeros, compute dtype) receives the row sums.
    """
    P, R = a.shape
    Q = b.shape[1]
    if P == 0 or Q == 0:
        return out
    epilogue = 0 if grads_of is None else 1
    if R == 0:  # empty reduction: C = 0 (+ bias); G = 0 gives zero gradients
        if epilogue == 0:
            out.copy_(bias.expand(P, Q) if bias is not None else out.new_zeros(()).expand(P, Q))
        elif with_grad_weight:
            out.zero_()
        return out
    t = thresholds if thresholds is not None else out
    stride_t = 0 if thresholds is None or thresholds.numel() == 1 else thresholds.stride(0)
    thresh_b = 0 if thresholds is None or epilogue == 1 else (2 if thresh_axis == 0 else 1)
    w = grads_of if grads_of is not None else out
    part = partial if partial is not None else out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]),)

    _soft_threshold_matmul_kernel[grid](
        a, b, t, out, bias if bias is not None else out, w, part,
        P, Q, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_t,
        out.stride(0), out.stride(1),
        THRESH_B=thresh_b, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
        WITH_GW=epilogue == 1 and with_grad_weight, WITH_S=partial is not None,
        MIN_BLOCK_N=_MIN_BLOCK_N, PRECISION=precision_for(a.dtype),
        ACC_F64=a.dtype == torch.float64, INTERPRET=INTERPRET,
    )
    return out


def soft_threshold_linear_forward(x: torch.Tensor, weight: torch.Tensor,
                                  thresholds: torch.Tensor,
                                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ soft(W)^T + b`` for ``x [..., in]``, ``W [out, in]``.

    ``thresholds``: ``sigmoid(s)`` flattened, in the compute dtype (float32, float64 for
    float64 weights), one element or ``out``.
    """
    out_features = weight.shape[0]
    x2 = rows_2d(x)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    soft_threshold_matmul(x2, weight.t(), y, thresholds=thresholds.contiguous(), thresh_axis=1,
                          bias=bias)
    return y.view(*x.shape[:-1], out_features)


def soft_threshold_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                   s: torch.Tensor, output_mask: tuple[bool, bool, bool]
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_s)``; a gradient not asked for is an empty tensor.

    ``grad_x = grad_y @ W_eff``; ``G = grad_y^T @ x``; ``grad_weight = G * 1[|W| > g]``;
    ``grad_s = -g'(s) sum(G sign(W) 1[|W| > g])`` (per layer or per output channel).
    """
    need_x, need_w, need_s = output_mask
    out_features, in_features = weight.shape
    acc = _compute_dtype(weight.dtype)
    per_layer = s.numel() == 1
    thr = torch.sigmoid(s.to(acc)).reshape(-1).contiguous()
    g2 = rows_2d(grad_y)
    x2 = rows_2d(x)
    grad_x = x.new_empty((0,))
    grad_w = weight.new_empty((0,))
    grad_s = s.new_empty((0,))
    if need_x:
        gx = torch.empty((g2.shape[0], in_features), dtype=x.dtype, device=x.device)
        soft_threshold_matmul(g2, weight, gx, thresholds=thr, thresh_axis=0)
        grad_x = gx.view(x.shape)
    if need_w or need_s:
        w = weight.contiguous()
        gw = torch.empty_like(w)
        partial = (torch.zeros((triton.cdiv(in_features, _MIN_BLOCK_N), out_features),
                               dtype=acc, device=w.device) if need_s else None)
        soft_threshold_matmul(g2.t(), x2, gw, thresholds=thr, grads_of=w,
                              with_grad_weight=need_w, partial=partial)
        if need_w:
            grad_w = gw
        if need_s:
            total = partial.sum() if per_layer else partial.sum(0)
            grad_s = (-total * (thr * (1 - thr))).to(s.dtype).reshape(s.shape)
    return grad_x, grad_w, grad_s


def materialized_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 s: torch.Tensor, output_mask: tuple[bool, bool, bool]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`soft_threshold_linear_backward` with ``W_eff`` materialized and torch's GEMMs
    (cuBLAS; subkern/ops/matmul_strategy.py): ``grad_x = grad_y @ W_eff`` (``W_eff`` rebuilt by
    one elementwise pass), ``G = grad_y^T @ x``, then :func:`soft_threshold_grads` (one pass)."""
    need_x, need_w, need_s = output_mask
    g2 = rows_2d(grad_y)
    grad_x = x.new_empty((0,))
    if need_x:
        grad_x = torch.mm(g2, soft_threshold_forward(weight, s)).view(x.shape)
    if not (need_w or need_s):
        return grad_x, weight.new_empty((0,)), s.new_empty((0,))
    grad_weff = torch.mm(g2.t(), rows_2d(x))
    grad_w, grad_s = soft_threshold_grads(grad_weff, weight, s, need_w, need_s)
    return grad_x, grad_w, grad_s
