"""Backend choice: which implementation of an op runs.

Every op has up to four implementations: ``reference`` (plain torch, always available), ``cpp``
(the C++ CPU kernels in ``subkern._C``), ``triton`` (``subkern.kernels``; on CPU only under
``TRITON_INTERPRET=1``) and ``cuda`` (the CUDA C++ kernels in ``subkern._C``).

``auto`` (the default) picks the fastest available one for the tensors' device and silently falls
back; a backend named explicitly, through ``SUBKERN_BACKEND=<name>`` or :func:`use_backend`, must be
available or the call raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch

from . import _ext
from .ops.library import has_kernel

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device."""




def _validate(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


# SUBKERN_BACKEND is read on every call (it may change at run time) but validated only when its
# value changed. os.environ.get costs about 1.6 us when the variable is unset (a KeyError inside
# the mapping), a real share of a small op's call, so CPython's bytes dict behind os.environ is
# read directly where it exists.
_ENV_KEY = "SUBKERN_BACKEND"
_env_data = getattr(os.environ, "_data", None)
_env_backend: tuple[str | None, str] = (None, "auto")


def _env_key(name: str) -> bytes | None:
    return (os.environ.encodekey(name)  # type: ignore[attr-defined]
            if _env_data is not None and hasattr(os.environ, "encodekey") else None)


def _env_read(name: str, key: bytes | None) -> str | None:
    """``os.environ.get(name)`` in about a tenth of its time (``key``: ``_env_key(name)``)."""
    if key is not None:
        value = _env_data.get(key)
        return None if value is None else os.environ.decodevalue(value)  # type: ignore[attr-defined]
    return os.environ.get(name)


_env_key_bytes = _env_key(_ENV_KEY)
_interpret_key_bytes = _env_key("TRITON_INTERPRET")


def _env_raw() -> str | None:
    return _env_read(_ENV_KEY, _env_key_bytes)


def get_backend() -> str:
    """The requested backend: innermost :func:`use_backend`, else ``SUBKERN_BACKEND``, else auto."""
    global _env_backend
    scoped = use_backend.innermost()
    if scoped is not None:
        return scoped
    raw = _env_raw()
    cached_raw, name = _env_backend
    if raw != cached_raw:
        name = "auto" if raw is None else _validate(raw, _ENV_KEY)
        _env_backend = (raw, name)
    return name


class ScopedChoice:
    """Base of the ``with``-block choices (:class:`use_backend`,
    :class:`subkern.use_matmul_strategy`): ``name`` is pushed on a per-thread stack while the
    block runs; the innermost block wins. A subclass sets ``_local`` (its own
    ``threading.local``) and validates ``name`` in ``__init__``. The ``as`` target is the
    validated name. A class rather than a generator-based context manager: entering and leaving
    costs about a quarter as much, which shows on batch-1 calls."""

    __slots__ = ("name",)
    _local: threading.local

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def innermost(cls) -> str | None:
        """The name of the innermost active block of this thread, or None."""
        stack = getattr(cls._local, "stack", None)
        return stack[-1] if stack else None

    def __enter__(self) -> str:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(self.name)
        return self.name

    def __exit__(self, *exc: object) -> None:
        self._local.stack.pop()


class use_backend(ScopedChoice):  # noqa: N801 - used as a function: ``with use_backend(...):``
    """Force a backend inside a ``with`` block (thread-local): ``with use_backend("reference")``."""

    __slots__ = ()
    _local = threading.local()

    def __init__(self, name: str) -> None:
        super().__init__(_validate(name, "backend"))


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return _env_read("TRITON_INTERPRET", _interpret_key_bytes) == "1"


def unavailable_reason(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """None when ``backend`` can run ``op`` (any op if None) on ``device``, else why not."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs CPU tensors only (got a {device.type} tensor)"
        if not _ext.has_cpu_kernels():
            return f"subkern._C is not available: {_ext.load_error()}"
        if op is not None and not has_kernel(op, "CPU"):
            return f"this build of subkern._C has no CPU kernel for subkern.{op}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only (got a {device.type} tensor)"
        if not _ext.has_cuda_kernels():
            why = _ext.load_error() or "subkern._C was built without CUDA kernels"
            return f"the CUDA kernels of subkern._C are not available: {why}"
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"the triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton "
                f"is imported for CPU tensors (got a {device.type} tensor)")
    raise ValueError(f"unknown backend {backend!r}")


# Preference order of ``auto`` per device type.
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def resolve(op: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``.

    ``supported`` lists the backends that implement ``op``. Explicit requests that cannot be met
    raise :class:`BackendUnavailableError`; ``auto`` takes the first available in preference order.
    Under ``torch.compile`` the choice is made once, at trace time, and baked into the graph.
    Successful choices are cached (a resolve costs microseconds, a real share of a small op);
    the key holds everything availability depends on, so a change of any of it resolves anew.
    """
    requested = get_backend()
    key = (op, requested, device, supported, _ext.extension() is not None, triton_interpreted())
    chosen = _resolved.get(key)
    if chosen is None:
        chosen = _resolved[key] = _resolve_uncached(op, requested, device, supported)
    return chosen


_resolved: dict[tuple, str] = {}


def _resolve_uncached(op: str, requested: str, device: torch.device,
                      supported: tuple[str, ...]) -> str:
    if requested != "auto":
        if requested not in supported:
            raise BackendUnavailableError(
                f"backend {requested!r} does not implement subkern.{op} "
                f"(implemented: {', '.join(supported)})")
        why = unavailable_reason(requested, device, op)
        if why is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run subkern.{op}: {why}")
        return requested
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in supported and unavailable_reason(candidate, device, op) is None:
            return candidate
    return "reference"


# Under torch.compile, resolve() runs once at trace time and its answer is baked into the graph
# (what ``torch.compiler.assume_constant_result`` does). The marker is set directly because that
# decorator imports torch._dynamo, which costs about a second at ``import subkern``;
# tests/test_binary_ops.py checks that fullgraph compilation still works.
resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]
