"""Edge-popup's fused masked layers: ``y = x (W * M)^T + b`` with ``M = topk_mask(scores, k)``.

Edge-popup ("What's Hidden in a Randomly Weighted Neural Network?", Ramanujan et al., 2020) keeps
frozen random weights ``W`` and learns a score ``S`` per weight; the layer uses the effective weight
``W_eff = W * M`` where ``M`` keeps the fraction ``k`` of largest ``|S|`` of the layer (kept count
``n - floor((1 - k) n)``, ties to the lower flat index: :mod:`subkern.ops.topk_mask_reference`).
The official code writes it ``W * GetSubnet.apply(S.abs(), k)`` where ``GetSubnet``'s backward is
the identity (straight-through estimator), so with ``G = dL/dW_eff``:

* ``grad_x       = grad_y @ W_eff``
* ``grad_scores  = G * W * sign(S)``   (straight-through through the mask, then through ``|S|``)
* ``grad_weight  = G * M``             (only when ``weight.requires_grad``)
* ``grad_bias    = sum of grad_y over the leading dimensions``

and for the linear layer ``G = grad_y^T @ x`` (``x``, ``grad_y`` flattened to 2-D). NaN scores
rank below every number in the selection (never kept while a number is left) and get gradient 0
(``sign(NaN) = 0`` in torch); these are exactly the gradients autograd gives on the official
formulation (:func:`reference_masked_linear`, the ground truth of the tests).

Ops (schemas in the ``subkern`` library):

* ``masked_linear(x, weight, scores, k, bias)`` and ``masked_conv2d(...)``: selection + the mask
  form below (``CompositeImplicitAutograd``: the mask is computed once per forward and reused by
  the backward instead of being selected again);
* ``masked_linear_with_mask(x, weight, scores, mask, bias)`` (``mask``: bool, shape of ``weight``)
  with autograd through ``masked_linear_backward``; the C++ CPU kernels (``csrc/cpu/
  masked_linear.cpp``) build ``W * M`` in one fused multithreaded pass into a reused buffer and
  call the BLAS GEMM, and derive both weight-side gradients in one pass over ``G``; the Triton
  backend (the CUDA path) has two strategies (:mod:`subkern.ops.matmul_strategy`):
  ``materialize``, the default on CUDA (``W * M`` written by an elementwise pass, cuBLAS GEMMs,
  both weight-side gradients in one elementwise Triton pass over ``G``), and ``fused`` (``kernels/
  masked_matmul.py``'s matmuls apply the mask to the weight tiles in registers, so ``W * M``
  never reaches global memory);
* ``masked_linear_select(x, weight, scores, k, bias) -> (y, mask, w_eff, w_sign)``: the CPU
  training step's forward (what :func:`masked_linear` runs on the ``cpp`` backend). One kernel
  selects the threshold (:mod:`subkern.ops.topk_mask`'s sample-bracket select) and then, in a
  single pass over ``S`` and ``W``, writes the bool mask, ``W_eff = W * M`` and
  ``w_sign = W * sign(S)`` (NaN where ``S`` is +-0 or NaN, i.e. where ``sign(S) = 0``), then the
  GEMM. The last three outputs are not differentiable; autograd keeps ``w_eff`` and ``w_sign``
  for the backward ``masked_linear_select_backward(grad_y, x, weight, scores, mask, w_eff, w_sign,
  output_mask)``, which needs neither a second pass over ``W`` and ``M`` (``grad_x = grad_y @
  W_eff``) nor one over ``W`` and ``S``: ``grad_scores = G * w_sign``. That equals the reference's
  ``(G * W) * sign(S)`` bit for bit where ``sign(S) = +-1`` (a sign flip is exact and rounding is
  symmetric); where ``w_sign`` is NaN the kernel forms ``(G * W) * sign(S)`` from ``W`` and ``S``
  (so also ``sign(S) = 0`` with an overflowing ``G * W`` gives the reference's NaN). The C++
  kernel returns these buffers (and ``G`` / ``grad_x``) from a small pool of allocations that are
  handed out again once nothing refers to them, so a step faults in no fresh pages;
* ``masked_conv2d_with_mask(...)``: ``conv2d`` on ``W * M`` with torch's convolution backward and
  the fused ``masked_weight_grads`` epilogue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .library import LIB, has_kernel, qualname
from .matmul_strategy import matmul_strategy, requested_strategy, use_matmul_strategy
from .topk_mask import topk_mask_bool as _topk_mask_bool

__all__ = [
    "masked_linear",
    "masked_linear_with_mask",
    "masked_conv2d",
    "masked_conv2d_with_mask",
    "select_mask",
    "reference_masked_linear",
    "reference_masked_conv2d",
    "SUPPORTED_BACKENDS",
]

SUPPORTED_BACKENDS = ("reference", "cpp", "triton")
CONV_BACKENDS = ("reference", "cpp")

LIB.define("masked_linear(Tensor x, Tensor weight, Tensor scores, float k, Tensor? bias) -> Tensor")
LIB.define("masked_linear_with_mask(Tensor x, Tensor weight, Tensor scores, Tensor mask, "
           "Tensor? bias) -> Tensor")
LIB.define("masked_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores, "
           "Tensor mask, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
LIB.define("masked_weight_grads(Tensor grad_weff, Tensor weight, Tensor scores, Tensor mask, "
           "bool need_weight) -> (Tensor, Tensor)")
LIB.define("masked_linear_select(Tensor x, Tensor weight, Tensor scores, float k, Tensor? bias) "
           "-> (Tensor, Tensor, Tensor, Tensor)")
LIB.define("masked_linear_select_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores, "
           "Tensor mask, Tensor w_eff, Tensor w_sign, bool[3] output_mask) "
           "-> (Tensor, Tensor, Tensor)")
LIB.define("masked_conv2d(Tensor x, Tensor weight, Tensor scores, float k, Tensor? bias, "
           "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor")
LIB.define("masked_conv2d_with_mask(Tensor x, Tensor weight, Tensor scores, Tensor mask, "
           "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor")

_EMPTY_SHAPE = (0,)  # what a backward op returns for a gradient it was not asked for


# --------------------------------------------------------------------------------------------
# Selection and the reference (plain autograd on the official formulation)
# --------------------------------------------------------------------------------------------

def select_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Bool mask keeping the ``n - floor((1 - k) n)`` largest ``|scores|`` (not differentiable).

    :func:`subkern.ops.topk_mask.topk_mask` (radix select, the active backend's kernel), ties to
    the lower flat index, NaN ranked below every number.
    """
    return _topk_mask_bool(scores, k)


