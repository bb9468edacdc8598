"""Ternary bit-packed linear layers: ``y = x @ (c * T)^T + bias`` with ``T`` in {-1, 0, +1}.

This is how an edge-popup subnetwork of a *signed-constant* network ships: every effective weight
is ``-c``, ``0`` or ``+c`` (one ``c`` per layer), so a layer is two bits per weight plus one float.

Bit layout (the contract of every backend and of the deployment format)
-----------------------------------------------------------------------
A ternary matrix ``[out_features, in_features]`` is stored as two ``int64`` tensors
``[out_features, W]`` with ``W = ceil(in_features / 64)``:

* ``mask_bits``: ``M[o, i] = 1`` where the weight is kept (nonzero);
* ``sign_bits``: ``S[o, i] = 1`` where a kept weight is ``+c``, ``0`` where it is ``-c`` (its value
  where ``M[o, i] = 0`` is ignored; :func:`pack_ternary` writes 0 there).

Bit ``i`` of row ``o`` is bit ``i % 64`` (least significant first) of word ``i // 64`` of that row;
the words are unsigned 64-bit patterns held in ``int64`` (torch and safetensors support) and the
padding bits past ``in_features`` are zero (every kernel also ignores them). On little-endian hosts
(x86-64, aarch64: every platform torch ships for) this is exactly byte ``i // 8``, bit ``i % 8`` of
the row's bytes, i.e. :func:`subkern.pack_bits`' FAISS layout padded to whole 8-byte words, and the
same storage viewed as ``int32`` is the 32-bit-word layout the Triton kernel reads.

Op
--
``subkern::ternary_linear(Tensor x, Tensor mask_bits, Tensor sign_bits, float scale,
int in_features, Tensor? bias) -> Tensor``::

    y[b, o] = scale * sum_i M[o, i] * (S[o, i] ? +x[b, i] : -x[b, i])  (+ bias[o])

``x`` is ``[batch, in_features]`` (float32, bfloat16 or float16; the kernels accumulate in
float32 and return ``x``'s dtype). Implementations: the torch reference (unpack to a dense
``{-c, 0, +c}`` matrix, then ``F.linear``), C++ CPU (AVX-512 with the bits as lane masks, AVX2,
portable), Triton (bits unpacked in registers) and CUDA. The gradient with respect to ``x`` and
``bias`` is defined (through the dense matrix; the bits and the scale get none).

Prepacked layout (CPU inference at small batch)
-----------------------------------------------
``subkern::ternary_prepack(Tensor mask_bits, Tensor sign_bits, int in_features) -> Tensor``
re-lays the bits once (at load) into ``uint8 [ceil(out / 16), ceil(in / 4) * 16]``: output rows in
blocks of 16, inputs in groups of 4; for block ``q`` and group ``g`` the 16 bytes
``packed[q, 16 g : 16 g + 16]`` hold in byte ``r`` the bits of row ``o = 16 q + r`` on inputs
``4 g .. 4 g + 3``: low nibble ``P = M & S`` (``+c``), high nibble ``N = M & ~S`` (``-c``), bit
``j`` of a nibble = input ``4 g + j``; rows past ``out`` and inputs past ``in`` are zero (same 2
bits per weight as the words).

``subkern::ternary_linear_prepacked(Tensor x, Tensor packed, float scale, int in_features,
int out_features, Tensor? bias) -> Tensor`` computes the same ``y`` from it by nibble lookup
tables: with ``T_bg[p] = sum_{j in p} x[b, 4 g + j]`` (16 floats per group of 4 inputs, built once
per call and batch row), ``y[b, o] = scale * sum_g (T_bg[P_og] - T_bg[N_og]) + bias[o]``. The
AVX-512 kernel looks 16 rows up at once (``vpmovzxbd`` of the 16 bytes, then ``vpermps`` of the
table by the low nibbles and, after a shift, by the high nibbles): 64 weights in about 6 uops,
against 8 for the bit-mask kernel. Its reference unpacks the layout (:func:`unprepack_ternary`)
and runs ``F.linear``. :class:`subkern.nn.SupermaskLinear` builds the layout lazily on its first
CPU forward and uses it for small batches (:data:`PREPACKED_MAX_BATCH`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _ext
from .. import backend as _backend
from ._direct import run_op
from .binary import pack_bits, unpack_bits
from .library import LIB, has_kernel, qualname

__all__ = [
    "WORD_BITS",
    "words_for",
    "pack_ternary",
    "pack_rows",
    "unpack_rows",
    "unpack_ternary",
    "ternary_linear",
    "reference_ternary_linear",
    "SUPPORTED_BACKENDS",
    "ternary_prepack",
    "unprepack_ternary",
    "ternary_linear_prepacked",
    "reference_ternary_linear_prepacked",
    "prepacked_shape",
    "PREPACKED_MAX_BATCH",
    "prepacked_preferred",
    "ternary_linear_prepacked_cpu",
]

#: Bits per storage word of ``mask_bits`` / ``sign_bits`` (int64 holding unsigned 64-bit words).
WORD_BITS = 64
SUPPORTED_BACKENDS = ("reference", "cpp", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

LIB.define("ternary_linear(Tensor x, Tensor mask_bits, Tensor sign_bits, float scale, "
           "int in_features, Tensor? bias) -> Tensor")
LIB.define("ternary_prepack(Tensor mask_bits, Tensor sign_bits, int in_features) -> Tensor")
LIB.define("ternary_linear_prepacked(Tensor x, Tensor packed, float scale, int in_features, "
           "int out_features, Tensor? bias) -> Tensor")

#: Rows per block and inputs per group of the prepacked layout.
PREPACK_BLOCK_ROWS = 16
PREPACK_GROUP = 4
#: Largest batch (rows of ``x``; im2col rows for a convolution) for which the Supermask layers
#: use the prepacked kernel on CPU. It beat the bit-mask kernel at every batch measured (1 to 256,
#: ``subkern bench --ops ternary``); the bound keeps its tables (``64 * in_features`` bytes per
#: row) small, and large batches are where dense matmuls win anyway.
PREPACKED_MAX_BATCH = 64


def words_for(in_features: int) -> int:
    """``ceil(in_features / 64)``: storage words per row."""
    return (in_features + WORD_BITS - 1) // WORD_BITS


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------

def pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[rows, n]`` matrix into ``int64 [rows, ceil(n / 64)]`` (LSB-first words)."""
    if bits.dim() != 2:
        raise ValueError(f"bits must be 2-D [rows, n], got shape {tuple(bits.shape)}")
    rows, n = bits.shape
    nwords = words_for(n)
    if rows == 0 or nwords == 0:
        return torch.zeros((rows, nwords), dtype=torch.int64, device=bits.device)
    codes = pack_bits(bits.bool())                               # uint8 [rows, ceil(n / 8)]
    codes = F.pad(codes, (0, nwords * 8 - codes.shape[1]))       # whole 8-byte words
    return codes.contiguous().view(torch.int64)


