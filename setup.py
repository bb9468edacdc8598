"""Build script for subkern.

Builds the optional extension ``subkern._C`` from ``csrc/`` with torch's extension tools:

* the C++ CPU kernels (``csrc/_C.cpp``, ``csrc/cpu/*.cpp``) whenever a C++ compiler exists;
* the CUDA kernels (``csrc/cuda/*.cu`` + their bindings ``csrc/cuda/*.cpp``) too when torch has
  CUDA and ``nvcc`` is found.

Switches (environment variables):

``SUBKERN_BUILD_EXT=auto|0|1``   ``0`` skips the extension (reference + Triton only); ``1`` makes a
                                 failed build an error; ``auto`` (default) tries and falls back.
``SUBKERN_BUILD_CUDA=auto|0|1``  the same for the CUDA part of the extension.
``TORCH_CUDA_ARCH_LIST``         honoured by torch's extension tools (e.g. ``"8.0;9.0"``).
``SUBKERN_CXXFLAGS``             extra host compiler flags, appended to the defaults.

Install with ``pip install --no-build-isolation -e .`` so the extension is built against the torch
already installed; a build against another torch is refused at import time with a warning.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be one of auto, 0, 1 (got {value!r})")
    return value


BUILD_EXT = _switch("SUBKERN_BUILD_EXT")
BUILD_CUDA = _switch("SUBKERN_BUILD_CUDA")


def _log(msg: str) -> None:
    print(f"[subkern setup] {msg}", file=sys.stderr, flush=True)


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["subkern", "subkern.*"])
    # Triton kernels live in the top-level folder kernels/ but install as subkern.kernels.
    packages.append("subkern.kernels")
    return packages, {"subkern.kernels": "kernels"}


def _have_cxx() -> bool:
    compiler = os.environ.get("CXX", "c++")
    return shutil.which(compiler) is not None or shutil.which("g++") is not None


def _cuda_wanted() -> bool:
    if BUILD_CUDA == "0":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch missing at build time
        return False
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    ok = torch.version.cuda is not None and has_nvcc
    if not ok:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (CUDA_HOME)"
        if BUILD_CUDA == "1":
            raise SystemExit(f"SUBKERN_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
        _log(f"building without CUDA kernels: {why}")
    return ok


def _extensions(with_cuda: bool):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/_C.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # SUBKERN_CXXFLAGS: extra host compiler flags, appended (e.g. to try another visibility or
    # unwind-table setting on a toolchain: benchmarks/exception_probe.py)
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden"]
    cxx += os.environ.get("SUBKERN_CXXFLAGS", "").split()
    import torch

    macros = [("SUBKERN_TORCH_VERSION", torch.__version__)]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        macros.append(("SUBKERN_WITH_CUDA", "1"))
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "subkern._C",
                sources,
                define_macros=macros,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            )
        ]
    return [
        CppExtension(
            "subkern._C",
            sources,
            define_macros=macros,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
        )
    ]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class SubkernBuildExt(BuildExtension):
        """Builds ``_C``; in ``auto`` mode a failed build falls back (CUDA -> CPU-only -> none)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - we re-raise unless auto mode
                with_cuda = any(src.endswith(".cu") for src in ext.sources)
                if with_cuda and BUILD_CUDA == "auto":
                    _log(f"CUDA build failed ({err}); retrying without the CUDA kernels")
                    cpu_ext = _extensions(with_cuda=False)[0]
                    self._build_cpu_only(cpu_ext)
                    return
                if BUILD_EXT == "auto":
                    _log(
                        f"extension build failed ({err}); subkern installs without _C "
                        "(reference + Triton backends only)"
                    )
                    return
                raise
            self._write_build_info(ext, with_cuda=any(s.endswith(".cu") for s in ext.sources))

        def _build_cpu_only(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                if BUILD_EXT == "auto":
                    _log(f"CPU extension build failed too ({err}); installing without _C")
                    return
                raise
            self._write_build_info(ext, with_cuda=False)

        def _write_build_info(self, ext, with_cuda: bool) -> None:
            import torch

            kind = "CPU + CUDA" if with_cuda else "CPU"
            _log(f"built subkern._C ({kind}) for torch {torch.__version__}")

    use_ninja = shutil.which("ninja") is not None or _ninja_module()
    return SubkernBuildExt.with_options(use_ninja=use_ninja)


def _ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def _ext_setup_kwargs() -> dict:
    if BUILD_EXT == "0":
        _log("SUBKERN_BUILD_EXT=0: installing without _C (reference + Triton backends only)")
        return {}
    try:
        import torch  # noqa: F401
    except ImportError:
        if BUILD_EXT == "1":
            raise SystemExit("SUBKERN_BUILD_EXT=1 but torch is not importable at build time"
                             ) from None
        _log("torch not importable at build time; installing without _C")
        return {}
    if not _have_cxx():
        if BUILD_EXT == "1":
            raise SystemExit("SUBKERN_BUILD_EXT=1 but no C++ compiler was found (set CXX)")
        _log("no C++ compiler found; installing without _C (reference + Triton backends only)")
        return {}
    return {
        "ext_modules": _extensions(_cuda_wanted()),
        "cmdclass": {"build_ext": _build_ext_class()},
    }


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    **_ext_setup_kwargs(),
)
