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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend as _backend
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
]

#: Bits per storage word of ``mask_bits`` / ``sign_bits`` (int64 holding unsigned 64-bit words).
WORD_BITS = 64
SUPPORTED_BACKENDS = ("reference", "cpp", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

LIB.define("ternary_linear(Tensor x, Tensor mask_bits, Tensor sign_bits, float scale, "
           "int in_features, Tensor? bias) -> Tensor")


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


def _backward(ctx, grad: torch.Tensor):
    mask_bits, sign_bits = ctx.saved_tensors
    # dy/dx = W (dense, float32): grad_x = grad @ W.
    w = unpack_ternary(mask_bits, sign_bits, ctx.scale, ctx.in_features, torch.float32)
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    grad_bias = None
    if ctx.bias_meta is not None:
        grad_bias = grad.to(torch.float32).sum(0).to(ctx.bias_meta[0])
    return grad_x, None, None, None, None, grad_bias


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
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape ({out_features},), got {got}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        bias = bias.contiguous()
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
