"""STR's soft-threshold reparameterization and its fused linear / conv2d layers.

STR ("Soft Threshold Weight Reparameterization for Learnable Sparsity", Kusupati et al., ICML
2020) trains a dense weight ``W`` and a threshold parameter ``s`` per layer (or per output
channel) and applies the effective weight

    W_eff = sign(W) * relu(|W| - g(s)),        g = sigmoid,

so every weight with ``|W| <= g(s)`` is exactly zero and the layer's sparsity is learned through
``s`` (which shares the weight decay). With ``G = dL/dW_eff`` and ``keep = 1[|W| > g(s)]`` the
gradients autograd gives on that formula are

* ``dL/dW = G * keep``
* ``dL/ds = -g'(s) * sum(G * sign(W) * keep)``   (summed over the elements that ``s`` covers:
  the whole layer for a per-layer ``s``, one output channel's weights for a per-channel ``s``),
  ``g'(s) = g(s) (1 - g(s))``.

For ``float16`` / ``bfloat16`` weights the threshold math runs in ``float32`` (``float64`` for
``float64`` weights) and ``W_eff`` is rounded once to the weight's dtype; ``s`` may have the
weight's dtype or be ``float32``.

Ops (schemas in the ``subkern`` library, each with a reference kernel, a fake kernel and
autograd):

* ``soft_threshold(weight, s)``: ``W_eff``; its backward is ``soft_threshold_grads``;
* ``soft_threshold_grads(grad_weff, weight, s, need_weight, need_s) -> (grad_weight, grad_s)``:
  the fused weight-gradient epilogue (one pass over ``G`` and ``W``);
* ``soft_threshold_linear(x, weight, s, bias)``: ``x W_eff^T + b`` with backward
  ``soft_threshold_linear_backward(grad_y, x, weight, s, output_mask) -> (grad_x, grad_weight,
  grad_s)``. The C++ CPU kernels (``csrc/cpu/soft_threshold.cpp``) build ``W_eff`` in one
  multithreaded pass into a reused buffer and call the BLAS GEMM; the backward computes
  ``G = grad_y^T x`` and then in one pass writes ``grad_weight`` over ``G``, the per-row partial
  sums of ``grad_s`` and (for ``grad_x``) ``W_eff`` again. The Triton backend (the CUDA path)
  has two strategies (:mod:`subkern.ops.matmul_strategy`): ``materialize``, the default on CUDA
  (``W_eff`` written by the elementwise kernel, cuBLAS GEMMs, the gradient epilogue as one
  elementwise pass over ``G``), and ``fused`` (``kernels/soft_threshold.py``'s matmuls apply
  the threshold to the weight tiles in registers, so ``W_eff`` never reaches global memory, and
  run the same epilogue on the tiles of ``G``);
* ``soft_threshold_conv2d(x, weight, s, bias, stride, padding, dilation, groups)``: ``conv2d`` on
  ``W_eff`` (torch's convolution, forward and backward) with the fused threshold build and
  gradient epilogue.

The reference formulation (:func:`reference_soft_threshold`, plain autograd on the formula
above) is the ground truth of the tests. There is no CUDA C++ kernel: the Triton kernels are the
GPU path (a hand-written CUDA version would have to beat them, which could not be measured where
this was written). On CUDA, ``soft_threshold`` and ``soft_threshold_grads`` (and so the conv's
threshold passes) run Triton elementwise kernels; the convolution is cuDNN's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .library import LIB, has_kernel, qualname
from .matmul_strategy import matmul_strategy, requested_strategy, use_matmul_strategy

__all__ = [
    "soft_threshold",
    "soft_threshold_linear",
    "soft_threshold_conv2d",
    "reference_soft_threshold",
    "reference_soft_threshold_linear",
    "reference_soft_threshold_conv2d",
    "SUPPORTED_BACKENDS",
    "ELEMENTWISE_BACKENDS",
]

#: backends of ``soft_threshold_linear`` / ``soft_threshold_linear_backward``
SUPPORTED_BACKENDS = ("reference", "cpp", "triton")
#: backends of ``soft_threshold``, ``soft_threshold_grads`` and ``soft_threshold_conv2d``
ELEMENTWISE_BACKENDS = ("reference", "cpp", "triton")

LIB.define("soft_threshold(Tensor weight, Tensor s) -> Tensor")
LIB.define("soft_threshold_grads(Tensor grad_weff, Tensor weight, Tensor s, bool need_weight, "
           "bool need_s) -> (Tensor, Tensor)")
LIB.define("soft_threshold_linear(Tensor x, Tensor weight, Tensor s, Tensor? bias) -> Tensor")
LIB.define("soft_threshold_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor s, "
           "bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
LIB.define("soft_threshold_conv2d(Tensor x, Tensor weight, Tensor s, Tensor? bias, "
           "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor")

_EMPTY_SHAPE = (0,)  # what a backward op returns for a gradient it was not asked for


# --------------------------------------------------------------------------------------------
# The reference formulation (plain autograd) and the threshold helpers
# --------------------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the threshold math runs in: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_element(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s`` shaped to broadcast against ``weight``: ``[]`` (per layer) or ``[out, 1, ...]``."""
    if s.numel() == 1:
        return s.reshape(())
    return s.reshape(weight.shape[0], *([1] * (weight.dim() - 1)))


