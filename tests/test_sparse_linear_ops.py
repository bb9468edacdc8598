"""subkern::csr_linear / csr_matmul / bitmap_linear: packing, format choice, and every CPU backend
against the torch reference (dense float64 products of the same weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import subkern  # noqa: F401  (loads the op library and subkern._C)
from subkern import _ext
from subkern.backend import BackendUnavailableError, use_backend
from subkern.ops import sparse_linear as S

DENSITIES = [0.0, 0.5, 0.1, 0.01, 1.0]  # sparsity 100 %, 50 %, 90 %, 99 %, 0 %
SHAPES = [  # (batch, out, in): ragged, batch 1 (SpMV path), larger (SpMM path), empty
    (1, 1, 1), (1, 5, 3), (3, 17, 64), (1, 123, 200), (16, 64, 130), (37, 13, 65),
    (70, 33, 100), (0, 4, 5), (3, 0, 7), (2, 3, 0),
    (48, 160, 96),   # whole 16 x 16 tiles in both transposes
    (130, 600, 80),  # a transposed output large enough to be cut over threads, ragged tiles
]
needs_cpp = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="subkern._C not built")


def sparse_weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


def dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


def tol(inp: int) -> float:
    return 2e-5 * max(1.0, inp ** 0.5)


def csr_args(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p["row_ptr"], p["col_idx"], p["values"]


def bitmap_args(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p["bitmap"], p["row_ptr"], p["values"]


# --------------------------------------------------------------------------------------------
# Packing and format choice
# --------------------------------------------------------------------------------------------

def test_pack_csr_layout_and_roundtrip():
    w = sparse_weight(6, 40000, 0.001)
    w[0, 32767] = 1.5
    w[0, 32768] = -2.0
    w[5, 39999] = 3.0
    p = S.pack_csr(w)
    assert p["col_idx"].dtype == torch.int16 and p["row_ptr"].dtype == torch.int64
    assert p["values"].dtype == torch.float32
    assert int(p["row_ptr"][0]) == 0 and int(p["row_ptr"][-1]) == p["values"].numel()
    cols = S.columns_of(p["col_idx"])
    row0 = cols[: int(p["row_ptr"][1])]
    assert 32767 in row0.tolist() and 32768 in row0.tolist()
    assert bool((row0[1:] > row0[:-1]).all())                # sorted within a row
    # column 32768 is stored as the unsigned 16-bit pattern 0x8000 (int16 -32768)
    assert int(p["col_idx"][(cols == 32768).nonzero()[0, 0]]) == -32768
    assert torch.equal(S.unpack_csr(p, w.shape), w)
    p32 = S.pack_csr(w, torch.int32, torch.bfloat16)
    assert p32["col_idx"].dtype == torch.int32 and p32["values"].dtype == torch.bfloat16
    assert torch.equal(S.unpack_csr(p32, w.shape, torch.float32), w.bfloat16().float())
    wide = sparse_weight(2, 70000, 0.001)
    assert S.pack_csr(wide)["col_idx"].dtype == torch.int32
    with pytest.raises(ValueError, match="int16"):
        S.pack_csr(wide, torch.int16)
    with pytest.raises(TypeError, match="index_dtype"):
        S.pack_csr(w, torch.int64)
    with pytest.raises(TypeError, match="value_dtype"):
        S.pack_csr(w, value_dtype=torch.float64)
    with pytest.raises(ValueError, match="2-D"):
        S.pack_csr(torch.ones(3))


def test_pack_bitmap_layout_and_roundtrip():
    w = sparse_weight(5, 130, 0.3)
    p = S.pack_bitmap(w)
    assert p["bitmap"].shape == (5, 3) and p["bitmap"].dtype == torch.int64
    for o in range(5):
        for i in (0, 1, 63, 64, 127, 128, 129):
            assert (int(p["bitmap"][o, i // 64]) >> (i % 64)) & 1 == int(w[o, i] != 0)
    assert torch.equal(p["row_ptr"][1:] - p["row_ptr"][:-1], (w != 0).sum(1))
    assert torch.equal(S.unpack_bitmap(p, w.shape), w)
    ph = S.pack_bitmap(w, torch.float16)
    assert torch.equal(S.unpack_bitmap(ph, w.shape), w.half())
    empty = S.pack_bitmap(torch.zeros(0, 10))
    assert empty["bitmap"].shape == (0, 1) and empty["row_ptr"].tolist() == [0]


def test_choose_format(monkeypatch):
    n = 3072 * 768
    assert S.choose_format(3072, 768, 0) == "csr"
    assert S.choose_format(0, 768, 0) == "csr"
    assert S.choose_format(3072, 768, int(0.05 * n)) == "csr"
    assert S.choose_format(3072, 768, int(0.3 * n)) == "csr"
    assert S.choose_format(3072, 768, n) == "dense"
    assert S.choose_format(3072, 768, int(0.42 * n), batch_hint=16) == "csr"
    assert S.choose_format(3072, 768, int(0.42 * n), batch_hint=1) == "dense"
    assert S.choose_format(3072, 768, int(0.1 * n), batch_hint=128) == "csr"
    assert S.choose_format(3072, 768, int(0.3 * n), batch_hint=128) == "dense"
    monkeypatch.setattr(S, "BITMAP_DENSITY_WINDOW", (0.2, 0.4))
    assert S.choose_format(3072, 768, int(0.3 * n)) == "bitmap"
    assert S.choose_format(3072, 768, int(0.3 * n), batch_hint=16) == "csr"
    with pytest.raises(ValueError, match="nnz"):
        S.choose_format(2, 2, 5)
    with pytest.raises(ValueError, match="batch_hint"):
        S.choose_format(2, 2, 1, batch_hint=-1)
    with pytest.raises(TypeError, match="value_dtype"):
        S.choose_format(2, 2, 1, value_dtype=torch.int8)


# --------------------------------------------------------------------------------------------
# Reference and C++ kernels
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,out,inp", SHAPES)
def test_reference_matches_dense(batch, out, inp):
    w = sparse_weight(out, inp, 0.3, seed=out + inp)
    x = torch.randn(batch, inp)
    bias = torch.randn(out)
    with use_backend("reference"):
        y = S.csr_linear(x, *csr_args(S.pack_csr(w)), inp, bias)
        yb = S.bitmap_linear(x, *bitmap_args(S.pack_bitmap(w)), inp, bias)
        ym = S.csr_matmul(*csr_args(S.pack_csr(w)), x.t(), inp)
    torch.testing.assert_close(y.double(), dense(x, w, bias), atol=tol(inp), rtol=1e-5)
    torch.testing.assert_close(yb.double(), dense(x, w, bias), atol=tol(inp), rtol=1e-5)
    torch.testing.assert_close(ym.double(), dense(x, w).t(), atol=tol(inp), rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("batch,out,inp", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_cpp_matches_dense(cpu_isa, batch, out, inp, density):
    w = sparse_weight(out, inp, density, seed=batch + out + inp)
    x = torch.randn(batch, inp)
    bias = torch.randn(out)
    expected = dense(x, w, bias)
    with use_backend("cpp"):
        for index_dtype in (torch.int16, torch.int32):
            p = S.pack_csr(w, index_dtype)
            y = S.csr_linear(x, *csr_args(p), inp, bias)
            assert y.shape == (batch, out) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), expected, atol=tol(inp), rtol=1e-5)
            ym = S.csr_matmul(*csr_args(p), x.t(), inp)
            assert ym.shape == (out, batch)
            torch.testing.assert_close(ym.double(), dense(x, w).t(), atol=tol(inp), rtol=1e-5)
        yb = S.bitmap_linear(x, *bitmap_args(S.pack_bitmap(w)), inp, bias)
        torch.testing.assert_close(yb.double(), expected, atol=tol(inp), rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 5, 40])
def test_cpp_half_values(cpu_isa, value_dtype, batch):
    w = sparse_weight(37, 300, 0.2)
    wq = w.to(value_dtype).float()                  # the weight the kernels multiply with
    x = torch.randn(batch, 300)
    expected = dense(x, wq)
    with use_backend("cpp"):
        y = S.csr_linear(x, *csr_args(S.pack_csr(w, value_dtype=value_dtype)), 300)
        yb = S.bitmap_linear(x, *bitmap_args(S.pack_bitmap(w, value_dtype)), 300)
        ym = S.csr_matmul(*csr_args(S.pack_csr(w, value_dtype=value_dtype)), x.t(), 300)
    torch.testing.assert_close(y.double(), expected, atol=tol(300), rtol=1e-5)
    torch.testing.assert_close(yb.double(), expected, atol=tol(300), rtol=1e-5)
    torch.testing.assert_close(ym.double(), expected.t(), atol=tol(300), rtol=1e-5)


@needs_cpp
def test_cpp_large_multithreaded_and_wide_columns(cpu_isa):
    # non-uniform row budgets (STR): a dense block of rows, empty rows, sparse rest
    w = sparse_weight(700, 1500, 0.05)
    w[:40] = torch.randn(40, 1500)
    w[300:350] = 0
    x = torch.randn(20, 1500)
    p = S.pack_csr(w)
    with use_backend("cpp"):
        for xb in (x[:1], x[:3], x):
            torch.testing.assert_close(S.csr_linear(xb, *csr_args(p), 1500).double(),
                                       dense(xb, w), atol=1e-3, rtol=1e-5)
    # columns >= 32768 through int16 (unsigned) and int32 indices
    wide = sparse_weight(9, 65536, 0.002)
    wide[:, 65535] = 1.0
    xw = torch.randn(3, 65536)
    with use_backend("cpp"):
        for index_dtype in (torch.int16, torch.int32):
            y = S.csr_linear(xw, *csr_args(S.pack_csr(wide, index_dtype)), 65536)
            torch.testing.assert_close(y.double(), dense(xw, wide), atol=1e-3, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("batch", [3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_small_batch_lanes(cpu_isa, batch, value_dtype):
    """Batches 3-8 take the lane-packed SpMM on AVX-512 (4 or 8 activations per nonzero in one
    zmm): rows of 0-40 nonzeros (every remainder modulo 2 and 4), both index widths, bias,
    half-precision x, and a row whose columns are all the last one."""
    out, inp = 41, 300
    g = torch.Generator().manual_seed(batch)
    w = torch.zeros(out, inp)
    for o in range(out):
        cols = torch.randperm(inp, generator=g)[: o if o < 21 else 40]
        w[o, cols] = torch.randn(len(cols), generator=g)
    w[7] = 0
    w[7, inp - 1] = 2.5
    wq = w.to(value_dtype).float()
    x, bias = torch.randn(batch, inp, generator=g), torch.randn(out, generator=g)
    with use_backend("cpp"):
        for index_dtype in (torch.int16, torch.int32):
            p = S.pack_csr(w, index_dtype, value_dtype=value_dtype)
            y = S.csr_linear(x, *csr_args(p), inp, bias)
            torch.testing.assert_close(y.double(), dense(x, wq, bias), atol=tol(inp), rtol=1e-5)
        yh = S.csr_linear(x.to(torch.bfloat16), *csr_args(p), inp)
    assert yh.dtype == torch.bfloat16
    torch.testing.assert_close(yh.double(), dense(x.to(torch.bfloat16).float(), wq), atol=0.1,
                               rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations(backend, dtype):
    if backend == "cpp" and not _ext.has_cpu_kernels():
        pytest.skip("subkern._C not built")
    w = sparse_weight(20, 100, 0.3)
    x = torch.randn(4, 100).to(dtype)
    bias = torch.randn(20)
    with use_backend(backend):
        y = S.csr_linear(x, *csr_args(S.pack_csr(w)), 100, bias)
        yb = S.bitmap_linear(x, *bitmap_args(S.pack_bitmap(w)), 100, bias)
        ym = S.csr_matmul(*csr_args(S.pack_csr(w)), x.t(), 100)
    expected = dense(x.float(), w, bias)
    for out in (y, yb):
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, atol=5e-2, rtol=1e-2)
    assert ym.dtype == dtype


def test_noncontiguous_and_batched_shapes():
    w = sparse_weight(10, 33, 0.3)
    p = S.pack_csr(w)
    x = torch.randn(33, 12).t()                       # non-contiguous [12, 33]
    x3 = torch.randn(2, 3, 33)
    torch.testing.assert_close(S.csr_linear(x, *csr_args(p), 33).double(), dense(x, w),
                               atol=1e-5, rtol=1e-5)
    y3 = S.bitmap_linear(x3, *bitmap_args(S.pack_bitmap(w)), 33)
    assert y3.shape == (2, 3, 10)
    torch.testing.assert_close(y3.double(), dense(x3, w), atol=1e-5, rtol=1e-5)
    X = torch.randn(40, 33).t()                       # non-contiguous [33, 40]
    torch.testing.assert_close(S.csr_matmul(*csr_args(p), X, 33).double(),
                               w.double() @ X.double(), atol=1e-5, rtol=1e-5)
    # non-contiguous packed tensors
    rp, ci, va = csr_args(p)
    va2 = torch.stack([va, va], 1)[:, 0]
    torch.testing.assert_close(S.csr_linear(x, rp, ci, va2, 33).double(), dense(x, w),
                               atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    w = sparse_weight(4, 10, 0.5)
    rp, ci, va = csr_args(S.pack_csr(w))
    x = torch.randn(2, 10)
    with pytest.raises(TypeError, match="x must be float32"):
        S.csr_linear(x.long(), rp, ci, va, 10)
    with pytest.raises(ValueError, match=r"\[\.\.\., 11\]"):
        S.csr_linear(x, rp, ci, va, 11)
    with pytest.raises(TypeError, match="row_ptr"):
        S.csr_linear(x, rp.int(), ci, va, 10)
    with pytest.raises(TypeError, match="col_idx"):
        S.csr_linear(x, rp, ci.long(), va, 10)
    with pytest.raises(ValueError, match="col_idx"):
        S.csr_linear(x, rp, ci[:-1], va, 10)
    with pytest.raises(TypeError, match="values"):
        S.csr_linear(x, rp, ci, va.double(), 10)
    with pytest.raises(ValueError, match="bias"):
        S.csr_linear(x, rp, ci, va, 10, torch.randn(5))
    with pytest.raises(ValueError, match="in_features"):
        S.csr_linear(x, rp, ci, va, -1)
    with pytest.raises(ValueError, match="int16"):
        S.csr_linear(torch.randn(1, 70000), rp, ci, va, 70000)
    with pytest.raises(ValueError, match="X must have shape"):
        S.csr_matmul(rp, ci, va, x, 10)
    bm, brp, bva = bitmap_args(S.pack_bitmap(w))
    with pytest.raises(ValueError, match="bitmap must have shape"):
        S.bitmap_linear(x, bm[:, :0], brp, bva, 10)
    with pytest.raises(ValueError, match="row_ptr"):
        S.bitmap_linear(x, bm, brp[:-1], bva, 10)
    with pytest.raises(TypeError, match="bitmap"):
        S.bitmap_linear(x, bm.int(), brp, bva, 10)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_corrupt_structure_raises(backend):
    if backend == "cpp" and not _ext.has_cpu_kernels():
        pytest.skip("subkern._C not built")
    w = sparse_weight(6, 50, 0.5)
    rp, ci, va = csr_args(S.pack_csr(w, torch.int32))
    x = torch.randn(3, 50)
    bad_col = ci.clone()
    bad_col[3] = 50
    bad_ptr = rp.clone()
    bad_ptr[2] = int(rp[3]) + 1                        # row 2 ends before it starts
    bad_end = rp.clone()
    bad_end[-1] += 1
    neg_col = ci.clone()
    neg_col[0] = -5
    with use_backend(backend):
        for xb in (x[:1], x):
            with pytest.raises((RuntimeError, IndexError, ValueError)):
                S.csr_linear(xb, rp, bad_col, va, 50)
            with pytest.raises((RuntimeError, IndexError, ValueError)):
                S.csr_linear(xb, rp, neg_col, va, 50)
            with pytest.raises((RuntimeError, IndexError, ValueError)):
                S.csr_linear(xb, bad_end, ci, va, 50)
        with pytest.raises((RuntimeError, IndexError, ValueError)):
            S.csr_matmul(rp, bad_col, va, x.t(), 50)
        bm, brp, bva = bitmap_args(S.pack_bitmap(w))
        with pytest.raises((RuntimeError, IndexError, ValueError)):
            S.bitmap_linear(x, bm, brp, bva[:-1], 50)
    if backend == "cpp":
        with use_backend("cpp"):
            with pytest.raises(RuntimeError, match="non-decreasing"):
                S.csr_linear(x, bad_ptr, ci, va, 50)
            with pytest.raises(RuntimeError, match="in_features"):
                S.csr_linear(x, rp, bad_col, va, 50)
            bm2 = bm.clone()
            bm2[0, 0] ^= 1
            with pytest.raises(RuntimeError, match="set bits"):
                S.bitmap_linear(x, bm2, brp, bva, 50)
            bm3 = bm.clone()
            bm3[0, 0] |= 1 << 60                      # past in_features = 50
            with pytest.raises(RuntimeError, match="past in_features"):
                S.bitmap_linear(x, bm3, brp, bva, 50)


@needs_cpp
def test_cpp_kernel_checks_directly():
    w = sparse_weight(4, 10, 0.5)
    rp, ci, va = csr_args(S.pack_csr(w))
    with pytest.raises(RuntimeError, match="in_features"):
        torch.ops.subkern.csr_linear(torch.randn(2, 9), rp, ci, va, 10, None)
    with pytest.raises(RuntimeError, match="int16 or int32"):
        torch.ops.subkern.csr_linear(torch.randn(2, 10), rp, ci.long(), va, 10, None)
    with pytest.raises(RuntimeError, match="row_ptr"):
        torch.ops.subkern.csr_matmul(rp.int(), ci, va, torch.randn(10, 3), 10)
    with pytest.raises(RuntimeError, match="in_features is 0"):
        torch.ops.subkern.csr_linear(torch.randn(2, 0), rp, ci, va, 0, None)


def test_explicit_unavailable_backend_raises():
    w = sparse_weight(4, 10, 0.5)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError):
        S.csr_linear(torch.randn(2, 10), *csr_args(S.pack_csr(w)), 10)


# --------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile, properties
# --------------------------------------------------------------------------------------------

def test_gradients_match_dense():
    w = sparse_weight(9, 70, 0.2)
    p, pb = S.pack_csr(w), S.pack_bitmap(w)
    bias = torch.randn(9, requires_grad=True)
    x = torch.randn(5, 70, requires_grad=True)
    g = torch.randn(5, 9)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    gx2, gb2 = torch.autograd.grad(F.linear(x2, w, b2), (x2, b2), g)
    for y in (torch.ops.subkern.csr_linear(x, *csr_args(p), 70, bias),
              torch.ops.subkern.bitmap_linear(x, *bitmap_args(pb), 70, bias)):
        gx, gb = torch.autograd.grad(y, (x, bias), g)
        torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gb, gb2, atol=1e-5, rtol=1e-5)
    X = torch.randn(70, 6, requires_grad=True)
    gY = torch.randn(9, 6)
    (gX,) = torch.autograd.grad(torch.ops.subkern.csr_matmul(*csr_args(p), X, 70), (X,), gY)
    torch.testing.assert_close(gX, w.t() @ gY, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient")
def test_gradcheck():
    # The ops take float32 at most, so finite differences run in float32: the maps are linear in
    # x, so the numerical Jacobian is exact up to float32 rounding.
    w = sparse_weight(5, 12, 0.4)
    p, pb = S.pack_csr(w), S.pack_bitmap(w)
    x = torch.randn(3, 12, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    kw = {"eps": 1e-2, "atol": 1e-3, "rtol": 1e-3}
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.subkern.csr_linear(a, *csr_args(p), 12, b), (x, bias), **kw)
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.subkern.bitmap_linear(a, *bitmap_args(pb), 12, b), (x, bias),
        **kw)
    X = torch.randn(12, 4, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: torch.ops.subkern.csr_matmul(*csr_args(p), a, 12), (X,), **kw)


def test_opcheck():
    w = sparse_weight(9, 70, 0.2)
    p = S.pack_csr(w)
    p32 = S.pack_csr(w, torch.int32, torch.bfloat16)
    pb = S.pack_bitmap(w)
    for args in [(torch.randn(5, 70), *csr_args(p), 70, torch.randn(9)),
                 (torch.randn(1, 70), *csr_args(p32), 70, None),
                 (torch.randn(3, 70, requires_grad=True), *csr_args(p), 70, None)]:
        torch.library.opcheck(torch.ops.subkern.csr_linear.default, args)
    for args in [(*csr_args(p), torch.randn(70, 6), 70),
                 (*csr_args(p32), torch.randn(70, 3, requires_grad=True), 70)]:
        torch.library.opcheck(torch.ops.subkern.csr_matmul.default, args)
    for args in [(torch.randn(5, 70), *bitmap_args(pb), 70, torch.randn(9)),
                 (torch.randn(2, 70, requires_grad=True), *bitmap_args(pb), 70, None)]:
        torch.library.opcheck(torch.ops.subkern.bitmap_linear.default, args)


def test_torch_compile_fullgraph():
    w = sparse_weight(9, 70, 0.2)
    p, pb = S.pack_csr(w), S.pack_bitmap(w)
    bias = torch.randn(9)

    def f(x):
        y = S.csr_linear(x, *csr_args(p), 70, bias) + S.bitmap_linear(x, *bitmap_args(pb), 70)
        return torch.relu(y) + S.csr_matmul(*csr_args(p), x.t(), 70).t()

    x = torch.randn(4, 70)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


@needs_cpp
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 40), out=st.integers(0, 40), inp=st.integers(0, 300),
       density=st.sampled_from(DENSITIES), seed=st.integers(0, 2**16),
       value_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_property_cpp_equals_reference(batch, out, inp, density, seed, value_dtype):
    w = sparse_weight(out, inp, density, seed)
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(seed))
    p = S.pack_csr(w, value_dtype=value_dtype)
    pb = S.pack_bitmap(w, value_dtype)
    with use_backend("reference"):
        ref = S.csr_linear(x, *csr_args(p), inp)
    with use_backend("cpp"):
        y = S.csr_linear(x, *csr_args(p), inp)
        yb = S.bitmap_linear(x, *bitmap_args(pb), inp)
        ym = S.csr_matmul(*csr_args(p), x.t(), inp)
    for got in (y, yb, ym.t()):
        torch.testing.assert_close(got, ref, atol=tol(inp), rtol=1e-5)
