"""Edge-popup's top-k score masking: keep the fraction ``k`` of largest ``|scores|`` of a tensor.

Edge-popup (Ramanujan et al., 2020) learns a score per frozen weight and, on every forward pass,
uses the weights whose scores are in the top ``k`` fraction of their layer. The official code
computes ``GetSubnet.apply(scores.abs(), k)``: it sorts the scores and zeroes the
``j = floor((1 - k) * n)`` smallest, so it keeps ``n - j`` entries.

Ops (torch reference, C++ CPU radix select, Triton, CUDA):

* :func:`topk_mask`: the 0/1 mask (dtype and shape of ``scores``) keeping
  ``kept_count(n, k) = n - floor((1 - k) n)`` entries, ranked by ``(|s| descending, flat index
  ascending)``: among equal ``|s|`` the lower flat index is kept, identically on every backend.
* :func:`topk_threshold`: the smallest kept ``|s|`` ``t`` (0-d): every ``|s| > t`` is kept and
  entries with ``|s| == t`` are kept in flat-index order until the count is met.
* :func:`topk_mask_batched`: the masks of many tensors (all layers of a model) in one call.
* :func:`topk_mask_bool`: the same mask as a bool tensor (not differentiable), what the masked
  layers (:mod:`subkern.ops.masked`) select with: on CPU one kernel writes 1 byte per entry
  instead of a float mask and a conversion.

Special values: ``+inf`` and ``-inf`` (``|s| = inf``) rank above every finite score; ``NaN``
ranks below every number (kept only when fewer than ``kept_count`` non-NaN entries exist, and then
in flat-index order); ``-0.0`` equals ``0.0``. :func:`topk_threshold` returns NaN when the boundary
entry is NaN and ``+inf`` when nothing is kept (only possible for empty tensors).

Gradient (straight-through, as the official code): the mask is ``GetSubnet(|s|)`` whose backward
passes the incoming gradient through unchanged, and ``|s|``'s backward multiplies by
``sign(s)``, so ``d loss / d scores = grad_mask * sign(scores)`` (0 where ``scores == 0``).

The kernels never sort: they find the threshold by radix select on order-preserving integer keys
of ``|s|`` (histograms of 16-bit digits for large tensors on CPU, 11-bit digits otherwise and on
GPU) and write the mask in one more pass; ties at the threshold are resolved by per-chunk tie
counts and an exclusive scan, so every backend and thread count gives the same mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backend as _backend
from . import topk_mask_reference as reference
from .library import LIB, has_kernel, qualname

__all__ = ["topk_mask", "topk_mask_bool", "topk_threshold", "topk_mask_batched", "kept_count",
           "SUPPORTED_DTYPES"]

SUPPORTED_BACKENDS = ("reference", "cpp", "triton", "cuda")
#: Score dtypes every backend accepts.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

kept_count = reference.kept_count

LIB.define("topk_mask(Tensor scores, float k) -> Tensor")
LIB.define("topk_threshold(Tensor scores, float k) -> Tensor")
LIB.define("topk_mask_batched(Tensor[] scores, float[] k) -> Tensor[]")
LIB.define("topk_mask_bool(Tensor scores, float k) -> Tensor")


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels, reference kernels, autograd.
# --------------------------------------------------------------------------------------------

@torch.library.register_fake(qualname("topk_mask"))
def _topk_mask_fake(scores: torch.Tensor, k: float) -> torch.Tensor:
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake(qualname("topk_threshold"))
def _topk_threshold_fake(scores: torch.Tensor, k: float) -> torch.Tensor:
    return scores.new_empty(())


@torch.library.register_fake(qualname("topk_mask_bool"))
def _topk_mask_bool_fake(scores: torch.Tensor, k: float) -> torch.Tensor:
    return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake(qualname("topk_mask_batched"))
def _topk_mask_batched_fake(scores: list[torch.Tensor], k: list[float]) -> list[torch.Tensor]:
    torch._check(len(scores) == len(k), lambda: "one k per score tensor")
    return [torch.empty_like(s, memory_format=torch.contiguous_format) for s in scores]


def _reference_mask_kernel(scores: torch.Tensor, k: float) -> torch.Tensor:
    return reference.topk_mask(scores.contiguous(), k)


def _reference_threshold_kernel(scores: torch.Tensor, k: float) -> torch.Tensor:
    return reference.topk_threshold(scores.contiguous(), k)


def _reference_bool_kernel(scores: torch.Tensor, k: float) -> torch.Tensor:
    return reference.topk_mask(scores.contiguous(), k).bool()


def _reference_batched_kernel(scores: list[torch.Tensor], k: list[float]) -> list[torch.Tensor]:
    return [reference.topk_mask(s.contiguous(), kk) for s, kk in zip(scores, k, strict=True)]


LIB.impl("topk_mask", _reference_mask_kernel, "CompositeExplicitAutograd")
LIB.impl("topk_threshold", _reference_threshold_kernel, "CompositeExplicitAutograd")
LIB.impl("topk_mask_batched", _reference_batched_kernel, "CompositeExplicitAutograd")
LIB.impl("topk_mask_bool", _reference_bool_kernel, "CompositeExplicitAutograd")


def _setup_mask(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward_mask(ctx, grad: torch.Tensor):
    (scores,) = ctx.saved_tensors
    return grad * torch.sign(scores), None


def _setup_batched(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[0])


def _backward_batched(ctx, grads: list[torch.Tensor]):
    scores = ctx.saved_tensors
    return [None if g is None else g * torch.sign(s) for g, s in zip(grads, scores, strict=True)
            ], None


torch.library.register_autograd(qualname("topk_mask"), _backward_mask, setup_context=_setup_mask)
torch.library.register_autograd(qualname("topk_mask_batched"), _backward_batched,
                                setup_context=_setup_batched)


# Triton kernels (CUDA fallback when _C has no CUDA kernels; CPU under TRITON_INTERPRET=1).
def _triton_mask_kernel(scores: torch.Tensor, k: float) -> torch.Tensor:
    from ..kernels import topk_mask as triton_topk

    return triton_topk.topk_mask(scores.contiguous(), k)


def _triton_threshold_kernel(scores: torch.Tensor, k: float) -> torch.Tensor:
    from ..kernels import topk_mask as triton_topk

    return triton_topk.topk_threshold(scores.contiguous(), k)


def _triton_batched_kernel(scores: list[torch.Tensor], k: list[float]) -> list[torch.Tensor]:
    from ..kernels import topk_mask as triton_topk

    return triton_topk.topk_mask_batched([s.contiguous() for s in scores], list(k))


def _triton_batched_op_kernel(scores: list[torch.Tensor], k: list[float]) -> list[torch.Tensor]:
    # the op's schema promises outputs that alias nothing: copies of the views of one buffer
    return [m.clone() for m in _triton_batched_kernel(scores, k)]


def _cuda_bool_kernel(scores: torch.Tensor, k: float) -> torch.Tensor:
    return torch.ops.subkern.topk_mask(scores, k).bool()


def register_device_fallbacks() -> None:
    """Route CUDA tensors to Triton where ``_C`` brought no CUDA kernel (call after loading _C)."""
    if not has_kernel("topk_mask_bool", "CUDA"):  # the CUDA mask kernel (C++ or Triton) + cast
        LIB.impl("topk_mask_bool", _cuda_bool_kernel, "CUDA")
    if not _backend.triton_importable():
        return
    for op, fn in (("topk_mask", _triton_mask_kernel),
                   ("topk_threshold", _triton_threshold_kernel),
                   ("topk_mask_batched", _triton_batched_op_kernel)):
        if not has_kernel(op, "CUDA"):
            LIB.impl(op, fn, "CUDA")


# --------------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------------

def _check_k(k: object, name: str = "k") -> float:
    if isinstance(k, torch.Tensor) and k.numel() == 1:
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(k).__name__}")
    k = float(k)
    if not (0.0 < k <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1] (the fraction of scores kept), got {k!r}")
    return k


def _check_scores(scores: object, name: str = "scores") -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    if scores.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {scores.layout}")
    return scores


def _route(op: str, device: torch.device) -> str:
    """The backend for ``op`` on ``device`` (:func:`subkern.backend.resolve`, which caches)."""
    return _backend.resolve(op, device, SUPPORTED_BACKENDS)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """0/1 mask keeping the fraction ``k`` of largest ``|scores|`` of the whole tensor.

    Keeps ``n - floor((1 - k) * n)`` entries (edge-popup's ``GetSubnet``), ranked by
    ``(|s| descending, flat index ascending)``; NaN ranks below every number, ``inf`` above every
    finite score. Returns a contiguous tensor of ``scores``' dtype and shape.

    Differentiable (straight-through, as ``GetSubnet(scores.abs())``):
    ``grad_scores = grad_mask * sign(scores)``.
    """
    scores = _check_scores(scores)
    k = _check_k(k)
    chosen = _route("topk_mask", scores.device)
    if chosen == "reference":
        return _ReferenceMask.apply(scores, k)
    if chosen == "triton":
        return _TritonMask.apply(scores, k)
    return torch.ops.subkern.topk_mask(scores, k)


def topk_threshold(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The smallest kept ``|score|`` of :func:`topk_mask` (0-d tensor of ``scores``' dtype).

    ``+inf`` when nothing is kept (empty tensor); NaN when the boundary entry is NaN. Not
    differentiable (a selection).
    """
    scores = _check_scores(scores)
    k = _check_k(k)
    chosen = _route("topk_threshold", scores.device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.topk_threshold(scores.detach(), k)
        if chosen == "triton":
            return _triton_threshold_kernel(scores.detach(), k)
        return torch.ops.subkern.topk_threshold(scores.detach(), k)


def topk_mask_bool(scores: torch.Tensor, k: float) -> torch.Tensor:
    """:func:`topk_mask` as a bool tensor (``True`` = kept); not differentiable (a selection).

    The same kept set as :func:`topk_mask` on every backend; on CPU the C++ kernel writes the
    bool mask directly (the masked layers' selection).
    """
    scores = _check_scores(scores)
    k = _check_k(k)
    chosen = _route("topk_mask", scores.device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.topk_mask(scores.detach().contiguous(), k).bool()
        if chosen == "triton":
            return _triton_mask_kernel(scores.detach(), k).bool()
        return torch.ops.subkern.topk_mask_bool(scores.detach(), k)


def topk_mask_batched(scores_list: Sequence[torch.Tensor], k: float | Sequence[float]
                      ) -> list[torch.Tensor]:
    """:func:`topk_mask` of every tensor of ``scores_list`` (e.g. all layers of a model) at once.

    ``k`` is one fraction for all tensors or one per tensor. One call of the fused op: on CPU the
    small layers run concurrently and large ones with all threads. Equal to
    ``[topk_mask(s, k_i) for ...]``, gradients included. All tensors must be on one device.
    """
    if isinstance(scores_list, torch.Tensor) or not isinstance(scores_list, Sequence):
        raise TypeError("scores_list must be a sequence of tensors (e.g. a list)")
    tensors = [_check_scores(s, f"scores_list[{i}]") for i, s in enumerate(scores_list)]
    if isinstance(k, (int, float, torch.Tensor)) and not isinstance(k, bool):
        ks = [_check_k(k)] * len(tensors)
    elif isinstance(k, Sequence):
        if len(k) != len(tensors):
            raise ValueError(f"k must be one float or one per tensor: got {len(k)} values of k "
                             f"for {len(tensors)} tensors")
        ks = [_check_k(v, f"k[{i}]") for i, v in enumerate(k)]
    else:
        raise TypeError(f"k must be a float or a sequence of floats, got {type(k).__name__}")
    if not tensors:
        return []
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"all score tensors must be on one device, got {sorted(map(str, devices))}")
    chosen = _route("topk_mask_batched", tensors[0].device)
    if chosen == "reference":
        return [_ReferenceMask.apply(s, kk) for s, kk in zip(tensors, ks, strict=True)]
    if chosen == "triton":
        return list(_TritonMaskBatched.apply(ks, *tensors))
    return list(torch.ops.subkern.topk_mask_batched(tensors, ks))


class _StraightThrough(torch.autograd.Function):
    """Shared backward: ``grad * sign(scores)``."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (scores,) = ctx.saved_tensors
        return grad * torch.sign(scores), None


class _ReferenceMask(_StraightThrough):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scores)
        return reference.topk_mask(scores.detach().contiguous(), k)


class _TritonMask(_StraightThrough):
    """The Triton kernels, called directly (also where ``_C`` registered CUDA C++ kernels, and on
    CPU tensors under ``TRITON_INTERPRET=1``)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scores)
        return _triton_mask_kernel(scores.detach(), k)


class _TritonMaskBatched(torch.autograd.Function):
    """The batched Triton kernel (one launch per pass for all tensors of a dtype), called
    directly; backward ``grad_i * sign(scores_i)`` per tensor."""

    @staticmethod
    def forward(ctx, ks: list[float], *scores: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(*scores)
        return tuple(_triton_batched_kernel([s.detach() for s in scores], ks))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        scores = ctx.saved_tensors
        return (None, *[None if g is None else g * torch.sign(s)
                        for g, s in zip(grads, scores, strict=True)])
