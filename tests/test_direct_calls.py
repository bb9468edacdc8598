"""The dispatcher-free CPU inference calls (subkern/ops/_direct.py, csrc/cpu/direct.h): same
results as the registered ops, taken only when nothing needs the dispatcher, visible to the
profiler, and the same errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from subkern import _ext
from subkern.nn import SparseConv2d, SparseLinear, SupermaskLinear
from subkern.ops import sparse_linear as S
from subkern.ops._direct import direct_kernel, direct_ok

needs_cpp = pytest.mark.skipif(_ext.extension() is None, reason="subkern._C not built")


class _SeenOps(TorchDispatchMode):
    """Records the overload packets dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _sparse_weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)


def _profiled_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


@needs_cpp
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_sparse_linear_direct_equals_op(batch):
    layer = SparseLinear.from_dense(_sparse_weight(37, 70, 0.2), format="csr",
                                    bias=torch.randn(37))
    x = torch.randn(batch, 70)
    with torch.no_grad():
        assert direct_ok(x, layer.values, layer.bias)
        direct = layer(x)
    with _SeenOps() as seen, torch.no_grad():
        via_op = layer(x)
    assert "subkern.csr_linear" in seen.names     # a dispatch mode forces the op path
    assert torch.equal(direct, via_op)


@needs_cpp
def test_sparse_conv_direct_equals_op():
    conv = torch.nn.Conv2d(6, 9, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    layer = SparseConv2d.from_dense(conv, format="csr")
    for x in (torch.randn(1, 6, 8, 7), torch.randn(3, 6, 8, 7)):
        with torch.no_grad():
            direct = layer(x)
        with _SeenOps() as seen, torch.no_grad():
            via_op = layer(x)
        assert "subkern.csr_matmul" in seen.names
        assert torch.equal(direct, via_op)
        torch.testing.assert_close(direct, conv(x), atol=1e-4, rtol=1e-4)


@needs_cpp
def test_supermask_direct_equals_op():
    g = torch.Generator().manual_seed(3)
    w = torch.where(torch.rand(24, 100, generator=g) < 0.5, 0.1, -0.1)
    layer = SupermaskLinear.from_weight_and_mask(w, torch.rand(24, 100, generator=g) < 0.4,
                                                 torch.randn(24, generator=g))
    x = torch.randn(2, 100)
    with torch.no_grad():
        direct = layer(x)
    with _SeenOps() as seen, torch.no_grad():
        via_op = layer(x)
    assert torch.equal(direct, via_op)
    if any("ternary_linear_prepacked" in n for n in seen.names):
        # the prepacked kernel was chosen on this CPU: the direct call took its place
        assert "subkern::ternary_linear_prepacked" in _profiled_names(
            lambda: torch.no_grad()(layer)(x))


@needs_cpp
def test_direct_calls_show_in_the_profiler():
    layer = SparseLinear.from_dense(_sparse_weight(16, 32, 0.3), format="csr")
    x = torch.randn(1, 32)
    names = _profiled_names(lambda: torch.no_grad()(layer)(x))
    assert "subkern::csr_linear" in names


@needs_cpp
def test_gradients_still_take_the_op():
    w = _sparse_weight(12, 20, 0.4)
    p = S.pack_csr(w)
    x = torch.randn(3, 20, requires_grad=True)
    assert not direct_ok(x, p["values"], None)
    y = S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 20)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 20))


@needs_cpp
def test_direct_errors_match_the_op():
    p = S.pack_csr(_sparse_weight(10, 30, 0.5), index_dtype=torch.int32)
    p["col_idx"][3] = 31                       # corrupt: column past in_features
    x = torch.randn(1, 30)
    kernel = direct_kernel("csr_linear")
    with pytest.raises(RuntimeError, match="col_idx holds column 31") as direct_err:
        kernel(x, p["row_ptr"], p["col_idx"], p["values"], 30, None)
    assert "Exception raised from" not in str(direct_err.value)   # no C++ backtrace
    with pytest.raises(RuntimeError, match="col_idx holds column 31"):
        torch.ops.subkern.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 30, None)


def test_direct_ok_refuses_subclasses_and_devices():
    x = torch.randn(2, 3)
    assert direct_ok(x)
    assert not direct_ok(torch.randn(2, 3, device="meta"))
    with torch.no_grad():
        assert direct_ok(x, torch.randn(3, requires_grad=True))
    assert not direct_ok(x, torch.randn(3, requires_grad=True))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not direct_ok(fake)


@needs_cpp
def test_functional_ops_take_the_direct_kernel(monkeypatch):
    from subkern.ops import _direct
    p = S.pack_csr(_sparse_weight(11, 24, 0.3))
    x = torch.randn(2, 24)
    expect = S.reference_csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 24, None)
    calls: list[str] = []
    real = _direct.direct_kernel

    def counting(name):
        fn = real(name)
        return None if fn is None else (lambda *a: calls.append(name) or fn(*a))

    monkeypatch.setattr(_direct, "direct_kernel", counting)
    y = S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 24)
    Y = S.csr_matmul(p["row_ptr"], p["col_idx"], p["values"], x.t().contiguous(), 24)
    assert calls == ["csr_linear", "csr_matmul"]
    torch.testing.assert_close(y, expect)
    torch.testing.assert_close(Y, expect.t())
    from subkern.backend import use_backend
    with use_backend("reference"):                 # an explicit other backend: no direct call
        S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 24)
    assert calls == ["csr_linear", "csr_matmul"]


@needs_cpp
def test_functional_fast_path_keeps_the_python_errors():
    p = S.pack_csr(_sparse_weight(11, 24, 0.3))
    x = torch.randn(2, 24)
    with pytest.raises(TypeError, match="values must be float32"):
        S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"].to(torch.int32), 24)
    with pytest.raises(ValueError, match="col_idx must be 1-D"):
        S.csr_linear(x, p["row_ptr"], p["col_idx"][:-1], p["values"], 24)
    with pytest.raises(ValueError, match="x must have shape"):
        S.csr_linear(torch.randn(2, 23), p["row_ptr"], p["col_idx"], p["values"], 24)
    with pytest.raises(TypeError, match="row_ptr must be a torch.Tensor"):
        S.csr_linear(x, [0, 1], p["col_idx"], p["values"], 24)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 24, torch.zeros(3))
    with pytest.raises(ValueError, match="X must have shape"):
        S.csr_matmul(p["row_ptr"], p["col_idx"], p["values"], torch.randn(23, 4), 24)
    bad = p["col_idx"].clone()
    bad[0] = 30                                    # only the kernel sees a corrupt column
    with pytest.raises(RuntimeError, match="col_idx holds column 30"):
        S.csr_linear(x, p["row_ptr"], bad, p["values"], 24)
