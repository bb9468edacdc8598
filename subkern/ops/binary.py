"""Binary codes: bit packing and Hamming-distance retrieval (LLC's binary codes, any binary hash).

Codes use FAISS's layout, so FAISS users bring their codes as they are: a ``uint8`` tensor
``[n, nbits / 8]`` where bit ``i`` of a vector is bit ``i % 8`` (least significant first) of byte
``i // 8``.

Ops (each with a torch reference, a C++ CPU kernel, a Triton kernel and a CUDA kernel):

* :func:`hamming_distance`: ``D[i, j] = popcount(a[i] XOR b[j])``, int32 ``[na, nb]``.
* :func:`hamming_topk`: the ``k`` nearest database codes of every query, fused (the ``[nq, n]``
  distance matrix is never materialised), ascending by distance, ties broken by the lower index on
  every backend; slots past the database size hold distance ``2**31 - 1`` and index ``-1``.
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from . import binary_reference as reference
from .library import LIB, has_kernel, qualname

__all__ = [
    "pack_bits",
    "unpack_bits",
    "hamming_distance",
    "hamming_topk",
    "MAX_GPU_K",
    "MAX_CODE_BYTES",
]

#: Largest k that the Triton and CUDA kernels select in one pass (larger k uses the reference).
MAX_GPU_K = 2048
#: Widest code supported by every backend, in bytes (4096 bits).
MAX_CODE_BYTES = 512

SUPPORTED_BACKENDS = ("reference", "cpp", "triton", "cuda")

LIB.define("hamming_distance(Tensor a, Tensor b) -> Tensor")
LIB.define("hamming_topk(Tensor queries, Tensor database, int k) -> (Tensor, Tensor)")


@torch.library.register_fake(qualname("hamming_distance"))
def _hamming_distance_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "codes must be 2-D [n, nbytes]")
    torch._check(a.shape[1] == b.shape[1], lambda: "code widths differ")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake(qualname("hamming_topk"))
def _hamming_topk_fake(queries: torch.Tensor, database: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(queries.dim() == 2 and database.dim() == 2, lambda: "codes must be 2-D")
    torch._check(queries.shape[1] == database.shape[1], lambda: "code widths differ")
    torch._check(k > 0, lambda: "k must be positive")
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=torch.int32),
            queries.new_empty(shape, dtype=torch.int64))


def _reference_distance_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return reference.hamming_distance(a.contiguous(), b.contiguous())


def _reference_topk_kernel(queries: torch.Tensor, database: torch.Tensor, k: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.hamming_topk(queries.contiguous(), database.contiguous(), k)


# The reference is every device's default; subkern._C overrides CPU (and CUDA when built).
LIB.impl("hamming_distance", _reference_distance_kernel, "CompositeExplicitAutograd")
LIB.impl("hamming_topk", _reference_topk_kernel, "CompositeExplicitAutograd")


def _triton_distance_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from ..kernels import hamming as triton_hamming

    return triton_hamming.hamming_distance(a.contiguous(), b.contiguous())


def _triton_topk_kernel(queries: torch.Tensor, database: torch.Tensor, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    if k > MAX_GPU_K:
        return _reference_topk_kernel(queries, database, k)
    from ..kernels import hamming as triton_hamming

    return triton_hamming.hamming_topk(queries.contiguous(), database.contiguous(), k)


def register_device_fallbacks() -> None:
    """Route CUDA tensors to Triton where ``_C`` brought no CUDA kernel (call after loading _C)."""
    if not has_kernel("hamming_distance", "CUDA") and _backend.triton_importable():
        LIB.impl("hamming_distance", _triton_distance_kernel, "CUDA")
    if not has_kernel("hamming_topk", "CUDA") and _backend.triton_importable():
        LIB.impl("hamming_topk", _triton_topk_kernel, "CUDA")


# --------------------------------------------------------------------------------------------
# Input checks: a clear Python exception naming the argument, never a crash in a kernel.
# --------------------------------------------------------------------------------------------

def _check_codes(name: str, codes: object) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of uint8 codes, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        hint = " (pack float/bool bits with subkern.pack_bits first)" if (
            codes.dtype.is_floating_point or codes.dtype == torch.bool) else ""
        raise TypeError(f"{name} must have dtype torch.uint8 (packed binary codes, FAISS layout "
                        f"[n, nbits/8]), got {codes.dtype}{hint}")
    if codes.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, nbytes], got shape {tuple(codes.shape)}")
    if codes.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {codes.layout}")
    if codes.shape[1] < 1 or codes.shape[1] > MAX_CODE_BYTES:
        raise ValueError(f"{name} codes must be 1 to {MAX_CODE_BYTES} bytes wide (8 to 4096 bits), "
                         f"got {codes.shape[1]} bytes")
    return codes.contiguous()


def _check_pair(a: object, b: object, name_a: str, name_b: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    a = _check_codes(name_a, a)
    b = _check_codes(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same code width: {name_a} has "
                         f"{a.shape[1]} bytes ({8 * a.shape[1]} bits), {name_b} has "
                         f"{b.shape[1]} bytes ({8 * b.shape[1]} bits)")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and "
                         f"{b.device}")
    return a, b


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.dtype.is_floating_point:
            k = int(k.item())
        else:
            raise TypeError(f"k must be a positive int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be a positive int, got {k}")
    return k


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack bits along the last dimension into uint8 codes (FAISS layout, LSB first).

    ``bits`` is bool, or numbers in {0, 1} or {-1, +1}: a bit is set where the value is > 0.
    The last dimension (any length ``nbits``) becomes ``ceil(nbits / 8)`` bytes; bit ``i`` goes to
    bit ``i % 8`` of byte ``i // 8`` and the unused high bits of the last byte are zero.
    """
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"bits must be a torch.Tensor, got {type(bits).__name__}")
    if bits.dim() == 0:
        raise ValueError("bits must have at least one dimension (the bits of each code)")
    if bits.dtype != torch.bool:
        if bits.is_complex():
            raise TypeError(f"bits must be bool or real numbers in {{0, 1}} or {{-1, 1}}, got "
                            f"{bits.dtype}")
        if bits.numel() > 0:
            valid = (bits == 0) | (bits == 1) | (bits == -1)
            if not bool(valid.all()):
                raise ValueError("bits must hold only 0/1 (or -1/+1) values; found others")
        bits = bits > 0
    nbits = bits.shape[-1]
    nbytes = (nbits + 7) // 8
    pad = nbytes * 8 - nbits
    if pad:
        bits = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))
    grouped = bits.to(torch.uint8).reshape(*bits.shape[:-1], nbytes, 8)
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32)).to(torch.uint8)
    return (grouped * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(codes: torch.Tensor, nbits: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes ``[..., nbytes]`` to bool bits ``[..., nbits]``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 tensor, got {got}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (the bytes of each code)")
    total = codes.shape[-1] * 8
    if nbits is None:
        nbits = total
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not 0 <= nbits <= total:
        raise ValueError(f"nbits must be an int in [0, {total}] for {codes.shape[-1]}-byte codes, "
                         f"got {nbits!r}")
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = (codes.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*codes.shape[:-1], total)[..., :nbits].bool()


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs Hamming distances of uint8 codes: int32 ``[na, nb]``, ``popcount(a[i] ^ b[j])``."""
    a, b = _check_pair(a, b, "a", "b")
    chosen = _backend.resolve("hamming_distance", a.device, SUPPORTED_BACKENDS)
    if chosen == "reference":
        return reference.hamming_distance(a, b)
    if chosen == "triton":
        return _triton_distance_kernel(a, b)
    return torch.ops.subkern.hamming_distance(a, b)


def hamming_topk(queries: torch.Tensor, database: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest database codes of every query by Hamming distance.

    Returns ``(distances int32 [nq, k], indices int64 [nq, k])``, ascending, ties broken by the
    lower index (deterministic on every backend). Where ``k`` exceeds the database size the missing
    slots hold distance ``2**31 - 1`` and index ``-1`` (as FAISS). Fused: extra memory is
    ``O(nq * k + tiles)``; the ``[nq, n]`` distance matrix is never built.
    """
    queries, database = _check_pair(queries, database, "queries", "database")
    k = _check_k(k)
    chosen = _backend.resolve("hamming_topk", queries.device, SUPPORTED_BACKENDS)
    if chosen in ("triton", "cuda") and k > MAX_GPU_K:
        if _backend.get_backend() != "auto":
            raise _backend.BackendUnavailableError(
                f"backend {chosen!r} selects at most k={MAX_GPU_K} in one pass (got k={k}); use "
                "the reference backend for larger k")
        chosen = "reference"
    if chosen == "reference":
        return reference.hamming_topk(queries, database, k)
    if chosen == "triton":
        return _triton_topk_kernel(queries, database, k)
    return torch.ops.subkern.hamming_topk(queries, database, k)
