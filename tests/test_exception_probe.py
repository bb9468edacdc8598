"""benchmarks/exception_probe.py: every C++ error path of subkern._C reaches Python as an
exception on this toolchain (a crash would fail the GPU check's probe step with a backtrace)."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subkern import _ext

ROOT = Path(__file__).resolve().parents[1]
needs_cpp = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="subkern._C not built")


def load_probe():
    spec = importlib.util.spec_from_file_location("exception_probe",
                                                  ROOT / "benchmarks" / "exception_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cpp
def test_diagnostic_bindings_raise_runtime_error():
    C = _ext.extension()
    assert C.install_crash_handler() in (True, False)
    for catch_here in (True, False):
        with pytest.raises(RuntimeError, match="deliberate TORCH_CHECK"):
            C.raise_torch_check(catch_here)
    info = C.build_info()
    assert info["pybind11_version"].count(".") == 2 and "pybind11" in info["pybind11_internals_id"]


@needs_cpp
def test_probe_reports_every_path(tmp_path):
    probe = load_probe()
    out = tmp_path / "probe.txt"
    assert probe.main(["--out", str(out)]) == 0
    report = out.read_text()
    for name in probe.CASES:
        line = next(r for r in report.splitlines() if r.startswith(f"- {name}:"))
        if name == "op-cuda" and not (_ext.has_cuda_kernels() and torch.cuda.is_available()):
            assert "skipped" in line
        else:
            assert "raised RuntimeError" in line, line
    assert "torch built with" in report and "loaded:" in report


def test_verdicts():
    probe = load_probe()
    assert probe.verdict(-11, "").startswith("CRASHED (SIGSEGV)")
    assert probe.verdict(1, "Traceback\nRuntimeError: bad") == "raised RuntimeError: bad"
    assert probe.verdict(3, "SKIP: no GPU\n").startswith("skipped: no GPU")
    assert probe.verdict(0, "").startswith("no error")


@needs_cpp
def test_crash_handler_prints_native_then_python_stack():
    """A real SIGSEGV (ctypes reads address 0) under the crash handler: the native backtrace,
    then faulthandler's Python stack (the handler installed before), then death by SIGSEGV."""
    code = ("import faulthandler, ctypes, subkern\n"
            "from subkern import _ext\n"
            "faulthandler.enable()\n"
            "assert _ext.extension().install_crash_handler()\n"
            "ctypes.string_at(0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGSEGV
    assert "[subkern crash handler] native backtrace:" in proc.stderr
    assert "Fatal Python error: Segmentation fault" in proc.stderr