def threshold(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``g(s) = sigmoid(s)`` in the compute dtype, shaped to broadcast against ``weight``."""
    return torch.sigmoid(_per_element(weight, s).to(compute_dtype(weight.dtype)))


def reference_soft_threshold(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Ground truth: ``sign(W) * relu(|W| - sigmoid(s))`` by plain autograd (STR's formula).

    ``s``: one element (per layer) or ``out_channels`` elements (per output channel). The math
    runs in :func:`compute_dtype`; the result has the weight's dtype.
    """
    w = weight.to(compute_dtype(weight.dtype))
    return (torch.sign(w) * torch.relu(w.abs() - threshold(weight, s))).to(weight.dtype)


def reference_soft_threshold_linear(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor,
                                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: ``F.linear(x, reference_soft_threshold(W, s), b)``."""
    return F.linear(x, reference_soft_threshold(weight, s), bias)


def reference_soft_threshold_conv2d(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor,
                                    bias: torch.Tensor | None = None,
                                    stride: int | Sequence[int] = 1,
                                    padding: int | Sequence[int] = 0,
                                    dilation: int | Sequence[int] = 1,
                                    groups: int = 1) -> torch.Tensor:
    """Ground truth: ``F.conv2d(x, reference_soft_threshold(W, s), b, ...)``."""
    return F.conv2d(x, reference_soft_threshold(weight, s), bias, stride, padding, dilation,
                    groups)


# --------------------------------------------------------------------------------------------
# Reference kernels of the ops (CompositeExplicitAutograd: every device's default)
# --------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., last]`` as 2-D ``[rows, last]`` (also when ``last == 0``)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _ref_soft_threshold(weight, s):
    return reference_soft_threshold(weight, s)   # a fresh tensor (never aliases weight)


def _ref_grads(grad_weff, weight, s, need_weight, need_s):
    acc = compute_dtype(weight.dtype)
    g = threshold(weight, s)
    keep = weight.to(acc).abs() > g
    if need_weight:
        grad_weight = torch.where(keep, grad_weff, torch.zeros((), dtype=grad_weff.dtype,
                                                               device=grad_weff.device))
    else:
        grad_weight = weight.new_empty(_EMPTY_SHAPE)
    if need_s:
        signed = torch.where(keep, grad_weff.to(acc) * torch.sign(weight.to(acc)),
                             torch.zeros((), dtype=acc, device=weight.device))
        if s.numel() == 1:
            total = signed.sum()
        else:
            per_row = signed.flatten(1).sum(1) if signed.dim() > 1 else signed
            total = per_row.reshape(g.shape)
        grad_s = (-total * (g * (1 - g))).to(s.dtype).reshape(s.shape)
    else:
        grad_s = s.new_empty(_EMPTY_SHAPE)
    return grad_weight, grad_s


def _ref_linear(x, weight, s, bias):
    return F.linear(x, reference_soft_threshold(weight, s), bias)


def _ref_linear_backward(grad_y, x, weight, s, output_mask):
    need_x, need_w, need_s = output_mask
    w_eff = reference_soft_threshold(weight, s)
    grad_x = grad_y @ w_eff if need_x else x.new_empty(_EMPTY_SHAPE)
    if need_w or need_s:
        grad_weff = _rows(grad_y).t() @ _rows(x)
        grad_w, grad_s = _ref_grads(grad_weff, weight, s, need_w, need_s)
    else:
        grad_w, grad_s = weight.new_empty(_EMPTY_SHAPE), s.new_empty(_EMPTY_SHAPE)
    return grad_x, grad_w, grad_s


def _composite_conv(x, weight, s, bias, stride, padding, dilation, groups):
    w_eff = torch.ops.subkern.soft_threshold(weight, s)
    return F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)


LIB.impl("soft_threshold", _ref_soft_threshold, "CompositeExplicitAutograd")
LIB.impl("soft_threshold_grads", _ref_grads, "CompositeExplicitAutograd")
LIB.impl("soft_threshold_linear", _ref_linear, "CompositeExplicitAutograd")
LIB.impl("soft_threshold_linear_backward", _ref_linear_backward, "CompositeExplicitAutograd")
LIB.impl("soft_threshold_conv2d", _composite_conv, "CompositeExplicitAutograd")


# --------------------------------------------------------------------------------------------
# Fake kernels (shapes only) for torch.compile / export
# --------------------------------------------------------------------------------------------

@torch.library.register_fake(qualname("soft_threshold"))
def _soft_threshold_fake(weight, s):
    return weight.new_empty(weight.shape)


@torch.library.register_fake(qualname("soft_threshold_grads"))
def _grads_fake(grad_weff, weight, s, need_weight, need_s):
    return (weight.new_empty(weight.shape if need_weight else _EMPTY_SHAPE),
            s.new_empty(s.shape if need_s else _EMPTY_SHAPE))


@torch.library.register_fake(qualname("soft_threshold_linear"))
def _linear_fake(x, weight, s, bias):
    torch._check(weight.dim() == 2, lambda: "weight must be 2-D [out_features, in_features]")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x's last dim must be in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(qualname("soft_threshold_linear_backward"))
def _linear_backward_fake(grad_y, x, weight, s, output_mask):
    need_x, need_w, need_s = output_mask
    return (x.new_empty(x.shape if need_x else _EMPTY_SHAPE),
            weight.new_empty(weight.shape if need_w else _EMPTY_SHAPE),
            s.new_empty(s.shape if need_s else _EMPTY_SHAPE))


@torch.library.register_fake(qualname("soft_threshold_conv2d"))
def _conv_fake(x, weight, s, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

def _st_setup_context(ctx, inputs, output) -> None:
    weight, s = inputs
    ctx.save_for_backward(weight, s)


def _st_backward(ctx, grad):
    weight, s = ctx.saved_tensors
    need_w, need_s = ctx.needs_input_grad
    if not (need_w or need_s):
        return None, None
    gw, gs = torch.ops.subkern.soft_threshold_grads(grad, weight, s, need_w, need_s)
    return (gw if need_w else None), (gs if need_s else None)


torch.library.register_autograd(qualname("soft_threshold"), _st_backward,
                                setup_context=_st_setup_context)


def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, s, bias = inputs
    ctx.save_for_backward(x, weight, s)
    ctx.has_bias = bias is not None
    # the backward runs on autograd's device thread on CUDA: it gets the forward's strategy
    ctx.strategy = requested_strategy() if x.device.type == "cuda" else "auto"


def _linear_backward(ctx, grad_y):
    x, weight, s = ctx.saved_tensors
    need_x, need_w, need_s, need_b = ctx.needs_input_grad
    gx = gw = gs = gb = None
    if need_x or need_w or need_s:
        with use_matmul_strategy(ctx.strategy):
            gx, gw, gs = torch.ops.subkern.soft_threshold_linear_backward(
                grad_y, x, weight, s, [need_x, need_w, need_s])
    if ctx.has_bias and need_b:
        gb = _rows(grad_y).sum(0)
    return (gx if need_x else None, gw if need_w else None, gs if need_s else None, gb)


torch.library.register_autograd(qualname("soft_threshold_linear"), _linear_backward,
                                setup_context=_linear_setup_context)


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, s, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, s)
    ctx.has_bias = bias is not None
    ctx.conv = (list(stride), list(padding), list(dilation), groups)


def _conv_backward(ctx, grad_y):
    x, weight, s = ctx.saved_tensors
    need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
    stride, padding, dilation, groups = ctx.conv
    w_eff = torch.ops.subkern.soft_threshold(weight, s)  # rebuilt: no copy kept between passes
    need_weff = need_w or need_s
    bias_sizes = [weight.shape[0]] if ctx.has_bias else None
    gx, gweff, gb = torch.ops.aten.convolution_backward(
        grad_y, x, w_eff, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
        [need_x, need_weff, bool(ctx.has_bias and need_b)])
    gw = gs = None
    if need_weff:
        gw, gs = torch.ops.subkern.soft_threshold_grads(gweff, weight, s, need_w, need_s)
    return (gx if need_x else None, gw if need_w else None, gs if need_s else None,
            gb if ctx.has_bias and need_b else None, None, None, None, None)


torch.library.register_autograd(qualname("soft_threshold_conv2d"), _conv_backward,
                                setup_context=_conv_setup_context)


# --------------------------------------------------------------------------------------------
# Triton (CUDA kernels of the linear ops; CPU tensors through the interpreter)
# --------------------------------------------------------------------------------------------

def _triton_linear(x, weight, s, bias):
    from ..kernels import soft_threshold as kern

    if matmul_strategy(x.device) == "materialize":  # W_eff, then torch's GEMM (cuBLAS)
        with torch.autocast(x.device.type, enabled=False):   # the op's dtype, not autocast's
            return F.linear(x, kern.soft_threshold_forward(weight, s), bias)
    return kern.soft_threshold_linear_forward(x, weight, threshold(weight, s).reshape(-1), bias)


def _triton_linear_backward(grad_y, x, weight, s, output_mask):
    from ..kernels import soft_threshold as kern

    need = tuple(bool(v) for v in output_mask)
    if matmul_strategy(x.device) == "materialize":
        with torch.autocast(x.device.type, enabled=False):
            return kern.materialized_linear_backward(grad_y, x, weight, s, need)
    return kern.soft_threshold_linear_backward(grad_y, x, weight, s, need)


class _TritonSoftThresholdLinear(torch.autograd.Function):
    """The linear op on the Triton kernels, for an explicit ``triton`` backend on any device."""

    @staticmethod
    def forward(ctx, x, weight, s, bias):
        ctx.save_for_backward(x, weight, s)
        ctx.has_bias = bias is not None
        ctx.strategy = requested_strategy()   # for the backward (possibly another thread)
        return _triton_linear(x, weight, s, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, s = ctx.saved_tensors
        need_x, need_w, need_s, need_b = ctx.needs_input_grad
        gx = gw = gs = gb = None
        if need_x or need_w or need_s:
            with use_matmul_strategy(ctx.strategy):
                gx, gw, gs = _triton_linear_backward(grad_y.contiguous(), x, weight, s,
                                                     (need_x, need_w, need_s))
        if ctx.has_bias and need_b:
            gb = _rows(grad_y).sum(0)
        return (gx if need_x else None, gw if need_w else None, gs if need_s else None, gb)


class _TritonSoftThreshold(torch.autograd.Function):
    """``soft_threshold`` on the Triton elementwise kernels, for an explicit ``triton`` backend
    on any device (the conv layer applies torch's convolution to its output)."""

    @staticmethod
    def forward(ctx, weight, s):
        from ..kernels import soft_threshold as kern

        ctx.save_for_backward(weight, s)
        return kern.soft_threshold_forward(weight, s)

    @staticmethod
    def backward(ctx, grad):
        from ..kernels import soft_threshold as kern

        weight, s = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad
        if not (need_w or need_s):
            return None, None
        gw, gs = kern.soft_threshold_grads(grad, weight, s, need_w, need_s)
        return (gw if need_w else None), (gs if need_s else None)


def _triton_soft_threshold(weight, s):
    from ..kernels import soft_threshold as kern

    return kern.soft_threshold_forward(weight, s)


def _triton_grads(grad_weff, weight, s, need_weight, need_s):
    from ..kernels import soft_threshold as kern

    return kern.soft_threshold_grads(grad_weff, weight, s, need_weight, need_s)


def register_device_fallbacks() -> None:
    """Route CUDA tensors to Triton where ``_C`` brought no CUDA kernel (call after loading _C)."""
    if not _backend.triton_importable():
        return
    if not has_kernel("soft_threshold", "CUDA"):
        LIB.impl("soft_threshold", _triton_soft_threshold, "CUDA")
    if not has_kernel("soft_threshold_grads", "CUDA"):
        LIB.impl("soft_threshold_grads", _triton_grads, "CUDA")
    if not has_kernel("soft_threshold_linear", "CUDA"):
        LIB.impl("soft_threshold_linear", _triton_linear, "CUDA")
    if not has_kernel("soft_threshold_linear_backward", "CUDA"):
        LIB.impl("soft_threshold_linear_backward", _triton_linear_backward, "CUDA")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _check_weight_s(weight: object, s: object, weight_dim: int | None = None) -> None:
    weight = _check_tensor("weight", weight, weight_dim)
    s = _check_tensor("s", s)
    if weight.dim() < 1:
        raise ValueError("weight must have at least one dimension [out_channels, ...]")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating-point tensor (float16, bfloat16, float32, "
                        f"float64), got {weight.dtype}")
    if s.dtype not in (weight.dtype, torch.float32):
        raise TypeError(f"s must have the weight's dtype ({weight.dtype}) or float32, got "
                        f"{s.dtype}")
    out = weight.shape[0]
    per_layer = s.numel() == 1
    per_channel = (s.numel() == out and s.dim() >= 1 and s.shape[0] == out
                   and all(d == 1 for d in s.shape[1:]))
    if not (per_layer or per_channel):
        raise ValueError(f"s must have one element (a per-layer threshold) or out_channels = "
                         f"{out} elements, shape ({out},) or ({out}, 1, ...) (per output "
                         f"channel); got shape {tuple(s.shape)}")
    if s.device != weight.device:
        raise ValueError(f"weight and s must be on the same device, got {weight.device} and "
                         f"{s.device}")


def _check_layer(x: object, weight: torch.Tensor, s: torch.Tensor, bias: object,
                 weight_dim: int) -> None:
    x = _check_tensor("x", x)
    _check_weight_s(weight, s, weight_dim)
    if x.dtype != weight.dtype:
        raise TypeError(f"x must have the weight's dtype ({weight.dtype}), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on the same device, got {x.device} and "
                         f"{weight.device}")
    if bias is not None:
        bias = _check_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_channels), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"x and bias must be on the same device, got {x.device} and "
                             f"{bias.device}")


def _pair(name: str, value: int | Sequence[int]) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    values = list(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                   for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def soft_threshold(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STR's effective weight ``sign(W) * relu(|W| - sigmoid(s))``.

    Args:
        weight: ``[out_channels, ...]``, float16 / bfloat16 / float32 / float64.
        s: the threshold parameter, one element (per layer: shape ``[]`` or ``[1]``) or
            ``out_channels`` elements (per output channel: ``[out]`` or ``[out, 1, ...]``);
            the weight's dtype or float32.

    Differentiable in both: ``dL/dW = G * 1[|W| > g]``, ``dL/ds = -g'(s) sum(G sign(W)
    1[|W| > g])`` (``g = sigmoid``, ``G = dL/dW_eff``).
    """
    _check_weight_s(weight, s)
    chosen = _backend.resolve("soft_threshold", weight.device, ELEMENTWISE_BACKENDS)
    if chosen == "reference":
        return reference_soft_threshold(weight, s)
    if chosen == "triton" and weight.device.type != "cuda":
        return _TritonSoftThreshold.apply(weight, s)
    # cpp on CPU (the C++ kernel of the op), triton on CUDA (the op's CUDA kernel)
    return torch.ops.subkern.soft_threshold(weight, s)


def soft_threshold_linear(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """STR linear layer: ``x @ soft_threshold(W, s)^T + b``.

    ``x``: ``[..., in]``; ``weight``: ``[out, in]``; ``s`` as :func:`soft_threshold`;
    ``bias``: ``[out]`` or None; one dtype and device. Differentiable in ``x``, ``weight``,
    ``s`` and ``bias`` (gradients equal to autograd on :func:`reference_soft_threshold_linear`).
    """
    _check_layer(x, weight, s, bias, 2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must be in_features = {weight.shape[1]} "
                         f"(weight {tuple(weight.shape)}), got x {tuple(x.shape)}")
    chosen = _backend.resolve("soft_threshold_linear", x.device, SUPPORTED_BACKENDS)
    if chosen == "reference":
        return reference_soft_threshold_linear(x, weight, s, bias)
    if chosen == "triton" and x.device.type != "cuda":
        return _TritonSoftThresholdLinear.apply(x, weight, s, bias)
    # cpp on CPU (the C++ kernel of the op), triton on CUDA (the op's CUDA kernel)
    return torch.ops.subkern.soft_threshold_linear(x, weight, s, bias)


def soft_threshold_conv2d(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor,
                          bias: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                          padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                          groups: int = 1) -> torch.Tensor:
    """STR conv layer: ``conv2d(x, soft_threshold(W, s), b, stride, padding, dilation, groups)``.

    ``weight``: ``[out, in / groups, kh, kw]``; ``x``: ``[N, in, H, W]`` or unbatched
    ``[in, H, W]``; ``s`` as :func:`soft_threshold`. The convolution is torch's; the threshold
    build and the gradient epilogue are the fused ops.
    """
    _check_layer(x, weight, s, bias, 4)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 4-D [N, C, H, W] (or 3-D unbatched), got {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if x.shape[-3] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[-3]} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    stride, padding, dilation = (_pair("stride", stride), _pair("padding", padding),
                                 _pair("dilation", dilation))
    # the conv itself is torch's: the backend choice is that of the fused elementwise ops
    chosen = _backend.resolve("soft_threshold_grads", x.device, ELEMENTWISE_BACKENDS)
    if chosen == "reference":
        return reference_soft_threshold_conv2d(x, weight, s, bias, stride, padding, dilation,
                                               groups)
    if chosen == "triton" and x.device.type != "cuda":
        return F.conv2d(x, _TritonSoftThreshold.apply(weight, s), bias, stride, padding,
                        dilation, groups)
    if x.dim() == 3:  # unbatched [C, H, W]: the op takes [N, C, H, W]
        return torch.ops.subkern.soft_threshold_conv2d(x.unsqueeze(0), weight, s, bias, stride,
                                                       padding, dilation, groups).squeeze(0)
    return torch.ops.subkern.soft_threshold_conv2d(x, weight, s, bias, stride, padding,
                                                   dilation, groups)
