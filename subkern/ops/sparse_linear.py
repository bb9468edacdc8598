"""Sparse-weight x dense-activation products for deploying unstructured-sparse (e.g. STR) layers.

STR (Kusupati et al., 2020, "Soft Threshold Weight Reparameterization for Learnable Sparsity";
../shared/METHODS.md section 2) trains layers that are 80-99 % zeros with a non-uniform per-layer
budget. At inference the weight is frozen, so it is stored once in a compressed format and every
call multiplies it with a dense activation.

Formats (the contract shared by every backend and by the deployment format)
---------------------------------------------------------------------------
A weight ``W [out_features, in_features]`` with ``nnz`` nonzeros is stored as

* **CSR**: ``row_ptr`` int64 ``[out + 1]`` (``row_ptr[0] = 0``, non-decreasing, ``row_ptr[out] =
  nnz``), ``col_idx`` ``[nnz]`` (the columns of row ``o`` are ``col_idx[row_ptr[o]:row_ptr[o+1]]``,
  sorted ascending) and ``values [nnz]`` (float32, bfloat16 or float16). ``col_idx`` is ``int16``
  holding the column as an *unsigned* 16-bit pattern (column ``c`` is stored as ``c - 65536`` when
  ``c >= 32768``; allowed only when ``in_features <= 65536``: 6 bytes per nonzero with fp32 values,
  4 with bf16) or ``int32``.
* **bitmap + values**: ``bitmap`` int64 ``[out, ceil(in / 64)]`` where bit ``i`` of row ``o`` is
  bit ``i % 64`` (least significant first) of word ``i // 64`` and is 1 where ``W[o, i] != 0``
  (the layout of :mod:`subkern.ops.ternary`; padding bits past ``in_features`` are zero);
  ``row_ptr`` int64 ``[out + 1]`` offsets into ``values``; ``values [nnz]`` the nonzeros of each
  row in column order. ``in / 8`` bytes per row plus 4 (fp32) or 2 (bf16) bytes per nonzero: the
  smaller format at moderate sparsity (densities above about 6 %).

Ops
---
``subkern::csr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int in_features,
Tensor? bias) -> Tensor``::

    y[b, o] = sum_{j = row_ptr[o]}^{row_ptr[o+1] - 1} values[j] * x[b, col_idx[j]]  (+ bias[o])

``x [B, in_features]`` float32/bfloat16/float16 (``B`` may be 0); ``values`` may have another
float dtype than ``x``; the output is ``[B, out]`` in ``x``'s dtype, accumulated in float32.

``subkern::csr_matmul(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor X, int in_features,
Tensor? bias=None, bool relu=False) -> Tensor``: ``Y[o, n] = sum_j values[j] * X[col_idx[j], n]
(+ bias[o])``, then ``max(Y, 0)`` when ``relu``, with ``X [in_features, N]`` and ``Y [out, N]``
(weight-stationary SpMM: the convolution path ``Y = W_sparse @ im2col(x)``; the optional epilogue
is a convolution's bias, e.g. a folded BatchNorm, and its following ReLU, fused into the store).

``subkern::bitmap_linear(Tensor x, Tensor bitmap, Tensor row_ptr, Tensor values, int
in_features, Tensor? bias) -> Tensor``: the same product as ``csr_linear`` from the bitmap format.

Gradients are defined for ``x`` / ``X`` and ``bias`` only (the weights are frozen at inference):
``grad_x = grad_y @ W`` (``csr_matmul``: ``grad_X = W^T @ (grad_Y * [Y > 0 if relu])``),
computed through the dense matrix. Implementations: the torch reference (densify, then
``F.linear`` in float32), C++ CPU (``csrc/cpu/sparse_linear.cpp``: AVX-512 / AVX2 / portable),
Triton (``kernels/sparse_linear.py``) and CUDA C++ for the memory-bound small-batch
``csr_linear`` (``csrc/cuda/sparse_linear.cu``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ._direct import direct_first, run_op
from .library import LIB, has_kernel, qualname
from .ternary import WORD_BITS, pack_rows, unpack_rows, words_for

__all__ = [
    "SUPPORTED_BACKENDS",
    "MATMUL_BACKENDS",
    "BITMAP_BACKENDS",
    "pack_csr",
    "unpack_csr",
    "pack_bitmap",
    "unpack_bitmap",
    "choose_format",
    "csr_linear",
    "csr_matmul",
    "bitmap_linear",
    "reference_csr_linear",
    "reference_csr_matmul",
    "reference_bitmap_linear",
]

#: Backends of csr_linear; csr_matmul and bitmap_linear have no CUDA C++ kernel (Triton on GPU).
SUPPORTED_BACKENDS = ("reference", "cpp", "triton", "cuda")
MATMUL_BACKENDS = ("reference", "cpp", "triton")
BITMAP_BACKENDS = ("reference", "cpp", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int16, torch.int32)
#: Largest in_features whose columns fit an unsigned 16-bit index.
MAX_INT16_COLUMNS = 1 << 16

LIB.define("csr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, "
           "int in_features, Tensor? bias) -> Tensor")
LIB.define("csr_matmul(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor X, "
           "int in_features, Tensor? bias=None, bool relu=False) -> Tensor")
LIB.define("bitmap_linear(Tensor x, Tensor bitmap, Tensor row_ptr, Tensor values, "
           "int in_features, Tensor? bias) -> Tensor")


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------

def _check_weight(weight: object) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError("weight must be a floating-point torch.Tensor [out_features, "
                        "in_features]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got "
                         f"{tuple(weight.shape)}")
    return weight.detach()


def _check_value_dtype(value_dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    dtype = default if value_dtype is None else value_dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"value_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def _row_ptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    row_ptr = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.to(torch.int64), 0, out=row_ptr[1:])
    return row_ptr


def columns_of(col_idx: torch.Tensor) -> torch.Tensor:
    """The columns of ``col_idx`` as int64 (int16 indices read as unsigned 16-bit patterns)."""
    cols = col_idx.to(torch.int64)
    if col_idx.dtype == torch.int16:
        cols = cols & 0xFFFF
    return cols


def pack_csr(weight: torch.Tensor, index_dtype: torch.dtype | None = None,
             value_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CSR of ``weight [out, in]``: ``{"row_ptr", "col_idx", "values"}`` (module docstring).

    ``index_dtype``: ``torch.int16`` (unsigned 16-bit columns; needs ``in <= 65536``) or
    ``torch.int32``; None picks int16 when it fits. ``value_dtype``: float32/bfloat16/float16,
    None keeps ``weight``'s dtype. Only exact zeros are dropped; a weight that rounds to zero in
    ``value_dtype`` is kept (as 0), so the pattern does not depend on the value dtype.
    """
    w = _check_weight(weight)
    out, inp = w.shape
    if index_dtype is None:
        index_dtype = torch.int16 if inp <= MAX_INT16_COLUMNS else torch.int32
    if index_dtype not in _INDEX_DTYPES:
        raise TypeError(f"index_dtype must be torch.int16 or torch.int32, got {index_dtype}")
    if index_dtype == torch.int16 and inp > MAX_INT16_COLUMNS:
        raise ValueError(f"int16 column indices need in_features <= {MAX_INT16_COLUMNS}, got "
                         f"{inp}; use index_dtype=torch.int32")
    if inp > 2**31 - 1:
        raise ValueError(f"in_features {inp} does not fit int32 column indices")
    vdtype = _check_value_dtype(value_dtype, w.dtype if w.dtype in _FLOAT_DTYPES
                                else torch.float32)
    nz = w != 0
    rows, cols = nz.nonzero(as_tuple=True)                       # row-major: sorted per row
    values = w[rows, cols].to(vdtype)
    col_idx = cols.to(torch.int32)
    if index_dtype == torch.int16:
        col_idx = (cols - (cols >= 32768).to(torch.int64) * 65536).to(torch.int16)
    return {"row_ptr": _row_ptr_from_counts(nz.sum(1)), "col_idx": col_idx.contiguous(),
            "values": values.contiguous()}


