"""Triton kernels of csr_linear / csr_matmul / bitmap_linear against the dense product (small
shapes: on a machine without CUDA they run under ``TRITON_INTERPRET=1``, see conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subkern  # noqa: F401
from subkern import backend as _backend
from subkern.backend import use_backend
from subkern.ops import sparse_linear as S

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _needs_triton():
    why = _backend.unavailable_reason("triton", torch.device(DEVICE))
    if why is not None:
        pytest.skip(why)


def sparse_weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) < density)


def to_dev(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in p.items()}


def dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.double().cpu(), w.double(), None if bias is None else bias.double().cpu())


CASES = [  # (batch, out, in, density): SpMV path (batch <= 16), SpMM path, empty, extremes
    (1, 5, 3, 0.5), (3, 17, 70, 0.1), (16, 9, 130, 0.99), (20, 6, 40, 1.0), (2, 7, 33, 0.0),
    (5, 11, 90, 0.3), (12, 8, 200, 0.05),   # x read transposed (batch >= 2), ragged batch
    (0, 4, 5, 0.5), (3, 0, 7, 0.5), (2, 3, 0, 0.5),
]


@pytest.mark.parametrize("batch,out,inp,density", CASES)
def test_triton_csr_linear_and_bitmap(batch, out, inp, density):
    w = sparse_weight(out, inp, density, seed=out + inp)
    x = torch.randn(batch, inp).to(DEVICE)
    bias = torch.randn(out).to(DEVICE)
    expected = dense(x, w, bias)
    p = to_dev(S.pack_csr(w))
    pb = to_dev(S.pack_bitmap(w))
    with use_backend("triton"):
        y = S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], inp, bias)
        yb = S.bitmap_linear(x, pb["bitmap"], pb["row_ptr"], pb["values"], inp, bias)
    for got in (y, yb):
        assert got.shape == (batch, out) and got.dtype == torch.float32
        torch.testing.assert_close(got.double().cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 70])
def test_triton_csr_matmul(n):
    w = sparse_weight(11, 90, 0.2)
    X = torch.randn(90, n).to(DEVICE)
    p = to_dev(S.pack_csr(w, torch.int32, torch.bfloat16))
    with use_backend("triton"):
        Y = S.csr_matmul(p["row_ptr"], p["col_idx"], p["values"], X, 90)
    expected = w.bfloat16().double() @ X.double().cpu()
    torch.testing.assert_close(Y.double().cpu(), expected, atol=1e-4, rtol=1e-5)


def test_triton_unsigned_int16_columns_and_half():
    w = sparse_weight(3, 40000, 0.001)
    w[:, 39999] = 2.0
    w[:, 32768] = -1.0
    x = torch.randn(2, 40000).to(DEVICE)
    p = to_dev(S.pack_csr(w, torch.int16, torch.float16))
    assert p["col_idx"].dtype == torch.int16
    with use_backend("triton"):
        y = S.csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], 40000)
        yh = S.csr_linear(x.bfloat16(), p["row_ptr"], p["col_idx"], p["values"], 40000)
    torch.testing.assert_close(y.double().cpu(), dense(x, w.half().float()), atol=1e-3,
                               rtol=1e-5)
    assert yh.dtype == torch.bfloat16
    torch.testing.assert_close(yh.double().cpu(), dense(x.bfloat16().float(), w.half().float()),
                               atol=0.1, rtol=2e-2)


def test_triton_corrupt_columns_stay_in_bounds():
    w = sparse_weight(4, 20, 0.5)
    p = to_dev(S.pack_csr(w, torch.int32))
    bad = p["col_idx"].clone()
    bad[0] = 10**6                                       # masked: contributes nothing
    x = torch.randn(2, 20).to(DEVICE)
    with use_backend("triton"):
        y = S.csr_linear(x, p["row_ptr"], bad, p["values"], 20)
    assert torch.isfinite(y).all()
