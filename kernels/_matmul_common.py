"""Pieces shared by the Triton matmul kernels that transform the weight while loading its tiles
(:mod:`masked_matmul`: edge-popup masks, :mod:`soft_threshold`: STR thresholds).

Tiling follows Triton's matmul tutorial: a 1-D grid in grouped order (``GROUP_M`` tile rows
share the same B tiles while they are in L2) over ``BLOCK_M x BLOCK_N`` output tiles.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["AUTOTUNE", "INTERPRET", "grouped_tile", "matmul_configs", "precision_for", "rows_2d"]

#: Triton runs in its interpreter (no GPU: the CPU tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: ``SUBKERN_TRITON_AUTOTUNE=0`` (read at import) gives every autotuned kernel one safe
#: configuration: no benchmarking of candidates at the first call of each shape. The GPU tests
#: set it (they check results, not speed, and would otherwise compile every candidate per shape).
AUTOTUNE = os.environ.get("SUBKERN_TRITON_AUTOTUNE", "1") != "0"


def matmul_configs() -> list[triton.Config]:
    """Autotuning configurations (one small one under the interpreter, one that fits float64
    tiles in shared memory when autotuning is off)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                              num_warps=4, num_stages=3)]
    shapes = [
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4),
        (32, 64, 64, 5, 2), (64, 32, 32, 5, 2),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=stages, num_warps=warps)
            for bm, bn, bk, stages, warps in shapes]


@triton.jit
def grouped_tile(pid, P, Q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` for a ``[P, Q]`` output in grouped order."""
    num_pid_m = tl.cdiv(P, BLOCK_M)
    num_pid_n = tl.cdiv(Q, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """``t [..., last]`` as 2-D ``[rows, last]`` (also when ``last == 0``)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def precision_for(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: IEEE for float64 and for float32 without TF32, else TF32."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
