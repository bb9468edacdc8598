"""The CUDA sources compile with nvcc for sm_80 and sm_90, on any machine with nvcc (no GPU, no
CUDA-enabled torch needed: the kernels in csrc/cuda/*.cu are torch-free).

Also checks that the torch-free header csrc/cuda/hamming.cuh is valid host C++ on its own, since
csrc/cuda/bindings.cpp includes it from the host compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from subkern.ops import binary
from subkern.ops import binary_reference as reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHES = ("80", "90")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, CUDA_PATH)")


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/*.cu is empty"


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90(source, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHES]
    cmd = [NVCC, "-std=c++17", "-O2", "-I", str(ROOT / "csrc"), *gencode, "-c", str(source),
           "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
    # Our own sources compile without warnings (warnings of system headers are not ours).
    ours = [line for line in proc.stderr.splitlines()
            if "warning" in line.lower() and "csrc" in line]
    assert not ours, "\n".join(ours)


@needs_nvcc
def test_header_is_valid_host_cpp(tmp_path):
    main = tmp_path / "use_header.cpp"
    # The C++ limits agree with the Python ones (subkern.ops.binary, the reference's key layout).
    main.write_text(
        '#include "cuda/hamming.cuh"\n'
        f"static_assert(subkern::cuda::kMaxTopK == {binary.MAX_GPU_K}, \"MAX_GPU_K\");\n"
        f"static_assert(subkern::cuda::kMaxCodeBytes == {binary.MAX_CODE_BYTES}, \"width\");\n"
        f"static_assert(subkern::cuda::kIndexBits == {reference._INDEX_BITS}, \"key layout\");\n"
        "int main() { return subkern::cuda::hamming_topk_workspace_size(0, 0, 8, 1, 1) == 0 "
        "? 0 : 1; }\n")
    # nvcc compiles a .cpp file with the host compiler only, adding the CUDA include directory.
    cmd = [NVCC, "-x", "c++", "-std=c++17", "-Xcompiler", "-Wall,-Wextra,-Werror", "-I",
           str(ROOT / "csrc"), "-c", str(main), "-o", str(tmp_path / "use_header.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
