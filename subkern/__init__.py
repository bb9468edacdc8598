"""subkern: fused kernels for sparse, masked and binary neural networks.

Binary retrieval (this release): :func:`pack_bits`, :func:`unpack_bits`, :func:`hamming_distance`,
:func:`hamming_topk` and :class:`BinaryIndex`. Every op has a torch reference, a C++ CPU kernel, a
Triton kernel and a CUDA kernel; :func:`use_backend` / ``SUBKERN_BACKEND`` choose among them.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (defines the op schemas and loads subkern._C)
from .backend import BackendUnavailableError, get_backend, use_backend
from .ops.binary import hamming_distance, hamming_topk, pack_bits, unpack_bits
from .retrieval import BinaryIndex, IndexFormatError, sharded_range_search, sharded_search
from .version import __version__

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "get_backend",
    "use_backend",
    "pack_bits",
    "unpack_bits",
    "hamming_distance",
    "hamming_topk",
    "BinaryIndex",
    "IndexFormatError",
    "sharded_search",
    "sharded_range_search",
]
