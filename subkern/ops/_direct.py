"""Dispatcher-free calls of the CPU inference kernels (``csrc/cpu/direct.h``).

A ``torch.ops.subkern.*`` call from Python goes through the dispatcher and, for ops whose
autograd formula is registered from Python, through that Python kernel too: a few to ten
microseconds, a real share of a batch-1 layer that runs in 30-60 us. The deployment modules
(:class:`subkern.nn.SupermaskLinear`, :class:`~subkern.nn.SparseLinear`,
:class:`~subkern.nn.SparseConv2d`) and the functional ops on the ``cpp`` backend call the same
C++ kernel directly when nothing needs the dispatcher: plain CPU tensors (no tensor subclass such
as the fake tensors of ``torch.export``), no gradient needed, not compiling, no
``TorchDispatchMode`` active. The kernels then still run under the profiler (they record
themselves as ``subkern::<op>``) and raise the same ``RuntimeError`` messages.

``run_op(name, x, params, *args)`` is the one entry point: the direct kernel where it applies,
else ``torch.ops.subkern.<name>`` (below the autograd key when no input needs a gradient).
``direct_first`` serves the functional ops: it tries the direct kernel before any Python
argument check (the C++ kernel validates every argument itself) and runs the Python checks only
when the kernel raises, so a bad argument still gets the documented ``TypeError``/``ValueError``
naming it while a good call skips several microseconds of checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _ext

__all__ = ["direct_first", "direct_kernel", "direct_ok", "run_op"]

_kernels: dict[str, Callable | None] = {}


def direct_kernel(name: str) -> Callable | None:
    """``subkern._C.direct_<name>``, or None where the extension (or that entry) is missing."""
    try:
        return _kernels[name]
    except KeyError:
        ext = _ext.extension()
        fn = _kernels[name] = getattr(ext, f"direct_{name}", None) if ext is not None else None
        return fn


def direct_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a direct call may replace the op for input ``x`` and the tensors ``params``
    (weights, bias): see the module docstring. About half a microsecond."""
    if torch.compiler.is_compiling():   # first: the tracer sees only this branch
        return False
    if type(x) is not torch.Tensor or not x.is_cpu or torch._C._len_torch_dispatch_stack():
        return False
    if torch.is_grad_enabled():
        if x.requires_grad:
            return False
        for p in params:
            if p is not None and p.requires_grad:
                return False
    return True


def _call_op(op, *args):
    """Call ``op``; below the autograd key when no input needs a gradient.

    The autograd formulas are registered from Python, so the Autograd dispatch of every call
    costs about 10 us (a sizeable share of a batch-1 layer): inference calls skip it. Under
    ``torch.compile`` the op is called normally (the tracer handles autograd itself).
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def run_op(name: str, x: torch.Tensor, params: tuple[torch.Tensor | None, ...], *args,
           known_ok: bool = False):
    """``subkern::<name>(*args)``: the direct C++ kernel when ``direct_ok(x, *params)`` (``x``:
    the activation, ``params``: the weight tensors that may need gradients) and the extension has
    one, else the registered op. ``known_ok=True``: the caller has just found ``direct_ok`` true
    for the same call (it is not evaluated again)."""
    direct = direct_kernel(name)
    if direct is not None and (known_ok or direct_ok(x, *params)):
        return direct(*args)
    return _call_op(getattr(torch.ops.subkern, name).default, *args)


def direct_first(name: str, x: object, params: tuple[object, ...], args: tuple,
                 validate: Callable[[], object]) -> torch.Tensor | None:
    """``subkern._C.direct_<name>(*args)`` when it applies to this call, else None (the caller
    then takes its normal path).

    It applies when ``x`` is a plain 2-D CPU tensor, :func:`direct_ok` holds for ``x`` and
    ``params``, and the requested backend is ``auto`` or ``cpp`` (on CPU both run the C++
    kernel, which exists since ``direct_<name>`` does). The kernel checks every argument
    (shapes, dtypes, devices, the sparse structure); when anything raises, ``validate()`` runs
    the op's Python checks, which raise the documented error naming the argument, and the
    kernel's own error is re-raised when they pass (e.g. a corrupt column index, which only the
    kernel sees).
    """
    if type(x) is not torch.Tensor or x.dim() != 2:
        return None
    direct = direct_kernel(name)
    if direct is None or _get_backend() not in ("auto", "cpp"):
        return None
    try:
        if not direct_ok(x, *params):
            return None
        return direct(*args)
    except Exception:
        validate()
        raise


def _get_backend() -> str:
    global _get_backend
    from ..backend import get_backend  # noqa: PLC0415 - backend imports the op registry
    _get_backend = get_backend
    return get_backend()
