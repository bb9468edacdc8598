"""How the Triton backend runs the training matmuls of edge-popup and STR: ``fused`` or
``materialize``.

Both ops multiply by an effective weight made elementwise from the stored one: ``W_eff = W * M``
(edge-popup's mask, :mod:`subkern.ops.masked`) or ``W_eff = sign(W) relu(|W| - sigmoid(s))``
(STR's soft threshold, :mod:`subkern.ops.soft_threshold`).

* ``fused``: the Triton matmul kernels of ``kernels/masked_matmul.py`` and
  ``kernels/soft_threshold.py`` apply the mask / threshold to every weight tile as they load it,
  so ``W_eff`` never reaches global memory, and the weight gradient's epilogue runs inside the
  ``grad_y^T @ x`` kernel.
* ``materialize``: an elementwise pass writes ``W_eff`` (the weight's dtype) and torch's GEMM
  (cuBLAS) runs ``x @ W_eff^T``; the backward builds ``W_eff`` again for ``grad_y @ W_eff``
  (nothing is kept between the passes), and ``G = grad_y^T @ x`` is followed by one
  elementwise Triton pass that forms the weight / score / threshold gradients from ``G``.
  Cost per training step: two ``W_eff`` builds (read ``W`` and the mask or ``s``, write
  ``W_eff``) and ``W_eff`` read by two GEMMs: a few microseconds each for a 768x3072 bf16 layer
  on an H100 (3.35 TB/s; about 12 MB moved per build), against 15-60 us per GEMM at
  2048-8192 tokens.
* float64 on CUDA always materializes in the edge-popup op: Triton has no float64 MMA at the
  fused masked matmul's tile sizes (it does not compile; ``benchmarks/triton_aot_check.py``).

Why ``auto`` materializes on CUDA: on an H100 (benchmarks/results/gpu/README.md) the fused
kernels reached 0.12-0.30x of cuBLAS's throughput at 2048 and 8192 tokens: a tutorial-structured
Triton matmul alone reached 0.68-0.77x of cuBLAS there, and multiplying each weight tile in
registers (it can no longer go straight from global to shared memory into wgmma) cost another
35-45 %. The plain-torch reference, which materializes, ran faster than the fused training step.

``auto`` (the default) is ``materialize`` for CUDA tensors and ``fused`` for CPU tensors (those
reach the Triton backend only under ``TRITON_INTERPRET=1``, where the fused kernels are what the
backend exists to test). Force one with ``SUBKERN_GPU_MATMUL=fused|materialize`` (read on every
call) or, per thread, ``with use_matmul_strategy("fused"):``. The CPU backends (``cpp``) always
materialize (C++ pass + MKL / oneDNN GEMM); the ``reference`` backend is plain autograd.
"""

from __future__ import annotations

import threading

import torch

from .. import backend as _backend

__all__ = ["STRATEGIES", "matmul_strategy", "use_matmul_strategy"]

STRATEGIES = ("auto", "fused", "materialize")

_ENV = "SUBKERN_GPU_MATMUL"
_env_key = _backend._env_key(_ENV)


def _validate(name: object, source: str) -> str:
    value = str(name).strip().lower()
    if value not in STRATEGIES:
        raise ValueError(f"{source} must be one of {', '.join(STRATEGIES)}; got {name!r}")
    return value


def requested_strategy() -> str:
    """The requested strategy: innermost :func:`use_matmul_strategy`, else the environment."""
    scoped = use_matmul_strategy.innermost()
    if scoped is not None:
        return scoped
    raw = _backend._env_read(_ENV, _env_key)
    return "auto" if raw is None else _validate(raw, _ENV)


def matmul_strategy(device: torch.device) -> str:
    """``"fused"`` or ``"materialize"`` for a Triton-backend training matmul on ``device``."""
    requested = requested_strategy()
    if requested != "auto":
        return requested
    return "materialize" if torch.device(device).type == "cuda" else "fused"


class use_matmul_strategy(_backend.ScopedChoice):  # noqa: N801 - used as a function
    """Force a strategy inside a ``with`` block (thread-local):
    ``with use_matmul_strategy("fused"): ...``."""

    __slots__ = ()
    _local = threading.local()

    def __init__(self, name: str) -> None:
        super().__init__(_validate(name, "strategy"))
