"""csr_matmul's fused epilogue (``relu?(W @ X + bias)``), strided ``X``, the column-panel SpMM
(wide layers at larger batches) and SparseConv2d's ReLU fusion, on every backend and CPU ISA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import subkern  # noqa: F401  (loads the op library and subkern._C)
from subkern import _ext
from subkern.backend import use_backend
from subkern.nn.sparse import SparseConv2d, fuse_relu_
from subkern.ops import sparse_linear as S

needs_cpp = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="subkern._C not built")


def sparse_weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


def expected(w: torch.Tensor, X: torch.Tensor, bias: torch.Tensor | None, relu: bool
             ) -> torch.Tensor:
    y = w.double() @ X.double()
    if bias is not None:
        y = y + bias.double().unsqueeze(1)
    return torch.relu(y) if relu else y


def args(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p["row_ptr"], p["col_idx"], p["values"]


# (out, in, N): ragged; N = 1 / 5 / 16 / 130; (24, 7000, 40) and (40, 5000, 130) cut the input
# features into column panels (X's batch block, in x min(N, 64) floats, exceeds 1 MB).
SHAPES = [(7, 33, 1), (19, 70, 5), (33, 129, 16), (5, 300, 130), (24, 7000, 40),
          (40, 5000, 130)]


@needs_cpp
@pytest.mark.parametrize("out,inp,n", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 0.9, 1.0])
def test_cpp_epilogue_matches_dense(cpu_isa, out, inp, n, density):
    w = sparse_weight(out, inp, density, seed=out + n)
    X = torch.randn(inp, n)
    bias = torch.randn(out)
    p = S.pack_csr(w)
    with use_backend("cpp"):
        for b, relu in ((None, False), (bias, False), (None, True), (bias, True)):
            y = S.csr_matmul(*args(p), X, inp, b, relu)
            torch.testing.assert_close(y.double(), expected(w, X, b, relu), atol=1e-4 * inp ** 0.5,
                                       rtol=1e-4)
            if relu:
                assert bool((y >= 0).all())


@needs_cpp
@pytest.mark.parametrize("batch", [5, 16, 130])
def test_cpp_csr_linear_panels_and_bias(cpu_isa, batch):
    """csr_linear's SpMM path (bias fused) on a layer wide enough for column panels."""
    out, inp = 21, {5: 53000, 16: 17000, 130: 5000}[batch]      # X^T's block > 1 MB: panels
    w = sparse_weight(out, inp, 0.1, seed=batch)
    x, bias = torch.randn(batch, inp), torch.randn(out)
    p = S.pack_csr(w, index_dtype=torch.int32 if batch == 16 else None)
    with use_backend("cpp"):
        y = S.csr_linear(x, *args(p), inp, bias)
    ref = F.linear(x.double(), w.double(), bias.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * inp ** 0.5, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
def test_cpp_epilogue_half(value_dtype):
    w = sparse_weight(30, 2100, 0.2, seed=3)
    p = S.pack_csr(w, value_dtype=value_dtype)
    wq = S.unpack_csr(p, w.shape, torch.float32)
    X, bias = torch.randn(2100, 70).to(value_dtype), torch.randn(30)
    with use_backend("cpp"):
        y = S.csr_matmul(*args(p), X, 2100, bias, True)
    assert y.dtype == value_dtype
    torch.testing.assert_close(y.double(), expected(wq, X.float(), bias, True), atol=0.3,
                               rtol=2e-2)


@needs_cpp
@pytest.mark.parametrize("batch", [4, 7, 15, 64, 65, 130, 300])
def test_cpp_column_blocks(cpu_isa, batch):
    """The SpMM's column-blocked X: batches of 4-15 padded to a 16-float block, whole and ragged
    64-column blocks, and several groups of blocks per pass of the weight (in = 2000: 512 KB
    per block, two blocks per group), through csr_linear (transposed into blocks) and csr_matmul
    (staged from a strided, a contiguous and a bfloat16 X)."""
    out, inp = 37, 2000
    w = sparse_weight(out, inp, 0.05, seed=batch)
    x, bias = torch.randn(batch, inp), torch.randn(out)
    p = S.pack_csr(w)
    ref = F.linear(x.double(), w.double(), bias.double())
    atol = 1e-4 * inp ** 0.5
    with use_backend("cpp"):
        y = S.csr_linear(x, *args(p), inp, bias)
        torch.testing.assert_close(y.double(), ref, atol=atol, rtol=1e-4)
        wide = torch.randn(inp, batch + 9)
        wide[:, 3:3 + batch] = x.t()
        for X in (x.t().contiguous(), wide[:, 3:3 + batch]):
            ym = S.csr_matmul(*args(p), X, inp, bias, True)
            torch.testing.assert_close(ym.double(), torch.relu(ref.t()), atol=atol, rtol=1e-4)
        yh = S.csr_matmul(*args(p), x.t().to(torch.bfloat16), inp, bias)
    xq = x.to(torch.bfloat16).double()
    torch.testing.assert_close(yh.double(), F.linear(xq, w.double(), bias.double()).t(),
                               atol=0.1, rtol=2e-2)


@needs_cpp
def test_strided_X_is_read_in_place_and_transposed_X_copied():
    w = sparse_weight(17, 50, 0.3, seed=1)
    p = S.pack_csr(w)
    A = torch.randn(50, 90)
    bias = torch.randn(17)
    for X in (A[:, 3:70], A[:, :1], A.t().contiguous().t()[:, 5:40]):
        with use_backend("cpp"):
            y = S.csr_matmul(*args(p), X, 50, bias, True)
        torch.testing.assert_close(y.double(), expected(w, X, bias, True), atol=1e-4, rtol=1e-4)
    X = torch.randn(33, 50).t()                                       # stride(1) != 1
    with use_backend("cpp"):
        y = torch.ops.subkern.csr_matmul(*args(p), X, 50, bias, False)
    torch.testing.assert_close(y.double(), expected(w, X, bias, False), atol=1e-4, rtol=1e-4)


@needs_cpp
def test_empty_cases_apply_the_epilogue():
    bias = torch.tensor([1.0, -2.0, 0.5])
    p = S.pack_csr(torch.zeros(3, 8))
    with use_backend("cpp"):
        y = S.csr_matmul(*args(p), torch.randn(8, 4), 8, bias, True)
        torch.testing.assert_close(y, torch.relu(bias).unsqueeze(1).expand(3, 4))
        assert S.csr_matmul(*args(p), torch.randn(8, 0), 8, bias, True).shape == (3, 0)


@needs_cpp
def test_corrupt_column_raises_with_epilogue():
    w = sparse_weight(9, 2500, 0.2)
    p = S.pack_csr(w, index_dtype=torch.int32)
    p["col_idx"][5] = 2600
    with use_backend("cpp"), pytest.raises(RuntimeError, match="col_idx holds column"):
        S.csr_matmul(*args(p), torch.randn(2500, 70), 2500, torch.randn(9), True)


def test_bad_epilogue_arguments():
    p = S.pack_csr(sparse_weight(4, 6, 0.5))
    with pytest.raises(ValueError, match="bias"):
        S.csr_matmul(*args(p), torch.randn(6, 3), 6, torch.randn(5))
    with pytest.raises(TypeError, match="relu"):
        S.csr_matmul(*args(p), torch.randn(6, 3), 6, None, 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_other_backends_epilogue(backend):
    # Triton runs CUDA tensors where there is a GPU (CPU tensors only under its interpreter)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    w = sparse_weight(13, 40, 0.4, seed=2)
    p = S.pack_csr(w)
    X, bias = torch.randn(40, 20), torch.randn(13)
    with use_backend(backend):
        y = S.csr_matmul(*(t.to(device) for t in args(p)), X.to(device), 40, bias.to(device),
                         True)
    assert y.device.type == device
    torch.testing.assert_close(y.cpu().double(), expected(w, X, bias, True), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_with_bias_and_relu():
    # float32 finite differences (the ops take float32 at most); inputs chosen with every
    # pre-activation at least 0.05 away from the ReLU's kink, so the map is locally linear.
    w = sparse_weight(6, 9, 0.6, seed=4)
    p = S.pack_csr(w)
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        X, b = torch.randn(9, 5, generator=g), torch.randn(6, generator=g)
        pre = w @ X + b.unsqueeze(1)
        if float(pre.abs().min()) > 0.05 and bool((pre > 0).any()) and bool((pre < 0).any()):
            break
    X.requires_grad_(True)
    b.requires_grad_(True)
    kw = {"eps": 1e-3, "atol": 2e-3, "rtol": 2e-3}
    assert torch.autograd.gradcheck(
        lambda a, c: torch.ops.subkern.csr_matmul(*args(p), a, 9, c, True), (X, b), **kw)
    gY = torch.randn(6, 5)
    y = torch.ops.subkern.csr_matmul(*args(p), X, 9, b, True)
    gX, gb = torch.autograd.grad(y, (X, b), gY)
    mask = pre > 0
    torch.testing.assert_close(gX, w.t() @ (gY * mask))
    torch.testing.assert_close(gb, (gY * mask).sum(1))


def test_opcheck_and_compile():
    p = S.pack_csr(sparse_weight(11, 30, 0.3, seed=5))
    X, bias = torch.randn(30, 7), torch.randn(11)
    torch.library.opcheck(torch.ops.subkern.csr_matmul.default, (*args(p), X, 30, bias, True))
    torch.library.opcheck(torch.ops.subkern.csr_matmul.default, (*args(p), X, 30))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a):
        return torch.ops.subkern.csr_matmul(*args(p), a, 30, bias, True) * 2

    torch.testing.assert_close(f(X), 2 * S.csr_matmul(*args(p), X, 30, bias, True))


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 40), n=st.integers(0, 70),
       density=st.sampled_from([0.0, 0.3, 1.0]), relu=st.booleans(), has_bias=st.booleans())