class _GetSubnet(torch.autograd.Function):
    """The official ``GetSubnet``: forward selects, backward is the identity (straight-through)."""

    @staticmethod
    def forward(abs_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(abs_scores.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _reference_effective_weight(weight: torch.Tensor, scores: torch.Tensor,
                                mask: torch.Tensor) -> torch.Tensor:
    return weight * _GetSubnet.apply(scores.abs(), mask)


def reference_masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, k: float,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: ``F.linear(x, W * GetSubnet(|S|, k), b)`` with the straight-through mask."""
    return F.linear(x, _reference_effective_weight(weight, scores, select_mask(scores, k)), bias)


def reference_masked_conv2d(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                            k: float, bias: torch.Tensor | None = None,
                            stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                            dilation: int | Sequence[int] = 1, groups: int = 1) -> torch.Tensor:
    """Ground truth: ``F.conv2d(x, W * GetSubnet(|S|, k), b, ...)`` (straight-through mask)."""
    w_eff = _reference_effective_weight(weight, scores, select_mask(scores, k))
    return F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# Reference kernels of the ops (CompositeExplicitAutograd: every device's default)
# --------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., last]`` as 2-D ``[rows, last]`` (also when ``last == 0``)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _effective_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight * mask.to(weight.dtype)


def _ref_linear_with_mask(x, weight, scores, mask, bias):
    return F.linear(x, _effective_weight(weight, mask), bias)


def _ref_weight_grads(grad_weff, weight, scores, mask, need_weight):
    grad_scores = grad_weff * weight * torch.sign(scores)
    if need_weight:
        grad_weight = grad_weff * mask.to(grad_weff.dtype)
    else:
        grad_weight = grad_weff.new_empty(_EMPTY_SHAPE)
    return grad_scores, grad_weight


def _ref_linear_backward(grad_y, x, weight, scores, mask, output_mask):
    need_x, need_s, need_w = output_mask
    grad_x = (grad_y @ _effective_weight(weight, mask) if need_x
              else x.new_empty(_EMPTY_SHAPE))
    if need_s or need_w:
        g2 = _rows(grad_y)
        grad_weff = g2.t() @ _rows(x)
        grad_scores, grad_weight = _ref_weight_grads(grad_weff, weight, scores, mask, need_w)
        if not need_s:
            grad_scores = grad_weff.new_empty(_EMPTY_SHAPE)
    else:
        grad_scores = weight.new_empty(_EMPTY_SHAPE)
        grad_weight = weight.new_empty(_EMPTY_SHAPE)
    return grad_x, grad_scores, grad_weight


def _signed_weight(weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``W * sign(S)`` where ``S`` is a nonzero number, NaN where ``S`` is +-0 or NaN."""
    sign = torch.sign(scores)
    nan = torch.full((), float("nan"), dtype=weight.dtype, device=weight.device)
    return torch.where(sign != 0, weight * sign, nan)


def _ref_linear_select(x, weight, scores, k, bias):
    mask = torch.ops.subkern.topk_mask_bool(scores.detach(), k)
    w_eff = _effective_weight(weight, mask)
    return F.linear(x, w_eff, bias), mask, w_eff, _signed_weight(weight, scores)


def _ref_select_backward(grad_y, x, weight, scores, mask, w_eff, w_sign, output_mask):
    # the ground truth from weight and scores (w_sign only lets the C++ kernel skip reading them)
    need_x = output_mask[0]
    grad_x = grad_y @ w_eff if need_x else x.new_empty(_EMPTY_SHAPE)
    _, grad_scores, grad_weight = _ref_linear_backward(grad_y, x, weight, scores, mask,
                                                       [False, *output_mask[1:]])
    return grad_x, grad_scores, grad_weight


def _ref_conv_with_mask(x, weight, scores, mask, bias, stride, padding, dilation, groups):
    return F.conv2d(x, _effective_weight(weight, mask), bias, stride, padding, dilation, groups)


def _linear_selecting(x, weight, scores, k, bias):
    return torch.ops.subkern.masked_linear_with_mask(x, weight, scores, select_mask(scores, k),
                                                     bias)


def _conv_selecting(x, weight, scores, k, bias, stride, padding, dilation, groups):
    return torch.ops.subkern.masked_conv2d_with_mask(x, weight, scores, select_mask(scores, k),
                                                     bias, stride, padding, dilation, groups)


LIB.impl("masked_linear", _linear_selecting, "CompositeImplicitAutograd")
LIB.impl("masked_conv2d", _conv_selecting, "CompositeImplicitAutograd")
LIB.impl("masked_linear_with_mask", _ref_linear_with_mask, "CompositeExplicitAutograd")
LIB.impl("masked_linear_backward", _ref_linear_backward, "CompositeExplicitAutograd")
LIB.impl("masked_weight_grads", _ref_weight_grads, "CompositeExplicitAutograd")
LIB.impl("masked_linear_select", _ref_linear_select, "CompositeExplicitAutograd")
LIB.impl("masked_linear_select_backward", _ref_select_backward, "CompositeExplicitAutograd")
LIB.impl("masked_conv2d_with_mask", _ref_conv_with_mask, "CompositeExplicitAutograd")


# --------------------------------------------------------------------------------------------
# Fake kernels (shapes only) for torch.compile / export
# --------------------------------------------------------------------------------------------

@torch.library.register_fake(qualname("masked_linear_with_mask"))
def _linear_fake(x, weight, scores, mask, bias):
    torch._check(weight.dim() == 2, lambda: "weight must be 2-D [out_features, in_features]")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x's last dim must be in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(qualname("masked_linear_backward"))
def _linear_backward_fake(grad_y, x, weight, scores, mask, output_mask):
    need_x, need_s, need_w = output_mask
    return (x.new_empty(x.shape if need_x else _EMPTY_SHAPE),
            weight.new_empty(weight.shape if need_s else _EMPTY_SHAPE),
            weight.new_empty(weight.shape if need_w else _EMPTY_SHAPE))


@torch.library.register_fake(qualname("masked_linear_select"))
def _linear_select_fake(x, weight, scores, k, bias):
    torch._check(weight.dim() == 2, lambda: "weight must be 2-D [out_features, in_features]")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x's last dim must be in_features")
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            weight.new_empty(weight.shape, dtype=torch.bool),
            weight.new_empty(weight.shape), weight.new_empty(weight.shape))


@torch.library.register_fake(qualname("masked_linear_select_backward"))
def _select_backward_fake(grad_y, x, weight, scores, mask, w_eff, w_sign, output_mask):
    return _linear_backward_fake(grad_y, x, weight, scores, mask, output_mask)


@torch.library.register_fake(qualname("masked_weight_grads"))
def _weight_grads_fake(grad_weff, weight, scores, mask, need_weight):
    return (weight.new_empty(weight.shape),
            weight.new_empty(weight.shape if need_weight else _EMPTY_SHAPE))


@torch.library.register_fake(qualname("masked_conv2d_with_mask"))
def _conv_fake(x, weight, scores, mask, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# Autograd of the mask-form ops
# --------------------------------------------------------------------------------------------

def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, scores, mask, bias = inputs
    ctx.save_for_backward(x, weight, scores, mask)
    ctx.has_bias = bias is not None
    # the backward runs on autograd's device thread on CUDA: it gets the forward's strategy
    ctx.strategy = requested_strategy() if x.device.type == "cuda" else "auto"


def _linear_backward(ctx, grad_y):
    x, weight, scores, mask = ctx.saved_tensors
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad
    grad_x = grad_scores = grad_weight = grad_bias = None
    if need_x or need_w or need_s:
        with use_matmul_strategy(ctx.strategy):
            gx, gs, gw = torch.ops.subkern.masked_linear_backward(
                grad_y, x, weight, scores, mask, [need_x, need_s, need_w])
        grad_x = gx if need_x else None
        grad_scores = gs if need_s else None
        grad_weight = gw if need_w else None
    if ctx.has_bias and need_b:
        grad_bias = _rows(grad_y).sum(0)
    return grad_x, grad_weight, grad_scores, None, grad_bias


torch.library.register_autograd(qualname("masked_linear_with_mask"), _linear_backward,
                                setup_context=_linear_setup_context)


def _select_setup_context(ctx, inputs, output) -> None:
    x, weight, scores, k, bias = inputs
    _, mask, w_eff, w_sign = output
    ctx.save_for_backward(x, weight, scores, mask, w_eff, w_sign)
    ctx.mark_non_differentiable(mask, w_eff, w_sign)
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None


def _select_backward(ctx, grad_y, grad_mask, grad_w_eff, grad_w_sign):
    x, weight, scores, mask, w_eff, w_sign = ctx.saved_tensors
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad
    if grad_y is None:
        return None, None, None, None, None
    grad_x = grad_scores = grad_weight = grad_bias = None
    if need_x or need_w or need_s:
        gx, gs, gw = torch.ops.subkern.masked_linear_select_backward(
            grad_y, x, weight, scores, mask, w_eff, w_sign, [need_x, need_s, need_w])
        grad_x = gx if need_x else None
        grad_scores = gs if need_s else None
        grad_weight = gw if need_w else None
    if ctx.has_bias and need_b:
        grad_bias = _rows(grad_y).sum(0)
    return grad_x, grad_weight, grad_scores, None, grad_bias


torch.library.register_autograd(qualname("masked_linear_select"), _select_backward,
                                setup_context=_select_setup_context)


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, scores, mask, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, scores, mask)
    ctx.has_bias = bias is not None
    ctx.conv = (list(stride), list(padding), list(dilation), groups)


def _conv_backward(ctx, grad_y):
    x, weight, scores, mask = ctx.saved_tensors
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad[:5]
    stride, padding, dilation, groups = ctx.conv
    w_eff = _effective_weight(weight, mask)
    need_weff = need_w or need_s
    bias_sizes = [weight.shape[0]] if ctx.has_bias else None
    gx, gweff, gb = torch.ops.aten.convolution_backward(
        grad_y, x, w_eff, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
        [need_x, need_weff, bool(ctx.has_bias and need_b)])
    grad_scores = grad_weight = None
    if need_weff:
        gs, gw = torch.ops.subkern.masked_weight_grads(gweff, weight, scores, mask, need_w)
        grad_scores = gs if need_s else None
        grad_weight = gw if need_w else None
    grad_bias = gb if ctx.has_bias and need_b else None
    return (gx if need_x else None, grad_weight, grad_scores, None, grad_bias,
            None, None, None, None)


torch.library.register_autograd(qualname("masked_conv2d_with_mask"), _conv_backward,
                                setup_context=_conv_setup_context)


# --------------------------------------------------------------------------------------------
# Triton (CUDA kernels of the mask-form ops; CPU tensors through the interpreter)
# --------------------------------------------------------------------------------------------

def _materialize(x: torch.Tensor) -> bool:
    """The materialize strategy, also for float64 on CUDA (the fused masked matmul does not
    compile for float64 there: Triton has no float64 MMA with these BLOCK_K)."""
    return (matmul_strategy(x.device) == "materialize"
            or (x.device.type == "cuda" and x.dtype == torch.float64))


def _triton_linear_with_mask(x, weight, scores, mask, bias):
    if _materialize(x):  # W * M, then torch's GEMM (cuBLAS); as the op's dtype, not autocast's
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight * mask, bias)
    from ..kernels import masked_matmul

    return masked_matmul.masked_linear_forward(x, weight, mask, bias)


