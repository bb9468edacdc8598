"""Every Triton kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks that they lower to a cubin
(benchmarks/triton_aot_check.py: the kernels' wrappers on CPU tensors, a compile-only Triton
driver, ptxas from the triton wheel). One autotuning configuration per kernel, bf16 included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from subkern import backend as _backend

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not _backend.triton_importable(), reason="triton not installed")


def _check(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_aot_check.py"),
                           "--arch", "90", "--quick", *flags], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)


def test_every_triton_kernel_compiles_for_sm90():
    proc = _check()
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "0 failures" in report, report
    compiled = int(report.split("sm_90: ")[1].split(" kernel compilations")[0])
    assert compiled >= 200, report   # every wrapper compiled its kernels (244 when written)


def test_shared_memory_over_the_limit_is_a_failure():
    """A kernel that needs more shared memory than a block may have is reported (here against
    a 4 KiB limit): one launched without the autotuner (the top-k histogram kernel, 8 KiB), and
    an autotuned one when no configuration fits (``--quick``: the one configuration)."""
    proc = _check("--shared-limit", "4096")
    report = proc.stdout + proc.stderr
    assert proc.returncode == 1, report
    assert "FAIL _hist_kernel: 8192 B of shared memory > 4096 B" in report, report
    assert ("FAIL _masked_matmul_kernel: every autotuning configuration needs more than "
            "4096 B of shared memory") in report, report
    assert "FAIL _soft_threshold_grads_kernel" not in report   # 16 B: fits
