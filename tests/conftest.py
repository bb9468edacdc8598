"""Test setup: run Triton kernels through the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before anything imports triton, so this happens at conftest import.
"""

from __future__ import annotations

import os


def _cuda_present() -> bool:
    # No CUDA calls at import: ask the driver-free way first.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # the tests check results, not speed: one configuration per autotuned Triton kernel
    os.environ.setdefault("SUBKERN_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_isa(request):
    """Run the test once per ISA level of the compiled CPU kernels (skipped where the extension
    is not built or this CPU lacks the level); the automatic choice is restored afterwards."""
    from subkern import _ext

    module = _ext.extension()
    if module is None:
        pytest.skip("subkern._C not built")
    try:
        module.set_cpu_isa(request.param)
    except Exception as err:  # noqa: BLE001 - this CPU lacks the level
        pytest.skip(f"ISA {request.param} unavailable: {err}")
    yield request.param
    module.set_cpu_isa("auto")