def unpack_csr(tensors: dict[str, torch.Tensor], shape: tuple[int, int] | torch.Size,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``[out, in]`` matrix of a CSR dict (exact inverse of :func:`pack_csr`)."""
    row_ptr, col_idx, values = tensors["row_ptr"], tensors["col_idx"], tensors["values"]
    out, inp = (int(s) for s in shape)
    return _densify_csr(row_ptr, col_idx, values, out, inp,
                        values.dtype if dtype is None else dtype)


def _row_ids(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    counts = row_ptr[1:] - row_ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=row_ptr.device), counts,
                                   output_size=nnz)


def _densify_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, out: int,
                 inp: int, dtype: torch.dtype, validate: bool = True) -> torch.Tensor:
    """Dense ``[out, inp]`` of a CSR weight. ``validate=False`` (backward: the forward already
    checked the structure) skips the data-dependent checks so that the function traces."""
    w = torch.zeros((out, inp), dtype=dtype, device=values.device)
    nnz = values.shape[0]
    if not validate:
        rows = _row_ids(row_ptr, nnz)
        w.index_put_((rows, columns_of(col_idx)), values.to(dtype), accumulate=True)
        return w
    _check_structure(row_ptr, nnz)
    if nnz == 0:
        return w
    rows = _row_ids(row_ptr, nnz)
    cols = columns_of(col_idx)
    if int(cols.min()) < 0 or int(cols.max()) >= inp:
        raise ValueError(f"col_idx holds columns in [{int(cols.min())}, {int(cols.max())}] but "
                         f"in_features is {inp} (corrupt sparse weight)")
    w.index_put_((rows, cols), values.to(dtype), accumulate=True)
    return w


def _check_structure(row_ptr: torch.Tensor, nnz: int) -> None:
    """row_ptr starts at 0, never decreases and ends at nnz (ValueError naming the fault)."""
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz:
        raise ValueError(f"row_ptr must start at 0 and end at nnz = {nnz}, got "
                         f"{int(row_ptr[0])} .. {int(row_ptr[-1])}")
    if row_ptr.shape[0] > 1 and bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError("row_ptr must be non-decreasing (corrupt sparse weight)")


def pack_bitmap(weight: torch.Tensor, value_dtype: torch.dtype | None = None
                ) -> dict[str, torch.Tensor]:
    """Bitmap + values of ``weight [out, in]``: ``{"bitmap", "row_ptr", "values"}``."""
    w = _check_weight(weight)
    vdtype = _check_value_dtype(value_dtype, w.dtype if w.dtype in _FLOAT_DTYPES
                                else torch.float32)
    nz = w != 0
    return {"bitmap": pack_rows(nz), "row_ptr": _row_ptr_from_counts(nz.sum(1)),
            "values": w[nz].to(vdtype).contiguous()}


def unpack_bitmap(tensors: dict[str, torch.Tensor], shape: tuple[int, int] | torch.Size,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``[out, in]`` matrix of a bitmap dict (exact inverse of :func:`pack_bitmap`)."""
    out, inp = (int(s) for s in shape)
    values = tensors["values"]
    return _densify_bitmap(tensors["bitmap"], values, out, inp,
                           values.dtype if dtype is None else dtype)


def _densify_bitmap(bitmap: torch.Tensor, values: torch.Tensor, out: int, inp: int,
                    dtype: torch.dtype, validate: bool = True) -> torch.Tensor:
    """Dense ``[out, inp]`` of a bitmap weight (``validate=False``: traceable, no checks)."""
    if not validate:
        nz = _unpack_rows_traceable(bitmap, inp).reshape(-1)
        padded = torch.cat([values.to(dtype), values.new_zeros(1, dtype=dtype)])
        nnz = values.shape[0]
        slot = torch.where(nz, torch.cumsum(nz.to(torch.int64), 0) - 1, nnz)
        return padded[slot].reshape(out, inp)
    nz = unpack_rows(bitmap, inp)
    if nz.shape[0] != out:
        raise ValueError(f"bitmap has {nz.shape[0]} rows, expected {out}")
    if int(nz.sum()) != values.shape[0]:
        raise ValueError(f"bitmap has {int(nz.sum())} set bits (within in_features = {inp}) but "
                         f"there are {values.shape[0]} values (corrupt sparse weight)")
    w = torch.zeros((out, inp), dtype=dtype, device=values.device)
    w[nz] = values.to(dtype)
    return w


def _unpack_rows_traceable(words: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``[rows, n]`` of int64 bit words (LSB first) with shape-static torch ops only."""
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1                   # [rows, W, 64]
    return bits.reshape(words.shape[0], -1)[:, :n] != 0


# --------------------------------------------------------------------------------------------
# Format choice (CPU)
# --------------------------------------------------------------------------------------------

#: Break-evens of the CPU kernels (density = nnz / (out * in)) against fp32 ``F.linear``, measured
#: on the development machine (see :func:`choose_format`).
CSR_MAX_DENSITY_SPMV = 0.4          # batch <= 3 (gather SpMV)
CSR_MAX_DENSITY_SMALL_BATCH = 0.45  # batch 4 .. 63 (register-blocked SpMM)
CSR_MAX_DENSITY_LARGE_BATCH = 0.2   # batch >= 64 (dense GEMM near peak FLOPs)
#: Where the bitmap kernel would be chosen, as (min density, max density) at batch <= 3; empty
#: on the measured CPU (see :func:`choose_format`).
BITMAP_DENSITY_WINDOW: tuple[float, float] | None = None


def choose_format(out_features: int, in_features: int, nnz: int, batch_hint: int = 1,
                  value_dtype: torch.dtype = torch.float32) -> str:
    """The format the CPU kernels run fastest for this shape and density: csr, bitmap or dense.

    Break-evens measured on a 2-core Xeon (AVX-512, AMX; layers 3072 x 768 and 4096 x 4096,
    densities 0.05 .. 0.6, batch 1 / 16 / 128, one thread, a loaded machine: rough) with
    ``python3 -c`` timing loops of ``torch.ops.subkern.csr_linear`` / ``bitmap_linear`` against
    ``F.linear`` (the ``subkern bench --ops sparse_linear`` cases are the same kernels):

    * batch <= 3 (SpMV, memory bound): CSR beats dense fp32 up to density ~0.45 (3072 x 768:
      0.19 ms vs 0.34 ms at 0.3, 0.31 vs 0.35 at 0.45, 0.43 vs 0.35 at 0.6) -> ``"csr"`` for
      ``d <= 0.4`` (:data:`CSR_MAX_DENSITY_SPMV`), else ``"dense"``;
    * batch 4 .. 63: CSR (SpMM) wins up to ~0.45 - 0.6 -> ``"csr"`` for ``d <= 0.45``;
    * batch >= 64: dense GEMM is near peak; CSR wins up to ~0.2 - 0.3 -> ``"csr"`` for
      ``d <= 0.2`` (measured before the SpMM's column panels, which made wide layers faster:
      4096 x 11008 at d = 0.1, 128 tokens, 68 -> 35 ms against 91 ms dense; the limit is kept
      on the safe side until re-measured on an idle machine);
    * ``"bitmap"``: its AVX-512 ``vexpandps`` kernel costs ~5 cycles per 16 columns whatever the
      density (0.26 ms for 3072 x 768 at batch 1), so on the measured CPU it never beat both CSR
      and dense (CSR is faster up to d = 0.45, dense above): it is returned only inside
      :data:`BITMAP_DENSITY_WINDOW` (None here). It moves fewer bytes than CSR above ~6 %
      density (``in / 8`` bytes per row + 4 per nonzero vs 6), which can pay where the weights
      stream from DRAM rather than a large L3.

    Empty layers and ``nnz = 0`` give ``"csr"`` (nothing to read). ``value_dtype`` is validated;
    bf16/fp16 values make CSR cheaper still (4 bytes per nonzero), which these rules (set for
    fp32) leave on the safe side.
    """
    for name, v in (("out_features", out_features), ("in_features", in_features),
                    ("nnz", nnz), ("batch_hint", batch_hint)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    total = out_features * in_features
    if nnz > total:
        raise ValueError(f"nnz ({nnz}) exceeds out_features * in_features ({total})")
    _check_value_dtype(value_dtype, torch.float32)
    if total == 0 or nnz == 0:
        return "csr"
    d = nnz / total
    if batch_hint <= 3:
        window = BITMAP_DENSITY_WINDOW
        if window is not None and window[0] <= d <= window[1]:
            return "bitmap"
        limit = CSR_MAX_DENSITY_SPMV
    elif batch_hint < 64:
        limit = CSR_MAX_DENSITY_SMALL_BATCH
    else:
        limit = CSR_MAX_DENSITY_LARGE_BATCH
    return "csr" if d <= limit else "dense"


# --------------------------------------------------------------------------------------------
# Reference, fake, autograd
# --------------------------------------------------------------------------------------------

def reference_csr_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                         values: torch.Tensor, in_features: int, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    """Ground truth: densify the CSR weight in float32, then ``F.linear`` in float32."""
    w = _densify_csr(row_ptr, col_idx, values, row_ptr.shape[0] - 1, in_features, torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


def reference_csr_matmul(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                         X: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                         relu: bool = False) -> torch.Tensor:
    """Ground truth: ``relu?(W @ X + bias[:, None])`` with the densified float32 weight."""
    w = _densify_csr(row_ptr, col_idx, values, row_ptr.shape[0] - 1, in_features, torch.float32)
    y = w @ X.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32).unsqueeze(1)
    if relu:
        y = torch.relu(y)
    return y.to(X.dtype)


def reference_bitmap_linear(x: torch.Tensor, bitmap: torch.Tensor, row_ptr: torch.Tensor,
                            values: torch.Tensor, in_features: int, bias: torch.Tensor | None
                            ) -> torch.Tensor:
    """Ground truth: densify the bitmap weight in float32, then ``F.linear`` in float32."""
    w = _densify_bitmap(bitmap, values, bitmap.shape[0], in_features, torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


LIB.impl("csr_linear", reference_csr_linear, "CompositeExplicitAutograd")
LIB.impl("csr_matmul", reference_csr_matmul, "CompositeExplicitAutograd")
LIB.impl("bitmap_linear", reference_bitmap_linear, "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("csr_linear"))
def _csr_linear_fake(x, row_ptr, col_idx, values, in_features, bias):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [batch, in_features]")
    torch._check(row_ptr.dim() == 1, lambda: "row_ptr must be 1-D [out_features + 1]")
    torch._check(x.shape[1] == in_features, lambda: "x.shape[1] != in_features")
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))


@torch.library.register_fake(qualname("csr_matmul"))
def _csr_matmul_fake(row_ptr, col_idx, values, X, in_features, bias=None, relu=False):
    torch._check(X.dim() == 2, lambda: "X must be 2-D [in_features, N]")
    torch._check(row_ptr.dim() == 1, lambda: "row_ptr must be 1-D [out_features + 1]")
    torch._check(X.shape[0] == in_features, lambda: "X.shape[0] != in_features")
    return X.new_empty((row_ptr.shape[0] - 1, X.shape[1]))


@torch.library.register_fake(qualname("bitmap_linear"))
def _bitmap_linear_fake(x, bitmap, row_ptr, values, in_features, bias):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [batch, in_features]")
    torch._check(bitmap.dim() == 2, lambda: "bitmap must be 2-D [out_features, words]")
    torch._check(x.shape[1] == in_features, lambda: "x.shape[1] != in_features")
    return x.new_empty((x.shape[0], bitmap.shape[0]))


def _setup_linear(ctx, inputs, output) -> None:
    x, a, b, c, in_features, bias = inputs
    ctx.save_for_backward(a, b, c)
    ctx.in_features = in_features
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_grad(ctx, grad: torch.Tensor) -> torch.Tensor | None:
    if ctx.bias_dtype is None:
        return None
    return grad.to(torch.float32).sum(0).to(ctx.bias_dtype)


def _csr_linear_backward(ctx, grad: torch.Tensor):
    row_ptr, col_idx, values = ctx.saved_tensors
    w = _densify_csr(row_ptr, col_idx, values, row_ptr.shape[0] - 1, ctx.in_features,
                     torch.float32, validate=False)
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)           # dy/dx = W
    return grad_x, None, None, None, None, _bias_grad(ctx, grad)


def _bitmap_linear_backward(ctx, grad: torch.Tensor):
    bitmap, row_ptr, values = ctx.saved_tensors
    w = _densify_bitmap(bitmap, values, bitmap.shape[0], ctx.in_features, torch.float32,
                        validate=False)
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    return grad_x, None, None, None, None, _bias_grad(ctx, grad)


def _setup_matmul(ctx, inputs, output) -> None:
    row_ptr, col_idx, values, X, in_features, bias, relu = inputs
    ctx.relu = bool(relu)
    # with the ReLU the output's sign is the gradient mask (Y > 0)
    ctx.save_for_backward(row_ptr, col_idx, values, output if ctx.relu else None)
    ctx.in_features = in_features
    ctx.x_dtype = X.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _csr_matmul_backward(ctx, grad: torch.Tensor):
    row_ptr, col_idx, values, y = ctx.saved_tensors
    g = grad.to(torch.float32)
    if ctx.relu:
        g = torch.where(y > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
    w = _densify_csr(row_ptr, col_idx, values, row_ptr.shape[0] - 1, ctx.in_features,
                     torch.float32, validate=False)
    grad_X = (w.t() @ g).to(ctx.x_dtype)                               # dY/dX = W^T
    grad_b = None if ctx.bias_dtype is None else g.sum(1).to(ctx.bias_dtype)
    return None, None, None, grad_X, None, grad_b, None


torch.library.register_autograd(qualname("csr_linear"), _csr_linear_backward,
                                setup_context=_setup_linear)
torch.library.register_autograd(qualname("bitmap_linear"), _bitmap_linear_backward,
                                setup_context=_setup_linear)
torch.library.register_autograd(qualname("csr_matmul"), _csr_matmul_backward,
                                setup_context=_setup_matmul)


# --------------------------------------------------------------------------------------------
# Triton routing
# --------------------------------------------------------------------------------------------

def _triton_csr_linear(x, row_ptr, col_idx, values, in_features, bias):
    from ..kernels import sparse_linear as tk

    return tk.csr_linear(x, row_ptr, col_idx, values, in_features, bias)


def _triton_csr_matmul(row_ptr, col_idx, values, X, in_features, bias=None, relu=False):
    from ..kernels import sparse_linear as tk

    return tk.csr_matmul(row_ptr, col_idx, values, X, in_features, bias, relu)


def _triton_bitmap_linear(x, bitmap, row_ptr, values, in_features, bias):
    from ..kernels import sparse_linear as tk

    return tk.bitmap_linear(x, bitmap, row_ptr, values, in_features, bias)


def _triton_available() -> bool:
    import importlib.util

    return (_backend.triton_importable()
            and importlib.util.find_spec("subkern.kernels.sparse_linear") is not None)


def register_device_fallbacks() -> None:
    """Route CUDA tensors to Triton where ``_C`` brought no CUDA kernel (call after loading _C)."""
    if not _triton_available():
        return
    for name, fn in (("csr_linear", _triton_csr_linear), ("csr_matmul", _triton_csr_matmul),
                     ("bitmap_linear", _triton_bitmap_linear)):
        if not has_kernel(name, "CUDA"):
            LIB.impl(name, fn, "CUDA")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_in_features(in_features: object) -> int:
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"in_features must be a non-negative int, got {in_features!r}")
    return in_features


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], what: str,
                  device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activation is on {device}")
    return t


def _check_row_ptr(row_ptr: object, device: torch.device, nnz: int,
                   out: int | None = None) -> torch.Tensor:
    row_ptr = _check_tensor("row_ptr", row_ptr, (torch.int64,), "int64 [out_features + 1]",
                            device)
    if row_ptr.dim() != 1 or row_ptr.shape[0] < 1 or (out is not None
                                                      and row_ptr.shape[0] != out + 1):
        want = "out_features + 1" if out is None else str(out + 1)
        raise ValueError(f"row_ptr must be 1-D of length {want}, got {tuple(row_ptr.shape)}")
    return row_ptr.contiguous()


def _check_values(values: object, device: torch.device) -> torch.Tensor:
    values = _check_tensor("values", values, _FLOAT_DTYPES, "float32, bfloat16 or float16 [nnz]",
                           device)
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [nnz], got {tuple(values.shape)}")
    return values.contiguous()


def _check_col_idx(col_idx: object, device: torch.device, nnz: int,
                   in_features: int) -> torch.Tensor:
    col_idx = _check_tensor("col_idx", col_idx, _INDEX_DTYPES, "int16 or int32 [nnz]", device)
    if col_idx.dim() != 1 or col_idx.shape[0] != nnz:
        raise ValueError(f"col_idx must be 1-D [nnz] = [{nnz}] like values, got "
                         f"{tuple(col_idx.shape)}")
    if col_idx.dtype == torch.int16 and in_features > MAX_INT16_COLUMNS:
        raise ValueError(f"int16 col_idx holds columns < {MAX_INT16_COLUMNS} only, but "
                         f"in_features is {in_features}; pack with index_dtype=torch.int32")
    return col_idx.contiguous()


def _check_bias(bias: object, out: int, device: torch.device) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.shape != (out,):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be a tensor of shape ({out},), got {got}")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be floating point, got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but the activation is on {device}")
    return bias.contiguous()


def _check_x(x: object, in_features: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    return x


def _check_csr_parts(row_ptr: object, col_idx: object, values: object, bias: object,
                     in_features: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The checked ``(row_ptr, col_idx, values, bias)`` of a CSR weight on ``device``."""
    values = _check_values(values, device)
    nnz = values.shape[0]
    row_ptr = _check_row_ptr(row_ptr, device, nnz)
    col_idx = _check_col_idx(col_idx, device, nnz, in_features)
    bias = _check_bias(bias, row_ptr.shape[0] - 1, device)
    return row_ptr, col_idx, values, bias


def _check_csr_linear_args(x: object, row_ptr: object, col_idx: object, values: object,
                           in_features: int, bias: object
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor | None]:
    """The checked ``(x, row_ptr, col_idx, values, bias)`` of a ``csr_linear`` call."""
    x = _check_x(x, in_features)
    row_ptr, col_idx, values, bias = _check_csr_parts(row_ptr, col_idx, values, bias,
                                                      in_features, x.device)
    return x, row_ptr, col_idx, values, bias


def csr_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               values: torch.Tensor, in_features: int, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``y = x @ W^T + bias`` with ``W`` in CSR (see the module docstring for the format).

    ``x``: ``[..., in_features]`` float32/bfloat16/float16; returns ``[..., out_features]`` in
    ``x``'s dtype (float32 accumulation). On CPU the structure is validated on every call
    (``row_ptr`` starts at 0, never decreases and ends at ``nnz``; every column is in range):
    ``RuntimeError`` (C++) or ``ValueError`` (reference) on a corrupt weight. The GPU kernels
    never read out of bounds (out-of-range columns are skipped) but do not re-validate per call
    (that would synchronise the device): validate once when loading, as the deployment loader
    does.
    """
    in_features = _check_in_features(in_features)
    args = (x, row_ptr, col_idx, values, in_features, bias)
    y = direct_first("csr_linear", x, (values, bias), args,
                     lambda: _check_csr_linear_args(*args))
    if y is not None:
        return y
    x, row_ptr, col_idx, values, bias = _check_csr_linear_args(*args)
    out = row_ptr.shape[0] - 1
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    chosen = _backend.resolve("csr_linear", x.device, SUPPORTED_BACKENDS)
    if chosen == "reference":
        y = reference_csr_linear(x2, row_ptr, col_idx, values, in_features, bias)
    elif chosen == "triton":
        y = _triton_csr_linear(x2, row_ptr, col_idx, values, in_features, bias)
    else:
        y = run_op("csr_linear", x2, (values, bias), x2, row_ptr, col_idx, values, in_features,
                   bias)
    return y if flat else y.reshape(*x.shape[:-1], out)


def _check_csr_matmul_args(row_ptr: object, col_idx: object, values: object, X: object,
                           in_features: int, bias: object
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor | None]:
    """The checked ``(row_ptr, col_idx, values, X, bias)`` of a ``csr_matmul`` call."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"X must be float32, bfloat16 or float16, got {X.dtype}")
    if X.dim() != 2 or X.shape[0] != in_features:
        raise ValueError(f"X must have shape [{in_features}, N], got {tuple(X.shape)}")
    row_ptr, col_idx, values, bias = _check_csr_parts(row_ptr, col_idx, values, bias,
                                                      in_features, X.device)
    return row_ptr, col_idx, values, X, bias


def csr_matmul(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
               X: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
               relu: bool = False) -> torch.Tensor:
    """``Y = relu?(W @ X + bias[:, None])``: ``W [out, in]`` in CSR, dense ``X [in_features, N]``
    -> ``[out, N]`` in ``X``'s dtype (float32 accumulation).

    The weight-stationary sparse x dense product of a convolution (``Y = W @ im2col(x)``; a 1x1
    convolution's ``X`` is the activation viewed ``[C, H * W]``). ``bias [out]`` (e.g. a folded
    BatchNorm's shift) and ``relu`` (a following ReLU) are fused into the kernel's store on the
    CPU. ``X`` needs contiguous columns only (``X.stride(1) == 1``): its rows may be strided
    (e.g. ``X = A[:, :N]``), other layouts are copied.
    """
    in_features = _check_in_features(in_features)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    args = (row_ptr, col_idx, values, X, in_features, bias, relu)
    Y = direct_first("csr_matmul", X, (values, bias), args,
                     lambda: _check_csr_matmul_args(*args[:-1]))
    if Y is not None:
        return Y
    row_ptr, col_idx, values, X, bias = _check_csr_matmul_args(*args[:-1])
    if X.shape[1] > 1 and X.stride(1) != 1:
        X = X.contiguous()
    chosen = _backend.resolve("csr_matmul", X.device, MATMUL_BACKENDS)
    if chosen == "reference":
        return reference_csr_matmul(row_ptr, col_idx, values, X, in_features, bias, relu)
    if chosen == "triton":
        return _triton_csr_matmul(row_ptr, col_idx, values, X, in_features, bias, relu)
    return run_op("csr_matmul", X, (values, bias), row_ptr, col_idx, values, X, in_features, bias,
                  relu)


def bitmap_linear(x: torch.Tensor, bitmap: torch.Tensor, row_ptr: torch.Tensor,
                  values: torch.Tensor, in_features: int, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``y = x @ W^T + bias`` with ``W`` as bitmap + values (see the module docstring).

    On CPU the kernels check that each row's popcount equals its ``row_ptr`` span (so
    ``values`` is never over-read) and that no bit past ``in_features`` is set, and raise
    ``RuntimeError`` otherwise; the Triton kernel masks its reads to the row's span.
    """
    in_features = _check_in_features(in_features)
    x = _check_x(x, in_features)
    bitmap = _check_tensor("bitmap", bitmap, (torch.int64,),
                           "int64 words [out_features, ceil(in_features / 64)]", x.device)
    nwords = words_for(in_features)
    if bitmap.dim() != 2 or bitmap.shape[1] != nwords:
        raise ValueError(f"bitmap must have shape [out_features, {nwords}] (in_features bits in "
                         f"{WORD_BITS}-bit words), got {tuple(bitmap.shape)}")
    bitmap = bitmap.contiguous()
    out = bitmap.shape[0]
    values = _check_values(values, x.device)
    row_ptr = _check_row_ptr(row_ptr, x.device, values.shape[0], out)
    bias = _check_bias(bias, out, x.device)
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    chosen = _backend.resolve("bitmap_linear", x.device, BITMAP_BACKENDS)
    if chosen == "reference":
        y = reference_bitmap_linear(x2, bitmap, row_ptr, values, in_features, bias)
    elif chosen == "triton":
        y = _triton_bitmap_linear(x2, bitmap, row_ptr, values, in_features, bias)
    else:
        y = run_op("bitmap_linear", x2, (values, bias), x2, bitmap, row_ptr, values, in_features,
                   bias)
    return y if flat else y.reshape(*x.shape[:-1], out)
