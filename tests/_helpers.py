"""Helpers shared by several test modules (imported as ``from _helpers import ...``: pytest puts
this folder on ``sys.path`` for the test modules in it, and spawned workers inherit the path).

* ternary test data: ``ternary_weight``, ``dense_linear_fp64``, ``ternary_tol``;
* ``needs_cpp``: skip marker for tests of the compiled CPU kernels;
* DDP: ``free_port``, ``init_ddp_worker`` (inside a worker) and ``run_ddp_workers`` (spawn the
  workers, wait, load their results);
* deployment artifacts: ``rewrite_metadata`` (edit a safetensors header's ``__metadata__``);
* Triton / GPU tests: ``TEST_DEVICE``, ``needs_triton()``, ``triton_test_dtypes``,
  ``assert_close_scaled``, ``require_gpu_backend``.

The ``cpu_isa`` fixture (every ISA level of the CPU kernels) lives in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from subkern import _ext
from subkern.training import DistInfo, init_distributed

needs_cpp = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="subkern._C not built")


# ---------------------------------------------------------------------------------------------
# ternary weights
# ---------------------------------------------------------------------------------------------

def ternary_weight(out: int, inp: int, scale: float = 0.37, seed: int = 0) -> torch.Tensor:
    """A seeded ``[out, inp]`` float32 weight with values in ``{-scale, 0, +scale}``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (out, inp), generator=g).float() * scale


def dense_linear_fp64(x: torch.Tensor, w: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference ``F.linear(x, w, bias)`` computed in float64."""
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


def ternary_tol(inp: int) -> float:
    """Absolute tolerance of a float32 ternary product over ``inp`` inputs (grows as sqrt)."""
    return 4e-5 * max(1.0, inp ** 0.5)


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ddp_worker(rank: int, port: int, world_size: int = 2) -> DistInfo:
    """In a spawned worker: one intra-op thread, torchrun's environment variables for ``rank`` of
    ``world_size`` on 127.0.0.1:``port``, and the gloo process group (30 s timeout)."""
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    return init_distributed("cpu", timeout_s=30)


def run_ddp_workers(worker: Callable[[int, int, str], None], out_dir: Path, nprocs: int = 2,
                    timeout_s: float = 60.0) -> list[Any]:
    """Spawn ``worker(rank, port, str(out_dir))`` in ``nprocs`` processes, wait at most
    ``timeout_s`` (then kill them and fail the test) and return each rank's
    ``torch.load(out_dir / f"rank{rank}.pt")``."""
    ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=nprocs,
                             join=False, start_method="spawn")
    for _ in range(int(timeout_s / 0.5)):
        if ctx.join(timeout=0.5):
            break
    else:
        for proc in ctx.processes:
            proc.kill()
        pytest.fail(f"DDP workers did not finish in {timeout_s:g} s")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(nprocs)]


# ---------------------------------------------------------------------------------------------
# deployment artifacts
# ---------------------------------------------------------------------------------------------

def rewrite_metadata(data: bytes, **changes: str) -> bytes:
    """A safetensors file's bytes with ``changes`` merged into its header's ``__metadata__``
    (the header re-padded to 8 bytes, the tensor data unchanged)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


# ---------------------------------------------------------------------------------------------
# Triton / GPU tests
# ---------------------------------------------------------------------------------------------

TEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_triton() -> pytest.MarkDecorator:
    """Skip marker (a module's ``pytestmark``) for tests of Triton kernels on ``TEST_DEVICE``:
    they need triton, and without a GPU the interpreter (conftest sets ``TRITON_INTERPRET``)."""
    from subkern import backend as _backend

    return pytest.mark.skipif(
        _backend.unavailable_reason("triton", torch.device(TEST_DEVICE)) is not None,
        reason="triton cannot run here (not installed, or no GPU and TRITON_INTERPRET unset)")


def triton_test_dtypes(device: str) -> list[torch.dtype]:
    """The dtypes a Triton kernel test runs: fp32 and fp16 everywhere, plus bf16 on a GPU or
    fp64 under the interpreter (fp64 dot on a GPU is slow and not a target)."""
    out = [torch.float32, torch.float16]
    out.append(torch.bfloat16 if device == "cuda" else torch.float64)
    return out


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """``got`` equals ``want`` (compared in float64) to ``tol``, relative and absolute, after
    both are divided by ``max(1, max|want|)``."""
    want = want.double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol)


def require_gpu_backend(name: str) -> str:
    """``name`` ("cuda" or "triton") when that GPU backend can be tested, else skip: ``cuda``
    needs ``subkern._C`` built with its CUDA kernels, ``triton`` the triton package."""
    if name == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip(f"subkern._C has no CUDA kernels: {_ext.load_error() or 'built without CUDA'}")
    if name == "triton":
        pytest.importorskip("triton")
    return name
