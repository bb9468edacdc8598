"""Safe loading of the compiled extension ``subkern._C``.

The extension is optional. It is refused (with a warning that names the cause and the rebuild
command) when it is missing, fails to import, or was built against another torch than the one
running: a C++ extension built for another torch ABI can abort the process, so the torch version
that ``csrc/_C.cpp`` embeds in the binary (``SUBKERN_BUILT_FOR_TORCH=...;``) is read from the file
*before* the import.
"""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import os
import re
import warnings
from types import ModuleType
from typing import Any

import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e . (from the subkern checkout)"

_state: dict[str, Any] = {"module": None, "error": None, "loaded": False}


_MARKER = re.compile(rb"SUBKERN_BUILT_FOR_TORCH=([^;\x00]{1,64});")


def _compiled_file() -> str | None:
    spec = importlib.util.find_spec("subkern._C")
    return None if spec is None else spec.origin


def built_for_torch(path: str) -> str | None:
    """The torch version embedded in the compiled extension at ``path`` (None if unreadable)."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            match = _MARKER.search(data)
            found = bytes(match.group(1)) if match else None
    except (OSError, ValueError):
        return None
    return found.decode("ascii", "replace") if found else None


def _load() -> ModuleType | None:
    if os.environ.get("SUBKERN_DISABLE_EXT", "0") == "1":
        _state["error"] = "disabled by SUBKERN_DISABLE_EXT=1"
        return None
    path = _compiled_file()
    if path is None:
        _state["error"] = "not built (no compiler at install time, or SUBKERN_BUILD_EXT=0)"
        return None
    built_for = built_for_torch(path)
    if built_for is not None and built_for != torch.__version__:
        _state["error"] = (
            f"subkern._C was built against torch {built_for} but torch {torch.__version__} is "
            f"running; {REBUILD_HINT}"
        )
        warnings.warn(_state["error"] + " (falling back to the reference/Triton kernels)",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        module = importlib.import_module("subkern._C")
    except Exception as err:  # ImportError, OSError (undefined symbols), ...
        _state["error"] = (f"subkern._C failed to import ({type(err).__name__}: {err}); "
                           f"{REBUILD_HINT}")
        warnings.warn(_state["error"] + " (falling back to the reference/Triton kernels)",
                      RuntimeWarning, stacklevel=3)
        return None
    module_torch = getattr(module, "torch_version", lambda: None)()
    running = torch.__version__.split("+")[0]
    if module_torch not in (None, "unknown") and module_torch.split("+")[0] != running:
        _state["error"] = (
            f"subkern._C reports torch {module_torch} but torch {torch.__version__} is running; "
            f"{REBUILD_HINT}"
        )
        warnings.warn(_state["error"], RuntimeWarning, stacklevel=3)
        return None
    return module


def extension() -> ModuleType | None:
    """The loaded ``subkern._C`` module, or None when it is unavailable (see :func:`load_error`)."""
    if not _state["loaded"]:
        _state["loaded"] = True
        _state["module"] = _load()
    return _state["module"]


def load_error() -> str | None:
    """Why ``_C`` is not in use, or None when it is loaded."""
    extension()
    return _state["error"]


def has_cpu_kernels() -> bool:
    return extension() is not None


def has_cuda_kernels() -> bool:
    module = extension()
    return module is not None and bool(module.build_info().get("with_cuda", False))


def build_info() -> dict[str, Any]:
    """Build facts reported by ``_C`` itself (compiler, CUDA, CPU features), or {} without it."""
    module = extension()
    return dict(module.build_info()) if module is not None else {}