def _triton_linear_backward(grad_y, x, weight, scores, mask, output_mask):
    from ..kernels import masked_matmul

    need = tuple(bool(v) for v in output_mask)
    if _materialize(x):
        with torch.autocast(x.device.type, enabled=False):
            return masked_matmul.materialized_linear_backward(grad_y, x, weight, scores, mask,
                                                              need)
    return masked_matmul.masked_linear_backward(grad_y, x, weight, scores, mask, need)


class _TritonMaskedLinear(torch.autograd.Function):
    """The mask-form op on the Triton kernels, for an explicit ``triton`` backend on any device."""

    @staticmethod
    def forward(ctx, x, weight, scores, mask, bias):
        ctx.save_for_backward(x, weight, scores, mask)
        ctx.has_bias = bias is not None
        ctx.strategy = requested_strategy()   # for the backward (possibly another thread)
        return _triton_linear_with_mask(x, weight, scores, mask, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, scores, mask = ctx.saved_tensors
        need_x, need_w, need_s, _, need_b = ctx.needs_input_grad
        gx = gs = gw = gb = None
        if need_x or need_w or need_s:
            with use_matmul_strategy(ctx.strategy):
                gx, gs, gw = _triton_linear_backward(grad_y.contiguous(), x, weight, scores,
                                                     mask, (need_x, need_s, need_w))
        if ctx.has_bias and need_b:
            gb = _rows(grad_y).sum(0)
        return (gx if need_x else None, gw if need_w else None, gs if need_s else None, None, gb)


def register_device_fallbacks() -> None:
    """Route CUDA tensors to Triton where ``_C`` brought no CUDA kernel (call after loading _C)."""
    if not _backend.triton_importable():
        return
    if not has_kernel("masked_linear_with_mask", "CUDA"):
        LIB.impl("masked_linear_with_mask", _triton_linear_with_mask, "CUDA")
    if not has_kernel("masked_linear_backward", "CUDA"):
        LIB.impl("masked_linear_backward", _triton_linear_backward, "CUDA")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_k(k: object) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a float in (0, 1] (the fraction of weights kept), got "
                        f"{type(k).__name__}")
    k = float(k)
    if not (0.0 < k <= 1.0) or math.isnan(k):
        raise ValueError(f"k must be in (0, 1] (the fraction of weights kept), got {k}")
    return k


