"""Op families. Importing this package defines every op's schema, reference and fake kernels,
then loads ``subkern._C`` (which overrides the CPU/CUDA kernels) and fills device fallbacks."""

from __future__ import annotations

from .. import _ext
from . import binary

_ext.extension()
binary.register_device_fallbacks()

#: op name -> the backends that implement it (for ``subkern info`` and the backend resolver).
OPS: dict[str, tuple[str, ...]] = {
    "hamming_distance": binary.SUPPORTED_BACKENDS,
    "hamming_topk": binary.SUPPORTED_BACKENDS,
}

__all__ = ["OPS", "binary"]
