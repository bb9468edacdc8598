"""subkern: fused kernels for sparse, masked and binary neural networks.

* Binary retrieval: :func:`pack_bits`, :func:`unpack_bits`, :func:`hamming_distance`,
  :func:`hamming_topk`, :class:`BinaryIndex`, sharded search.
* Edge-popup: :func:`topk_mask`, :func:`topk_threshold`, :func:`topk_mask_batched`,
  :func:`masked_linear`, :func:`masked_conv2d`; bit-packed supermask inference with
  :func:`ternary_linear` and :mod:`subkern.deploy`.

Every op has a torch reference, a C++ CPU kernel, a Triton kernel and, where it wins, a CUDA
kernel; :func:`use_backend` / ``SUBKERN_BACKEND`` choose among them.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (first: defines the op schemas and loads subkern._C)

# isort: split
from . import deploy, nn
from .backend import BackendUnavailableError, get_backend, use_backend
from .ops.binary import hamming_distance, hamming_topk, pack_bits, unpack_bits
from .ops.masked import masked_conv2d, masked_linear
from .ops.matmul_strategy import use_matmul_strategy
from .ops.soft_threshold import soft_threshold, soft_threshold_conv2d, soft_threshold_linear
from .ops.sparse_linear import (
    bitmap_linear,
    choose_format,
    csr_linear,
    csr_matmul,
    pack_bitmap,
    pack_csr,
    unpack_bitmap,
    unpack_csr,
)
from .ops.ternary import (
    pack_ternary,
    ternary_linear,
    ternary_linear_prepacked,
    ternary_prepack,
    unpack_ternary,
)
from .ops.topk_mask import (
    kept_count,
    topk_mask,
    topk_mask_batched,
    topk_mask_bool,
    topk_threshold,
)
from .retrieval import BinaryIndex, IndexFormatError, sharded_range_search, sharded_search
from .sparsify import (
    EdgePopupConfig,
    SparsifyConfig,
    STRConfig,
    get_config,
    register_method,
    sparsify_,
)
from .version import __version__

__all__ = [
    "__version__",
    "deploy",
    "nn",
    "BackendUnavailableError",
    "get_backend",
    "use_backend",
    "use_matmul_strategy",
    "pack_bits",
    "unpack_bits",
    "hamming_distance",
    "hamming_topk",
    "BinaryIndex",
    "IndexFormatError",
    "sharded_search",
    "sharded_range_search",
    "topk_mask",
    "topk_threshold",
    "topk_mask_batched",
    "topk_mask_bool",
    "kept_count",
    "masked_linear",
    "masked_conv2d",
    "ternary_linear",
    "ternary_linear_prepacked",
    "ternary_prepack",
    "pack_ternary",
    "unpack_ternary",
    "soft_threshold",
    "soft_threshold_linear",
    "soft_threshold_conv2d",
    "STRConfig",
    "csr_linear",
    "csr_matmul",
    "bitmap_linear",
    "pack_csr",
    "unpack_csr",
    "pack_bitmap",
    "unpack_bitmap",
    "choose_format",
    "sparsify_",
    "SparsifyConfig",
    "EdgePopupConfig",
    "register_method",
    "get_config",
]