def _check_tensor(name: str, t: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _check_weights(x: object, weight: object, scores: object, bias: object, weight_dim: int,
                   mask: object = None) -> None:
    x = _check_tensor("x", x)
    weight = _check_tensor("weight", weight, weight_dim)
    scores = _check_tensor("scores", scores)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32, "
                        f"float64), got {x.dtype}")
    if tuple(scores.shape) != tuple(weight.shape):
        raise ValueError(f"scores must have the shape of weight: weight {tuple(weight.shape)}, "
                         f"scores {tuple(scores.shape)}")
    named = [("weight", weight), ("scores", scores)]
    if bias is not None:
        bias = _check_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features), got "
                             f"{tuple(bias.shape)}")
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if mask is not None:
        mask = _check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, got "
                             f"{tuple(mask.shape)}")
        named.append(("mask", mask))
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"x and {name} must be on the same device, got {x.device} and "
                             f"{t.device}")


def _check_linear(x, weight, scores, bias, mask=None) -> None:
    _check_weights(x, weight, scores, bias, 2, mask)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must be in_features = {weight.shape[1]} "
                         f"(weight {tuple(weight.shape)}), got x {tuple(x.shape)}")


def _pair(name: str, value: int | Sequence[int]) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    values = list(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                   for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def _check_conv(x, weight, scores, bias, stride, padding, dilation, groups, mask=None):
    _check_weights(x, weight, scores, bias, 4, mask)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 4-D [N, C, H, W] (or 3-D unbatched), got {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if x.shape[-3] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[-3]} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    return _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _linear_dispatch(x, weight, scores, mask, bias):
    chosen = _backend.resolve("masked_linear_with_mask", x.device, SUPPORTED_BACKENDS)
    if chosen == "reference":
        return F.linear(x, _reference_effective_weight(weight, scores, mask), bias)
    if chosen == "triton" and x.device.type != "cuda":
        return _TritonMaskedLinear.apply(x, weight, scores, mask, bias)
    # cpp on CPU (the C++ kernel of the op), triton on CUDA (the op's CUDA kernel)
    return torch.ops.subkern.masked_linear_with_mask(x, weight, scores, mask, bias)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, k: float,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Edge-popup linear layer: ``x @ (W * M)^T + b``, ``M`` = the top-``k`` fraction of ``|S|``.

    ``x``: ``[..., in]``; ``weight``, ``scores``: ``[out, in]``; ``bias``: ``[out]`` or None; all
    of one floating dtype and device. Differentiable in ``x``, ``scores`` (straight-through:
    ``dL/dW_eff * W * sign(S)``), ``weight`` (``dL/dW_eff * M``, only computed when it requires
    grad) and ``bias``.
    """
    _check_linear(x, weight, scores, bias)
    k = _check_k(k)
    chosen = _backend.resolve("masked_linear_with_mask", x.device, SUPPORTED_BACKENDS)
    if chosen == "reference":
        return reference_masked_linear(x, weight, scores, k, bias)
    if chosen == "cpp":  # selection, mask and W * M in one kernel; W * M kept for the backward
        return torch.ops.subkern.masked_linear_select(x, weight, scores, k, bias)[0]
    return _linear_dispatch(x, weight, scores, select_mask(scores, k), bias)


def masked_linear_with_mask(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                            mask: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`masked_linear` with the mask already selected (bool, shape of ``weight``).

    For layers that select all masks of a model in one batched call; the gradients are the same
    (``scores`` only enter the backward, through ``sign(scores)``).
    """
    _check_linear(x, weight, scores, bias, mask)
    return _linear_dispatch(x, weight, scores, mask, bias)


def _conv_dispatch(x, weight, scores, mask, bias, stride, padding, dilation, groups):
    if x.dim() == 3:  # unbatched [C, H, W]: the ops take [N, C, H, W]
        return _conv_dispatch(x.unsqueeze(0), weight, scores, mask, bias, stride, padding,
                              dilation, groups).squeeze(0)
    # the conv itself is torch's; the C++ part is the fused weight-gradient epilogue
    chosen = _backend.resolve("masked_weight_grads", x.device, CONV_BACKENDS)
    if chosen == "reference":
        return F.conv2d(x, _reference_effective_weight(weight, scores, mask), bias, stride,
                        padding, dilation, groups)
    return torch.ops.subkern.masked_conv2d_with_mask(x, weight, scores, mask, bias, stride,
                                                     padding, dilation, groups)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, k: float,
                  bias: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                  padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                  groups: int = 1) -> torch.Tensor:
    """Edge-popup conv layer: ``conv2d(x, W * M, b, stride, padding, dilation, groups)``.

    ``weight``, ``scores``: ``[out, in / groups, kh, kw]``; gradients as :func:`masked_linear`
    (``dL/dW_eff`` from torch's convolution backward, then the fused weight-gradient epilogue).
    """
    stride, padding, dilation = _check_conv(x, weight, scores, bias, stride, padding, dilation,
                                            groups)
    k = _check_k(k)
    return _conv_dispatch(x, weight, scores, select_mask(scores, k), bias, stride, padding,
                          dilation, groups)


def masked_conv2d_with_mask(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                            mask: torch.Tensor, bias: torch.Tensor | None = None,
                            stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                            dilation: int | Sequence[int] = 1, groups: int = 1) -> torch.Tensor:
    """:func:`masked_conv2d` with the mask already selected (bool, shape of ``weight``)."""
    stride, padding, dilation = _check_conv(x, weight, scores, bias, stride, padding, dilation,
                                            groups, mask)
    return _conv_dispatch(x, weight, scores, mask, bias, stride, padding, dilation, groups)
