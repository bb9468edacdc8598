"""Op families. Importing this package defines every op's schema, reference and fake kernels,
then loads ``subkern._C`` (which overrides the CPU/CUDA kernels) and fills device fallbacks."""

from __future__ import annotations

from .. import _ext
from . import binary, masked, soft_threshold, sparse_linear, ternary, topk_mask

_ext.extension()
binary.register_device_fallbacks()
topk_mask.register_device_fallbacks()
masked.register_device_fallbacks()
ternary.register_device_fallbacks()
soft_threshold.register_device_fallbacks()
sparse_linear.register_device_fallbacks()

#: op name -> the backends that implement it (for ``subkern info`` and the backend resolver).
OPS: dict[str, tuple[str, ...]] = {
    "hamming_distance": binary.SUPPORTED_BACKENDS,
    "hamming_topk": binary.SUPPORTED_BACKENDS,
    "topk_mask": topk_mask.SUPPORTED_BACKENDS,
    "topk_threshold": topk_mask.SUPPORTED_BACKENDS,
    "topk_mask_batched": topk_mask.SUPPORTED_BACKENDS,
    "topk_mask_bool": topk_mask.SUPPORTED_BACKENDS,
    "masked_linear_select": ("reference", "cpp"),
    "masked_linear_select_backward": ("reference", "cpp"),
    "masked_linear_with_mask": masked.SUPPORTED_BACKENDS,
    "masked_linear_backward": masked.SUPPORTED_BACKENDS,
    "masked_conv2d_with_mask": masked.CONV_BACKENDS,
    "masked_weight_grads": masked.CONV_BACKENDS,
    "ternary_linear": ternary.SUPPORTED_BACKENDS,
    "ternary_linear_prepacked": ternary.PREPACKED_BACKENDS,
    "ternary_prepack": ("reference",),
    "soft_threshold": soft_threshold.ELEMENTWISE_BACKENDS,
    "soft_threshold_grads": soft_threshold.ELEMENTWISE_BACKENDS,
    "soft_threshold_linear": soft_threshold.SUPPORTED_BACKENDS,
    "soft_threshold_linear_backward": soft_threshold.SUPPORTED_BACKENDS,
    "soft_threshold_conv2d": soft_threshold.ELEMENTWISE_BACKENDS,
    "csr_linear": sparse_linear.SUPPORTED_BACKENDS,
    "csr_matmul": sparse_linear.MATMUL_BACKENDS,
    "bitmap_linear": sparse_linear.BITMAP_BACKENDS,
}

__all__ = ["OPS", "binary", "masked", "soft_threshold", "sparse_linear", "ternary",
           "topk_mask"]
