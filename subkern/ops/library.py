"""The ``subkern`` operator library: schemas are defined here, in Python (torchao style).

C++ files only implement (``TORCH_LIBRARY_IMPL(subkern, CPU/CUDA, m)``); every op also gets a
reference kernel (``CompositeExplicitAutograd``) and a fake implementation so that
``torch.compile(fullgraph=True)`` and ``torch.export`` see through it.
"""

from __future__ import annotations

import torch

NAMESPACE = "subkern"

LIB = torch.library.Library(NAMESPACE, "DEF")


def qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether a kernel (from ``_C`` or Python) is registered for ``op`` under ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), dispatch_key)
