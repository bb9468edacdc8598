"""csr_linear / csr_matmul / bitmap_linear on a GPU (CUDA C++ and Triton) against the dense
product of the same weight computed on CPU in float64.

Marked ``gpu``: skipped cleanly where there is no CUDA device (conftest). The ``cuda`` backend
needs ``subkern._C`` built with its CUDA kernels; without them its tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subkern  # noqa: F401
from subkern import _ext
from subkern.backend import use_backend
from subkern.ops import sparse_linear as S

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1, 1), (1, 5, 3), (3, 17, 64), (5, 123, 200), (16, 64, 513), (9, 13, 130),
          (40, 33, 100), (1, 4096, 11008), (16, 3072, 768), (0, 4, 5), (3, 0, 7), (2, 3, 0)]
DENSITIES = [0.0, 0.5, 0.1, 0.01, 1.0]


@pytest.fixture(params=["cuda", "triton"])
def backend(request) -> str:
    if request.param == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip(f"subkern._C has no CUDA kernels: {_ext.load_error() or 'built without CUDA'}")
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


def sparse_weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) / max(1, inp) ** 0.5
    return w * (torch.rand(out, inp, generator=g) < density)


def cuda(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in p.items()}


@pytest.mark.parametrize("batch,out,inp", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_csr_linear_matches_dense(backend, batch, out, inp, density):
    w = sparse_weight(out, inp, density, seed=out + inp)
    x = torch.randn(batch, inp)
    bias = torch.randn(out)
    expected = F.linear(x.double(), w.double(), bias.double())
    for index_dtype in (torch.int16, torch.int32):
        p = cuda(S.pack_csr(w, index_dtype))
        with use_backend(backend):
            y = S.csr_linear(x.cuda(), p["row_ptr"], p["col_idx"], p["values"], inp, bias.cuda())
        assert y.shape == (batch, out) and y.is_cuda
        torch.testing.assert_close(y.double().cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["warp", "xt"])
@pytest.mark.parametrize("batch", [1, 2, 4, 6, 8, 13, 16, 17, 40])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_cuda_row_warp_and_transposed_kernels(monkeypatch, kernel, batch, value_dtype):
    """Both CUDA csr_linear kernels (SUBKERN_CUDA_CSR_KERNEL=warp: x[b, col] per batch row;
    xt, the default from batch 2: x transposed, float4 runs of 4/8/16 batch rows) on ragged
    rows, one-tile and multi-tile batches, both index widths, bias."""
    if not _ext.has_cuda_kernels():
        pytest.skip("subkern._C has no CUDA kernels")
    monkeypatch.setenv("SUBKERN_CUDA_CSR_KERNEL", kernel)
    w = sparse_weight(77, 1500, 0.07, seed=batch)
    w[5] = 0
    wq = w.to(value_dtype).float()
    x, bias = torch.randn(batch, 1500), torch.randn(77)
    expected = F.linear(x.double(), wq.double(), bias.double())
    for index_dtype in (torch.int16, torch.int32):
        p = cuda(S.pack_csr(w, index_dtype, value_dtype=value_dtype))
        with use_backend("cuda"):
            y = S.csr_linear(x.cuda(), p["row_ptr"], p["col_idx"], p["values"], 1500,
                             bias.cuda())
        torch.testing.assert_close(y.double().cpu(), expected, atol=1e-4, rtol=1e-4)


def test_cuda_kernel_choice_is_checked(monkeypatch):
    if not _ext.has_cuda_kernels():
        pytest.skip("subkern._C has no CUDA kernels")
    monkeypatch.setenv("SUBKERN_CUDA_CSR_KERNEL", "fastest")
    p = cuda(S.pack_csr(sparse_weight(4, 8, 0.5)))
    with use_backend("cuda"), pytest.raises(RuntimeError, match="auto, warp or xt"):
        S.csr_linear(torch.randn(2, 8).cuda(), p["row_ptr"], p["col_idx"], p["values"], 8)


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_half_values_and_activations(backend, value_dtype, x_dtype):
    w = sparse_weight(300, 1000, 0.05)
    x = torch.randn(7, 1000).to(x_dtype)
    p = cuda(S.pack_csr(w, value_dtype=value_dtype))
    with use_backend(backend):
        y = S.csr_linear(x.cuda(), p["row_ptr"], p["col_idx"], p["values"], 1000)
    assert y.dtype == x_dtype
    expected = F.linear(x.double(), w.to(value_dtype).double())
    tol = 1e-4 if x_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double().cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("n", [1, 16, 100])
def test_triton_csr_matmul_and_bitmap(n):
    pytest.importorskip("triton")
    w = sparse_weight(257, 300, 0.1)
    X = torch.randn(300, n)
    p = cuda(S.pack_csr(w))
    pb = cuda(S.pack_bitmap(w))
    with use_backend("triton"):
        Y = S.csr_matmul(p["row_ptr"], p["col_idx"], p["values"], X.cuda(), 300)
        yb = S.bitmap_linear(X.t().contiguous().cuda(), pb["bitmap"], pb["row_ptr"],
                             pb["values"], 300)
    torch.testing.assert_close(Y.double().cpu(), w.double() @ X.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(yb.double().cpu(), (w.double() @ X.double()).t(), atol=1e-4,
                               rtol=1e-4)
    bias = torch.randn(257)
    for backend in ("triton", "auto"):   # auto: the CUDA dispatch of the op (Triton fallback)
        with use_backend(backend):
            Yb = S.csr_matmul(p["row_ptr"], p["col_idx"], p["values"], X.cuda(), 300,
                              bias.cuda(), True)
        ref = torch.relu(w.double() @ X.double() + bias.double().unsqueeze(1))
        torch.testing.assert_close(Yb.double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_auto_backend_and_compile_on_cuda():
    w = sparse_weight(64, 128, 0.1)
    p = cuda(S.pack_csr(w))
    x = torch.randn(4, 128, device="cuda")

    def f(a):
        return torch.relu(S.csr_linear(a, p["row_ptr"], p["col_idx"], p["values"], 128))

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(f(x).double().cpu(), torch.relu(F.linear(x.double().cpu(),
                                                                         w.double())),
                               atol=1e-4, rtol=1e-4)
