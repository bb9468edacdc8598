"""subkern::ternary_linear: every backend against the torch reference (the dense F.linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import dense_linear_fp64 as dense
from _helpers import needs_cpp, ternary_weight
from _helpers import ternary_tol as tol

import subkern  # noqa: F401  (loads the op library and subkern._C)
from subkern import _ext
from subkern.backend import BackendUnavailableError, use_backend
from subkern.ops import ternary as T

SHAPES = [  # (batch, out, in)
    (1, 1, 1), (1, 5, 3), (3, 17, 64), (5, 123, 200), (16, 64, 512), (9, 13, 130),
    (17, 40, 100), (2, 8, 65), (4, 9, 63), (1, 16, 1000),
]


def test_pack_roundtrip_and_layout():
    w = ternary_weight(7, 130)
    mb, sb, c = T.pack_ternary(w)
    assert mb.dtype == torch.int64 and mb.shape == (7, 3) and sb.shape == (7, 3)
    assert c == pytest.approx(0.37)
    torch.testing.assert_close(T.unpack_ternary(mb, sb, c, 130), w)
    # bit i of row o is bit i % 64 of word i // 64 (LSB first); padding bits are zero
    for o in range(7):
        for i in (0, 1, 63, 64, 127, 129):
            bit = (int(mb[o, i // 64]) >> (i % 64)) & 1
            assert bit == int(w[o, i] != 0)
    assert int(mb[:, 2].bitwise_right_shift(2).abs().sum()) == 0
    # sign bits are zero where the mask is zero
    assert not bool(((sb & ~mb) != 0).any())


def test_pack_ternary_rejects_non_constant_magnitudes():
    w = ternary_weight(4, 10)
    w[0, 0] = 0.5
    with pytest.raises(ValueError, match="single c"):
        T.pack_ternary(w)
    with pytest.raises(ValueError, match="NaN"):
        T.pack_ternary(torch.full((2, 2), float("nan")))
    mb, sb, c = T.pack_ternary(torch.zeros(3, 5))
    assert c == 1.0 and int(mb.abs().sum()) == 0


@pytest.mark.parametrize("batch,out,inp", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_dense(batch, out, inp, with_bias):
    w = ternary_weight(out, inp)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(batch, inp)
    bias = torch.randn(out) if with_bias else None
    with use_backend("reference"):
        y = T.ternary_linear(x, mb, sb, c, inp, bias)
    torch.testing.assert_close(y.double(), dense(x, w, bias), atol=tol(inp), rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("batch,out,inp", SHAPES + [(8, 24, 256), (0, 4, 5), (3, 0, 7),
                                                     (2, 3, 0)])
def test_cpp_matches_reference(cpu_isa, batch, out, inp):
    w = ternary_weight(out, inp, seed=batch + out + inp)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(batch, inp)
    bias = torch.randn(out)
    for b in (None, bias):
        with use_backend("cpp"):
            y = T.ternary_linear(x, mb, sb, c, inp, b)
        assert y.shape == (batch, out) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), dense(x, w, b), atol=tol(inp), rtol=1e-5)


@needs_cpp
def test_cpp_large_multithreaded(cpu_isa):
    w = ternary_weight(1024, 768, scale=0.05)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(13, 768)
    with use_backend("cpp"):
        y = T.ternary_linear(x, mb, sb, c, 768)
    torch.testing.assert_close(y.double(), dense(x, w, None), atol=1e-4, rtol=1e-5)


@needs_cpp
def test_padding_bits_are_ignored(cpu_isa):
    w = ternary_weight(6, 70)
    mb, sb, c = T.pack_ternary(w)
    mb[:, 1] |= -(1 << 20)  # set bits 84..127 of word 1: past in_features = 70
    sb[:, 1] |= -(1 << 30)
    x = torch.randn(3, 70)
    expected = dense(x, w, None)
    for backend in ("reference", "cpp"):
        with use_backend(backend):
            y = T.ternary_linear(x, mb, sb, c, 70)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_half_inputs(dtype, backend):
    if backend == "cpp" and not _ext.has_cpu_kernels():
        pytest.skip("subkern._C not built")
    w = ternary_weight(20, 100, scale=0.1)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(4, 100).to(dtype)
    bias = torch.randn(20)
    with use_backend(backend):
        y = T.ternary_linear(x, mb, sb, c, 100, bias)
    assert y.dtype == dtype
    # float32 accumulation of the same inputs: only the final rounding to dtype may differ
    expected = dense(x.float(), w, bias).to(dtype)
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=1e-2)


@needs_cpp
def test_half_inputs_exact_accumulation():
    w = ternary_weight(20, 100, scale=0.1)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(4, 100).to(torch.bfloat16)
    with use_backend("cpp"):
        y = T.ternary_linear(x, mb, sb, c, 100)
    expected = dense(x.float(), w, None).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=1e-2)


def test_noncontiguous_and_batched_shapes():
    w = ternary_weight(10, 33)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(33, 12).t()          # non-contiguous [12, 33]
    x3 = torch.randn(2, 3, 33)
    y = T.ternary_linear(x, mb, sb, c, 33)
    torch.testing.assert_close(y.double(), dense(x, w, None), atol=1e-5, rtol=1e-5)
    y3 = T.ternary_linear(x3, mb, sb, c, 33)
    assert y3.shape == (2, 3, 10)
    torch.testing.assert_close(y3.double(), dense(x3, w, None), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    w = ternary_weight(4, 10)
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(2, 10)
    with pytest.raises(TypeError, match="float32"):
        T.ternary_linear(x.long(), mb, sb, c, 10)
    with pytest.raises(ValueError, match=r"\[\.\.\., 11\]"):
        T.ternary_linear(x, mb, sb, c, 11)
    with pytest.raises(TypeError, match="int64"):
        T.ternary_linear(x, mb.int(), sb, c, 10)
    with pytest.raises(ValueError, match="shape"):
        T.ternary_linear(x, mb, sb[:3], c, 10)
    with pytest.raises(ValueError, match="shape"):
        T.ternary_linear(x, mb[:, :0], sb[:, :0], c, 10)
    with pytest.raises(ValueError, match="bias"):
        T.ternary_linear(x, mb, sb, c, 10, torch.randn(5))
    with pytest.raises(ValueError, match="in_features"):
        T.ternary_linear(x, mb, sb, c, -1)


@needs_cpp
def test_cpp_kernel_checks_directly():
    w = ternary_weight(4, 10)
    mb, sb, c = T.pack_ternary(w)
    with pytest.raises(RuntimeError, match="in_features"):
        torch.ops.subkern.ternary_linear(torch.randn(2, 9), mb, sb, c, 10, None)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.subkern.ternary_linear(torch.randn(2, 10), mb.int(), sb, c, 10, None)


def test_explicit_unavailable_backend_raises():
    w = ternary_weight(4, 10)
    mb, sb, c = T.pack_ternary(w)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError):
        T.ternary_linear(torch.randn(2, 10), mb, sb, c, 10)


def test_triton_matches_reference():
    from subkern import backend as _backend

    why = _backend.unavailable_reason("triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    for batch, out, inp in [(1, 5, 3), (3, 40, 130), (17, 33, 64), (2, 3, 200), (0, 3, 4),
                            (2, 3, 0)]:
        w = ternary_weight(out, inp)
        mb, sb, c = T.pack_ternary(w)
        x = torch.randn(batch, inp)
        bias = torch.randn(out)
        with use_backend("triton"):
            y = T.ternary_linear(x, mb, sb, c, inp, bias)
        torch.testing.assert_close(y.double(), dense(x, w, bias), atol=tol(inp), rtol=1e-5)


def test_gradients_match_dense():
    w = ternary_weight(9, 70)
    mb, sb, c = T.pack_ternary(w)
    bias = torch.randn(9, requires_grad=True)
    x = torch.randn(5, 70, requires_grad=True)
    y = torch.ops.subkern.ternary_linear(x, mb, sb, c, 70, bias)
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), g)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    gx2, gb2 = torch.autograd.grad(F.linear(x2, w, b2), (x2, b2), g)
    torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, gb2)


def test_opcheck():
    w = ternary_weight(9, 70)
    mb, sb, c = T.pack_ternary(w)
    for args in [(torch.randn(5, 70), mb, sb, c, 70, torch.randn(9)),
                 (torch.randn(1, 70), mb, sb, c, 70, None),
                 (torch.randn(3, 70, requires_grad=True), mb, sb, c, 70, None)]:
        torch.library.opcheck(torch.ops.subkern.ternary_linear.default, args)


def test_torch_compile_fullgraph():
    w = ternary_weight(9, 70)
    mb, sb, c = T.pack_ternary(w)
    bias = torch.randn(9)

    def f(x):
        return torch.relu(T.ternary_linear(x, mb, sb, c, 70, bias)) * 2

    x = torch.randn(4, 70)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