def test_property_epilogue(out, inp, n, density, relu, has_bias):
    w = sparse_weight(out, inp, density, seed=n)
    X = torch.randn(inp, n)
    bias = torch.randn(out) if has_bias else None
    y = S.csr_matmul(*args(S.pack_csr(w)), X, inp, bias, relu)
    torch.testing.assert_close(y.double(), expected(w, X, bias, relu), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# SparseConv2d relu flag and fuse_relu_
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csr", "dense"])
@pytest.mark.parametrize("kernel,stride,n", [(1, 1, 1), (3, 2, 2)])
def test_sparse_conv_relu(fmt, kernel, stride, n):
    conv = nn.Conv2d(6, 10, kernel, stride, padding=kernel // 2)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    layer = SparseConv2d.from_dense(conv, fmt, relu=True)
    assert layer.relu and layer.deploy_config()["relu"] is True
    x = torch.randn(n, 6, 9, 11)
    torch.testing.assert_close(layer(x), torch.relu(conv(x)), atol=1e-5, rtol=1e-5)
    again = SparseConv2d(**layer.deploy_config())
    again.load_state_dict(layer.state_dict())
    torch.testing.assert_close(again(x), layer(x))
    assert "relu" not in SparseConv2d.from_dense(conv, fmt).deploy_config()
    with pytest.raises(TypeError, match="relu"):
        SparseConv2d(6, 10, 3, relu=1)


def test_fuse_relu_():
    c1, c2 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(SparseConv2d.from_dense(c1, "csr"), nn.Identity(), nn.ReLU(),
                          SparseConv2d.from_dense(c2, "dense"), nn.ReLU(), nn.Sigmoid())
    x = torch.randn(1, 4, 6, 6)
    before = model(x)
    assert fuse_relu_(model) == 2
    assert fuse_relu_(model) == 0
    assert model[0].relu and model[3].relu
    assert type(model[2]) is nn.Identity and type(model[4]) is nn.Identity
    torch.testing.assert_close(model(x), before)
    with pytest.raises(TypeError, match="model"):
        fuse_relu_("not a module")


@needs_cpp
@pytest.mark.parametrize("kernel,padding,dilation,groups", [
    (3, 1, 1, 1), (3, 0, 1, 2), ((1, 3), (0, 1), 1, 1), (5, 2, 2, 1), (1, 1, 1, 3), (2, 0, 1, 1)])
def test_sparse_conv_implicit_im2col(kernel, padding, dilation, groups):
    """Stride-1 convolutions of one float32 image skip the im2col copy (overlapping X view)."""
    conv = nn.Conv2d(6, 12, kernel, 1, padding, dilation, groups)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.4)
    for relu in (False, True):
        layer = SparseConv2d.from_dense(conv, "csr", relu=relu)
        for hw in ((9, 11), (6, 5), (13, 7)):
            x = torch.randn(1, 6, *hw)
            assert layer._implicit(x)
            ref = conv(x)
            torch.testing.assert_close(layer(x), torch.relu(ref) if relu else ref, atol=1e-5,
                                       rtol=1e-5)
    # batch > 1, bfloat16 and strided convolutions take the im2col path
    assert not layer._implicit(torch.randn(2, 6, 9, 9))
    assert not layer._implicit(torch.randn(1, 6, 9, 9, dtype=torch.bfloat16))
    xg = torch.randn(1, 6, 9, 9, requires_grad=True)
    assert not layer._implicit(xg)
    (g,) = torch.autograd.grad(layer(xg).sum(), xg)
    (g_ref,) = torch.autograd.grad(torch.relu(conv(xg)).sum(), xg)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 6, 10, 8)
    torch.testing.assert_close(layer(x), torch.relu(conv(x)), atol=1e-5, rtol=1e-5)
    # reloading another weight (same nnz, other columns) in place invalidates the cached offsets
    conv2 = nn.Conv2d(6, 12, kernel, 1, padding, dilation, groups)
    with torch.no_grad():
        conv2.weight.copy_(torch.roll(conv.weight, 1, dims=0) * -1.5)
        conv2.bias.copy_(conv.bias)
    layer.load_state_dict(SparseConv2d.from_dense(conv2, "csr", relu=True).state_dict())
    x = torch.randn(1, 6, 9, 11)
    torch.testing.assert_close(layer(x), torch.relu(conv2(x)), atol=1e-5, rtol=1e-5)
