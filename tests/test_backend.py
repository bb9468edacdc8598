"""Backend choice: auto, explicit requests, errors for unavailable backends, _C loading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import subkern
from subkern import _ext, backend

CODES = torch.randint(0, 256, (4, 8), dtype=torch.uint8)


def test_auto_is_default_and_context_manager_nests():
    assert subkern.get_backend() in backend.BACKENDS
    with subkern.use_backend("reference"):
        assert subkern.get_backend() == "reference"
        with subkern.use_backend("auto"):
            assert subkern.get_backend() == "auto"
        assert subkern.get_backend() == "reference"


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        with subkern.use_backend("fastest"):
            pass


def test_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("SUBKERN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SUBKERN_BACKEND must be one of"):
        subkern.get_backend()
    monkeypatch.setenv("SUBKERN_BACKEND", "reference")
    assert subkern.get_backend() == "reference"
    assert backend.resolve("hamming_topk", torch.device("cpu"), ("reference", "cpp")) == "reference"


def test_forcing_cuda_on_cpu_tensors_raises_with_reason():
    with subkern.use_backend("cuda"):
        with pytest.raises(subkern.BackendUnavailableError, match="CUDA tensors only"):
            subkern.hamming_topk(CODES, CODES, 1)


def test_forcing_unimplemented_backend_raises():
    with subkern.use_backend("cuda"):
        with pytest.raises(subkern.BackendUnavailableError, match="does not implement"):
            backend.resolve("some_op", torch.device("cpu"), ("reference",))


def test_auto_prefers_cpp_on_cpu_when_built():
    chosen = backend.resolve("hamming_topk", torch.device("cpu"), ("reference", "cpp", "triton"))
    if backend.unavailable_reason("cpp", torch.device("cpu"), "hamming_topk") is None:
        assert chosen == "cpp"
    else:
        assert chosen == "reference"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend.unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason


def test_mismatched_extension_is_refused_with_rebuild_hint(monkeypatch):
    monkeypatch.setattr(_ext, "built_for_torch", lambda path: "1.0.0+other")
    monkeypatch.setattr(_ext, "_state", {"module": None, "error": None, "loaded": False})
    if _ext._compiled_file() is None:
        pytest.skip("subkern._C is not built in this installation")
    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0.*pip install"):
        assert _ext.extension() is None
    assert "1.0.0" in _ext.load_error()
    reason = backend.unavailable_reason("cpp", torch.device("cpu"))
    assert reason is not None and "rebuild" in reason


def test_marker_is_embedded_in_the_built_extension():
    path = _ext._compiled_file()
    if path is None:
        pytest.skip("subkern._C is not built in this installation")
    assert _ext.built_for_torch(path) == torch.__version__


def test_package_works_without_extension():
    code = textwrap.dedent(
        """
        import torch, subkern
        from subkern import _ext
        assert _ext.extension() is None and "SUBKERN_DISABLE_EXT" in _ext.load_error()
        q = torch.randint(0, 256, (3, 8), dtype=torch.uint8)
        d, i = subkern.hamming_topk(q, q, 2)
        assert (d[:, 0] == 0).all() and torch.equal(i[:, 0], torch.arange(3))
        try:
            with subkern.use_backend("cpp"):
                subkern.hamming_topk(q, q, 2)
        except subkern.BackendUnavailableError as err:
            assert "not available" in str(err)
        else:
            raise AssertionError("forcing cpp without _C must raise")
        print("ok")
        """
    )
    env = dict(os.environ, SUBKERN_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
