"""The permuted-chunk csr_linear kernel (csrc/cpu/sparse_permuted.cpp,
subkern/ops/sparse_permuted.py) and SparseLinear's use of it: the same product as the CSR op on
every shape, slot count, batch, dtype and ISA level; the cost model's choices; the layer's cache;
clear errors on bad layouts."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from subkern import _ext
from subkern.nn import SparseLinear
from subkern.ops.sparse_linear import pack_csr
from subkern.ops.sparse_permuted import permuted_layout, permuted_linear, permuted_supported

_C = _ext.extension()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "csr_permute_pack"),
                                reason="subkern._C not built")


def _weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)


def _layout(w: torch.Tensor, slots: int, **pack_kw):
    p = pack_csr(w, **pack_kw)
    tensors = _C.csr_permute_pack(p["row_ptr"], p["col_idx"], p["values"], w.shape[1], slots)
    return tuple(tensors), slots


@pytest.mark.parametrize("out,inp", [(1, 1), (15, 31), (16, 32), (17, 33), (40, 70), (33, 300)])
@pytest.mark.parametrize("density", [0.05, 0.35, 1.0])
@pytest.mark.parametrize("slots", [4, 8, 32])
def test_matches_dense_every_shape_and_slot_count(cpu_isa, out, inp, density, slots):
    w = _weight(out, inp, density)
    bias = torch.randn(out)
    layout = _layout(w, slots)
    for batch in (0, 1, 2, 3):
        x = torch.randn(batch, inp)
        got = permuted_linear(x, layout, inp, out, bias)
        torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(permuted_linear(x, layout, inp, out), F.linear(x, w),
                               rtol=1e-4, atol=1e-4)


def test_residual_holds_what_the_slots_cannot():
    w = torch.zeros(16, 64)
    w[3, :32] = torch.arange(1.0, 33.0)       # 32 nonzeros in one (row, chunk): 4 slots + 28 left
    w[5, 40] = 2.0
    (slot_idx, slot_val, res_ptr, res_col, res_val), _ = _layout(w, 4)
    assert res_val.numel() == 28 and res_ptr[4] - res_ptr[3] == 28
    assert torch.equal(res_col, torch.arange(4, 32, dtype=torch.int32))
    x = torch.randn(1, 64)
    got = permuted_linear(x, ((slot_idx, slot_val, res_ptr, res_col, res_val), 4), 64, 16)
    torch.testing.assert_close(got, F.linear(x, w))


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_dtypes_and_int32_columns(xdtype, value_dtype):
    w = _weight(50, 90, 0.3)
    layout = _layout(w, 8, value_dtype=value_dtype, index_dtype=torch.int32)
    x = torch.randn(2, 90).to(xdtype)
    w_used = w.to(value_dtype).float()
    got = permuted_linear(x, layout, 90, 50)
    assert got.dtype == xdtype
    torch.testing.assert_close(got.float(), F.linear(x.float(), w_used).to(xdtype).float(),
                               rtol=2e-2, atol=2e-2)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 70), inp=st.integers(1, 140), density=st.floats(0.0, 1.0),
       slots=st.sampled_from([4, 8, 12, 16]), batch=st.integers(0, 3), seed=st.integers(0, 99))
def test_property_equals_csr_linear(out, inp, density, slots, batch, seed):
    w = _weight(out, inp, density, seed)
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(permuted_linear(x, _layout(w, slots), inp, out), F.linear(x, w),
                               rtol=1e-4, atol=1e-4)


def test_cost_model_choices():
    if not permuted_supported():
        pytest.skip("the permuted kernel needs AVX-512")
    p90 = pack_csr(_weight(3072, 768, 0.10))
    slots = _C.csr_permute_slots(p90["row_ptr"], p90["col_idx"], p90["values"], 768)
    assert slots > 0 and slots % 4 == 0                 # 90 % sparse: gathers dominate
    b90 = pack_csr(_weight(3072, 768, 0.10), value_dtype=torch.bfloat16)   # fp32 slots: 2x bytes
    assert _C.csr_permute_slots(b90["row_ptr"], b90["col_idx"], b90["values"], 768) == 0
    p98 = pack_csr(_weight(3072, 768, 0.02))
    assert permuted_layout(p98["row_ptr"], p98["col_idx"], p98["values"], 768) is None
    empty = pack_csr(torch.zeros(8, 40))
    assert _C.csr_permute_slots(empty["row_ptr"], empty["col_idx"], empty["values"], 40) == 0


def test_sparse_linear_uses_and_refreshes_the_layout():
    if not permuted_supported():
        pytest.skip("the permuted kernel needs AVX-512")
    w = _weight(300, 200, 0.15)
    bias = torch.randn(300)
    layer = SparseLinear.from_dense(w, format="csr", bias=bias)
    x = torch.randn(1, 200)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w, bias), rtol=1e-4, atol=1e-4)
        assert layer._permuted_layout() is not None
        layer.values.mul_(2.0)                           # in place: the cache is rebuilt
        torch.testing.assert_close(layer(x), F.linear(x, 2 * w, bias), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer(x.expand(3, 200)), F.linear(x, 2 * w, bias).expand(3, 300),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer(torch.randn(2, 4, 200)).shape, torch.Size([2, 4, 300]))
    assert "_permuted_cache" not in pickle.loads(pickle.dumps(layer)).__dict__
    assert "_permuted_cache" not in copy.deepcopy(layer).__dict__
    xg = torch.randn(2, 200, requires_grad=True)         # gradients take the op
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, (2 * w).sum(0).expand(2, 200), rtol=1e-4, atol=1e-4)


def test_layer_result_survives_an_isa_change():
    w = _weight(64, 96, 0.2)
    layer = SparseLinear.from_dense(w, format="csr", bias=None)
    x = torch.randn(1, 96)
    with torch.no_grad():
        first = layer(x)
        _C.set_cpu_isa("portable")
        try:
            again = layer(x)
        finally:
            _C.set_cpu_isa("auto")
    torch.testing.assert_close(first, again, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_bad_layouts_raise():
    w = _weight(20, 40, 0.3)
    (idx, val, rptr, rcol, rval), slots = _layout(w, 4)
    x = torch.randn(1, 40)
    run = _C.direct_csr_linear_permuted
    with pytest.raises(RuntimeError, match="batch must be <= 3"):
        run(torch.randn(4, 40), idx, val, rptr, rcol, rval, slots, 40, 20, None)
    with pytest.raises(RuntimeError, match="slot_val does not match"):
        run(x, idx, val[:-1], rptr, rcol, rval, slots, 40, 20, None)
    with pytest.raises(RuntimeError, match="slot_idx does not match"):
        run(x, idx, val, rptr, rcol, rval, 8, 40, 20, None)
    with pytest.raises(RuntimeError, match="x must be a CPU tensor"):
        run(torch.randn(1, 41), idx, val, rptr, rcol, rval, slots, 40, 20, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        run(x, idx, val, rptr, rcol, rval, slots, 40, 20, torch.zeros(3))
    p = pack_csr(w, index_dtype=torch.int32)
    bad = p["col_idx"].clone()
    bad[0] = 40
    with pytest.raises(RuntimeError, match="col_idx holds column 40"):
        _C.csr_permute_pack(p["row_ptr"], bad, p["values"], 40, 4)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        _C.csr_permute_pack(p["row_ptr"], p["col_idx"], p["values"], 40, 6)
    # a corrupt residual pointer gives no out-of-bounds read (clamped), just a wrong sum
    bad_ptr = rptr.clone()
    bad_ptr[1:] = 10**9
    bad_ptr[-1] = rval.numel()
    run(x, idx, val, bad_ptr, rcol, rval, slots, 40, 20, None)
