"""Permuted-chunk layout: the batch-1 ``csr_linear`` product without most of its gathers (AVX-512).

The CSR kernel (:func:`subkern.ops.sparse_linear.csr_linear`) fetches ``x`` with one AVX-512
gather per 16 nonzeros, about ten cycles each on a Sapphire/Emerald Rapids core while ``x`` sits
in L1: at batch 1 a 90 %-sparse BERT-size layer is bound by its gathers, not by memory. This
layout replaces most of them by register permutes: output rows in blocks of 16 (one per zmm
lane), inputs in chunks of 32 held in two registers; for each (block, chunk) ``S`` slots hold, per
row, the column (5 bits, one byte) and value of its first ``S`` nonzeros in the chunk, so one
``vpermt2ps`` + one FMA handles 16 rows' nonzeros. Nonzeros past the first ``S`` of their
(row, chunk) form a residual CSR, multiplied with gathers. ``S`` (a multiple of 4) is chosen per
weight by a cost model; where it predicts no gain (very sparse or memory-bound layers: padding
costs bytes) the CSR kernel keeps the layer. The exact format is in
``csrc/cpu/sparse_permuted.cpp``.

Measured (``subkern bench --ops sparse_linear --device cpu --threads 2``; 2 Emerald Rapids cores,
batch 1, 90 % sparse): 3072 x 768 in 29 us against 44 us for the CSR kernel, 4096 x 11008 in
0.76 ms against 1.17 ms.

It is an inference cache, not a storage format: :class:`subkern.nn.SparseLinear` builds it from
its CSR buffers on the first CPU forward that can use it (batch <= :data:`PERMUTED_MAX_BATCH`, no
gradient, no ``torch.compile`` / export tracing: those take the ``csr_linear`` op) and rebuilds it
when the buffers change. The result equals ``csr_linear``'s up to float32 summation order.
"""

from __future__ import annotations

import torch

from .. import _ext

__all__ = ["PERMUTED_MAX_BATCH", "permuted_supported", "permuted_layout", "permuted_linear"]

#: Largest batch (rows of ``x``) the permuted kernel takes; larger ones use the CSR SpMM.
PERMUTED_MAX_BATCH = 3


def permuted_supported() -> bool:
    """Whether this build and CPU run the permuted kernel (AVX-512, subkern._C loaded)."""
    ext = _ext.extension()
    return ext is not None and hasattr(ext, "csr_permute_supported") and ext.csr_permute_supported()


def permuted_layout(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                    in_features: int) -> tuple[tuple[torch.Tensor, ...], int] | None:
    """``((slot_idx, slot_val, res_ptr, res_col, res_val), S)`` for a CSR weight (CPU tensors),
    or None when the cost model keeps the CSR kernel or the CPU cannot run the layout.

    Raises ``RuntimeError`` for a corrupt CSR (the structure is checked while packing)."""
    if not permuted_supported():
        return None
    ext = _ext.extension()
    slots = int(ext.csr_permute_slots(row_ptr, col_idx, values, in_features))
    if slots == 0:
        return None
    return tuple(ext.csr_permute_pack(row_ptr, col_idx, values, in_features, slots)), slots


def permuted_linear(x: torch.Tensor, layout: tuple[tuple[torch.Tensor, ...], int],
                    in_features: int, out_features: int, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``csr_linear(x, ...)`` from :func:`permuted_layout`'s result: ``x [B <= 3, in]`` float
    CPU tensor (no autograd: an inference kernel) -> ``[B, out]`` in ``x``'s dtype."""
    tensors, slots = layout
    return _ext.extension().direct_csr_linear_permuted(x, *tensors, slots, in_features,
                                                       out_features, bias)