def unpack_rows(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``int64 [rows, W]`` to bool ``[rows, n]``."""
    if words.dtype != torch.int64 or words.dim() != 2:
        raise ValueError(f"words must be int64 [rows, W], got {words.dtype} "
                         f"{tuple(words.shape)}")
    if words.shape[1] * WORD_BITS < n:
        raise ValueError(f"{words.shape[1]} words per row hold at most "
                         f"{words.shape[1] * WORD_BITS} bits, need {n}")
    if words.shape[0] == 0 or n == 0:
        return torch.zeros((words.shape[0], n), dtype=torch.bool, device=words.device)
    return unpack_bits(words.contiguous().view(torch.uint8), n)


def pack_ternary(weight: torch.Tensor, atol: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Split a matrix with entries in ``{-c, 0, +c}`` into ``(mask_bits, sign_bits, c)``.

    ``c`` is the magnitude of the nonzero entries (``1.0`` when all are zero). Raises
    ``ValueError`` naming the offending values when the nonzero entries do not share one magnitude
    (within ``atol``, relative to ``c``), or when an entry is NaN or infinite.
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError("weight must be a floating-point torch.Tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got "
                         f"{tuple(weight.shape)}")
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or infinite values; a ternary layer needs {-c, 0, +c}")
    mask = w != 0
    mags = w.abs()[mask]
    if mags.numel() == 0:
        scale = 1.0
    else:
        lo, hi = float(mags.min()), float(mags.max())
        scale = hi
        if hi - lo > atol * hi:
            raise ValueError(
                f"the kept weights are not +-c for a single c: magnitudes range from {lo!r} to "
                f"{hi!r} (a ternary/supermask layer needs a signed-constant weight; train the "
                "Subnet layer with init 'signed_constant' or pass a matching atol)")
    sign = mask & (w > 0)
    return pack_rows(mask), pack_rows(sign), scale


def unpack_ternary(mask_bits: torch.Tensor, sign_bits: torch.Tensor, scale: float,
                   in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense matrix ``scale * M * (2 S - 1)`` as ``dtype [out_features, in_features]``."""
    m = unpack_rows(mask_bits, in_features)
    s = unpack_rows(sign_bits, in_features)
    one = torch.ones((), dtype=dtype, device=mask_bits.device)
    signed = torch.where(s, one, -one)
    return torch.where(m, signed * scale, torch.zeros((), dtype=dtype, device=m.device))


# --------------------------------------------------------------------------------------------
# Reference, fake, autograd
# --------------------------------------------------------------------------------------------

def reference_ternary_linear(x: torch.Tensor, mask_bits: torch.Tensor, sign_bits: torch.Tensor,
                             scale: float, in_features: int, bias: torch.Tensor | None
                             ) -> torch.Tensor:
    """Ground truth: unpack to the dense ``{-c, 0, +c}`` matrix, ``F.linear`` in float32."""
    w = unpack_ternary(mask_bits, sign_bits, scale, in_features, torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


def _reference_kernel(x: torch.Tensor, mask_bits: torch.Tensor, sign_bits: torch.Tensor,
                      scale: float, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return reference_ternary_linear(x, mask_bits, sign_bits, scale, in_features, bias)


LIB.impl("ternary_linear", _reference_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("ternary_linear"))
def _ternary_linear_fake(x: torch.Tensor, mask_bits: torch.Tensor, sign_bits: torch.Tensor,
                         scale: float, in_features: int, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: "x must be 2-D [batch, in_features]")
    torch._check(mask_bits.dim() == 2 and sign_bits.dim() == 2, lambda: "bits must be 2-D")
    torch._check(x.shape[1] == in_features, lambda: "x.shape[1] != in_features")
    return x.new_empty((x.shape[0], mask_bits.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, mask_bits, sign_bits, scale, in_features, bias = inputs
    ctx.save_for_backward(mask_bits, sign_bits)
    ctx.scale = scale
    ctx.in_features = in_features
    ctx.x_dtype = x.dtype
    ctx.bias_meta = None if bias is None else (bias.dtype,)


def _input_grads(ctx, grad: torch.Tensor, w: torch.Tensor):
    """Gradients of ``y = x @ W^T + b`` (``W`` constant, the dense float32 ``w``) for the six
    inputs of both ternary ops: ``(grad @ W, None x 4, sum_rows(grad))``, in x's / b's dtype."""
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    grad_bias = None
    if ctx.bias_meta is not None:
        grad_bias = grad.to(torch.float32).sum(0).to(ctx.bias_meta[0])
    return grad_x, None, None, None, None, grad_bias


def _backward(ctx, grad: torch.Tensor):
    mask_bits, sign_bits = ctx.saved_tensors
    # dy/dx = W (dense, float32): grad_x = grad @ W.
    w = unpack_ternary(mask_bits, sign_bits, ctx.scale, ctx.in_features, torch.float32)
    return _input_grads(ctx, grad, w)


torch.library.register_autograd(qualname("ternary_linear"), _backward,
                                setup_context=_setup_context)


def _triton_kernel(x: torch.Tensor, mask_bits: torch.Tensor, sign_bits: torch.Tensor,
                   scale: float, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    from ..kernels import ternary as triton_ternary

    return triton_ternary.ternary_linear(x.contiguous(), mask_bits.contiguous(),
                                         sign_bits.contiguous(), scale, in_features,
                                         None if bias is None else bias.contiguous())


def register_device_fallbacks() -> None:
    """Route CUDA tensors to Triton where ``_C`` brought no CUDA kernel (call after loading _C)."""
    if not has_kernel("ternary_linear", "CUDA") and _backend.triton_importable():
        LIB.impl("ternary_linear", _triton_kernel, "CUDA")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_bits(name: str, bits: object, out_features: int | None, nwords: int
                ) -> torch.Tensor:
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(bits).__name__}")
    if bits.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 words [out_features, ceil(in_features / 64)] "
                        f"(see subkern.ops.ternary.pack_ternary), got {bits.dtype}")
    if bits.dim() != 2 or bits.shape[1] != nwords or (
            out_features is not None and bits.shape[0] != out_features):
        want = f"[{out_features if out_features is not None else 'out_features'}, {nwords}]"
        raise ValueError(f"{name} must have shape {want} for in_features bits packed into "
                         f"64-bit words, got {tuple(bits.shape)}")
    return bits.contiguous()


def _check_bias(bias: object, out_features: int) -> torch.Tensor | None:
    """``bias``: ``None`` or a floating-point tensor of shape ``(out_features,)`` (made
    contiguous)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be a tensor of shape ({out_features},), got {got}")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be floating point, got {bias.dtype}")
    return bias.contiguous()


def ternary_linear(x: torch.Tensor, mask_bits: torch.Tensor, sign_bits: torch.Tensor,
                   scale: float, in_features: int, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``y = scale * x @ (M * (2 S - 1))^T + bias`` straight from the packed bits.

    ``x``: ``[..., in_features]`` float32/bfloat16/float16; ``mask_bits``/``sign_bits``: ``int64
    [out_features, ceil(in_features / 64)]`` (module docstring for the layout); ``bias``:
    ``[out_features]`` or None. Returns ``[..., out_features]`` in ``x``'s dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"in_features must be a non-negative int, got {in_features!r}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    nwords = words_for(in_features)
    mask_bits = _check_bits("mask_bits", mask_bits, None, nwords)
    sign_bits = _check_bits("sign_bits", sign_bits, mask_bits.shape[0], nwords)
    out_features = mask_bits.shape[0]
    scale = float(scale)
    bias = _check_bias(bias, out_features)
    for name, t in (("mask_bits", mask_bits), ("sign_bits", sign_bits), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    chosen = _backend.resolve("ternary_linear", x.device, SUPPORTED_BACKENDS)
    if chosen == "reference":
        y = reference_ternary_linear(x2, mask_bits, sign_bits, scale, in_features, bias)
    elif chosen == "triton":
        y = _triton_kernel(x2, mask_bits, sign_bits, scale, in_features, bias)
    else:
        y = torch.ops.subkern.ternary_linear(x2, mask_bits, sign_bits, scale, in_features, bias)
    return y.reshape(*lead, out_features)


# --------------------------------------------------------------------------------------------
# Prepacked layout (nibble lookup tables)
# --------------------------------------------------------------------------------------------

def prepacked_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the prepacked layout: ``(ceil(out / 16), ceil(in / 4) * 16)`` (uint8)."""
    return (-(-out_features // PREPACK_BLOCK_ROWS),
            -(-in_features // PREPACK_GROUP) * PREPACK_BLOCK_ROWS)


def _prepack_impl(mask_bits: torch.Tensor, sign_bits: torch.Tensor, in_features: int
                  ) -> torch.Tensor:
    """Torch integer ops: words -> nibbles (4 inputs each) -> blocks of 16 rows."""
    out = mask_bits.shape[0]
    nblocks, width = prepacked_shape(out, in_features)
    groups = width // PREPACK_BLOCK_ROWS
    device = mask_bits.device
    packed = torch.zeros((nblocks * PREPACK_BLOCK_ROWS, groups), dtype=torch.uint8,
                         device=device)
    if out and groups:
        valid = pack_rows(torch.ones((1, in_features), dtype=torch.bool, device=device))
        m = mask_bits.contiguous() & valid
        s = sign_bits.contiguous()
        pos = (m & s).view(torch.uint8)          # [out, 8 W]: byte k = inputs 8k .. 8k + 7
        neg = (m & ~s).view(torch.uint8)
        # byte k -> nibbles 2k (inputs 8k .. 8k + 3) and 2k + 1 (8k + 4 .. 8k + 7)
        pn = torch.stack((pos & 15, pos >> 4), dim=-1).reshape(out, -1)[:, :groups]
        nn_ = torch.stack((neg & 15, neg >> 4), dim=-1).reshape(out, -1)[:, :groups]
        packed[:out] = pn | (nn_ << 4)
    # [blocks * 16, G] -> [blocks, G, 16]: the 16 rows of a block are adjacent per group
    return (packed.reshape(nblocks, PREPACK_BLOCK_ROWS, groups).transpose(1, 2)
            .reshape(nblocks, width).contiguous())


LIB.impl("ternary_prepack", _prepack_impl, "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("ternary_prepack"))
def _ternary_prepack_fake(mask_bits: torch.Tensor, sign_bits: torch.Tensor, in_features: int
                          ) -> torch.Tensor:
    return mask_bits.new_empty(prepacked_shape(mask_bits.shape[0], in_features),
                               dtype=torch.uint8)


def ternary_prepack(mask_bits: torch.Tensor, sign_bits: torch.Tensor, in_features: int
                    ) -> torch.Tensor:
    """The prepacked layout (module docstring) of a packed ternary matrix, ``uint8
    [ceil(out / 16), ceil(in / 4) * 16]``; a one-off cost at load (torch integer ops)."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"in_features must be a non-negative int, got {in_features!r}")
    nwords = words_for(in_features)
    mask_bits = _check_bits("mask_bits", mask_bits, None, nwords)
    sign_bits = _check_bits("sign_bits", sign_bits, mask_bits.shape[0], nwords)
    if sign_bits.device != mask_bits.device:
        raise ValueError(f"sign_bits is on {sign_bits.device} but mask_bits is on "
                         f"{mask_bits.device}")
    return torch.ops.subkern.ternary_prepack(mask_bits, sign_bits, in_features)


def _unprepack_signs(packed: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """``int8 [out, in]`` with entries ``+1`` (P), ``-1`` (N), ``0`` from the prepacked layout."""
    nblocks, width = packed.shape
    groups = width // PREPACK_BLOCK_ROWS
    rows = (packed.reshape(nblocks, groups, PREPACK_BLOCK_ROWS).transpose(1, 2)
            .reshape(nblocks * PREPACK_BLOCK_ROWS, groups)[:out_features])
    shifts = torch.arange(PREPACK_GROUP, dtype=torch.uint8, device=packed.device)
    p = ((rows & 15).unsqueeze(-1) >> shifts) & 1                 # [out, G, 4]
    n = ((rows >> 4).unsqueeze(-1) >> shifts) & 1
    t = p.to(torch.int8) - n.to(torch.int8)
    return t.reshape(out_features, groups * PREPACK_GROUP)[:, :in_features]


def unprepack_ternary(packed: torch.Tensor, scale: float, in_features: int, out_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense matrix ``scale * (P - N)`` of a prepacked layout, ``dtype [out, in]``."""
    return _unprepack_signs(packed, in_features, out_features).to(dtype) * scale


def reference_ternary_linear_prepacked(x: torch.Tensor, packed: torch.Tensor, scale: float,
                                       in_features: int, out_features: int,
                                       bias: torch.Tensor | None) -> torch.Tensor:
    """Ground truth of the prepacked op: unpack the layout, ``F.linear`` in float32."""
    w = unprepack_ternary(packed, scale, in_features, out_features, torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


LIB.impl("ternary_linear_prepacked", reference_ternary_linear_prepacked,
         "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("ternary_linear_prepacked"))
def _ternary_linear_prepacked_fake(x: torch.Tensor, packed: torch.Tensor, scale: float,
                                   in_features: int, out_features: int,
                                   bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: "x must be 2-D [batch, in_features]")
    torch._check(x.shape[1] == in_features, lambda: "x.shape[1] != in_features")
    torch._check(packed.dim() == 2, lambda: "packed must be 2-D")
    return x.new_empty((x.shape[0], out_features))


def _setup_context_prepacked(ctx, inputs, output) -> None:
    x, packed, scale, in_features, out_features, bias = inputs
    ctx.save_for_backward(packed)
    ctx.scale = scale
    ctx.shape = (in_features, out_features)
    ctx.x_dtype = x.dtype
    ctx.bias_meta = None if bias is None else (bias.dtype,)


def _backward_prepacked(ctx, grad: torch.Tensor):
    (packed,) = ctx.saved_tensors
    w = unprepack_ternary(packed, ctx.scale, *ctx.shape, torch.float32)
    return _input_grads(ctx, grad, w)


torch.library.register_autograd(qualname("ternary_linear_prepacked"), _backward_prepacked,
                                setup_context=_setup_context_prepacked)

PREPACKED_BACKENDS = ("reference", "cpp")
_LUT_ISA = "avx512vpopcntdq"


_lut_state: dict[str, object] = {}


def _lut_kernel_present() -> bool:
    """Whether ``_C`` registered the C++ prepacked kernel (checked once: kernels stay)."""
    present = _lut_state.get("present")
    if present is None:
        present = _lut_state["present"] = (has_kernel("ternary_linear_prepacked", "CPU")
                                           and _ext.extension() is not None)
    return bool(present)


def prepacked_preferred(x: torch.Tensor, in_features: int) -> bool:
    """Whether :func:`ternary_linear_prepacked` is the faster CPU path for ``x``: a CPU tensor,
    at most :data:`PREPACKED_MAX_BATCH` rows, the ``auto`` or ``cpp`` backend, the C++ kernel
    present, AVX-512 active (the nibble-table kernel needs ``vpermps`` on 16 lanes; other CPUs run
    the bit-mask kernel of :func:`ternary_linear`), not under ``torch.compile`` (whose graphs
    call :func:`ternary_linear`). Costs about a microsecond."""
    if not x.is_cpu:
        return False
    if in_features and x.numel() > PREPACKED_MAX_BATCH * in_features:
        return False
    if not _lut_kernel_present() or torch.compiler.is_compiling():
        return False
    if _backend.get_backend() not in ("auto", "cpp"):
        return False
    return _ext.extension().cpu_isa() == _LUT_ISA


def ternary_linear_prepacked_cpu(x: torch.Tensor, packed: torch.Tensor, scale: float,
                                 in_features: int, out_features: int,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    """The C++ prepacked kernel with only the checks its callers cannot have made: for modules
    that hold a validated ``packed`` / ``bias`` and asked :func:`prepacked_preferred` (the
    kernel itself checks shapes and dtypes again, in C++)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    # inference: the C++ kernel without the dispatcher and the op's (Python) autograd kernel,
    # about 6 us of a call that takes tens of microseconds at batch 1
    y = run_op("ternary_linear_prepacked", x, (bias,), x2, packed, scale, in_features,
               out_features, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def ternary_linear_prepacked(x: torch.Tensor, packed: torch.Tensor, scale: float,
                             in_features: int, out_features: int,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = scale * x @ (P - N)^T + bias`` from the prepacked layout (:func:`ternary_prepack`).

    Same result as :func:`ternary_linear` on the bits it was made from (float32 summation order
    aside). ``x``: ``[..., in_features]`` float32/bfloat16/float16; returns ``[..., out_features]``
    in ``x``'s dtype. Backends: the C++ CPU kernel (nibble lookup tables) and the reference.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}], got {tuple(x.shape)}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    want = prepacked_shape(out_features, in_features)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        raise ValueError(f"packed must be uint8 {want} (ternary_prepack of a {out_features} x "
                         f"{in_features} layer), got {packed.dtype} {tuple(packed.shape)}")
    bias = _check_bias(bias, out_features)
    for name, t in (("packed", packed), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    packed = packed.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    scale = float(scale)
    chosen = _backend.resolve("ternary_linear_prepacked", x.device, PREPACKED_BACKENDS)
    if chosen == "reference":
        y = reference_ternary_linear_prepacked(x2, packed, scale, in_features, out_features, bias)
    else:
        y = torch.ops.subkern.ternary_linear_prepacked(x2, packed, scale, in_features,
                                                       out_features, bias)
    return y.reshape(*lead, out_features)
