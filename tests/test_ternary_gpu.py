"""The CUDA and Triton ternary_linear kernels on a GPU against the torch reference (run on CPU).

Marked ``gpu``: skipped cleanly where there is no CUDA device (conftest). The ``cuda`` backend
needs ``subkern._C`` built with its CUDA kernels; without them its tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import require_gpu_backend

import subkern  # noqa: F401
from subkern.backend import use_backend
from subkern.nn.supermask import SupermaskConv2d, SupermaskLinear
from subkern.ops import ternary as T

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1, 1), (1, 5, 3), (3, 17, 64), (5, 123, 200), (16, 64, 512), (9, 13, 130),
          (17, 40, 100), (1, 4096, 4096), (16, 3072, 768), (0, 4, 5), (3, 0, 7), (2, 3, 0)]


@pytest.fixture(params=["cuda", "triton"])
def backend(request) -> str:
    return require_gpu_backend(request.param)


def _case(batch: int, out: int, inp: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (out, inp), generator=g).float() * 0.05
    mb, sb, c = T.pack_ternary(w)
    x = torch.randn(batch, inp, generator=g)
    bias = torch.randn(out, generator=g)
    return w, mb, sb, c, x, bias


@pytest.mark.parametrize("batch,out,inp", SHAPES)
def test_matches_cpu_reference(backend, batch, out, inp):
    w, mb, sb, c, x, bias = _case(batch, out, inp)
    for b in (None, bias):
        with use_backend("reference"):
            expected = T.ternary_linear(x, mb, sb, c, inp, b)
        with use_backend(backend):
            got = T.ternary_linear(x.cuda(), mb.cuda(), sb.cuda(), c, inp,
                                   None if b is None else b.cuda())
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4 * max(1, inp ** 0.5),
                                   rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    w, mb, sb, c, x, bias = _case(7, 50, 300)
    x = x.to(dtype)
    expected = torch.nn.functional.linear(x.float(), w, bias).to(dtype)
    with use_backend(backend):
        got = T.ternary_linear(x.cuda(), mb.cuda(), sb.cuda(), c, 300, bias.cuda())
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected, atol=3e-2, rtol=2e-2)


def test_padding_bits_ignored(backend):
    w, mb, sb, c, x, _ = _case(3, 6, 70)
    mb[:, 1] |= -(1 << 20)
    sb[:, 1] |= -(1 << 30)
    with use_backend(backend):
        got = T.ternary_linear(x.cuda(), mb.cuda(), sb.cuda(), c, 70)
    torch.testing.assert_close(got.cpu(), x @ w.t(), atol=1e-4, rtol=1e-4)


def test_supermask_layers_on_gpu():
    w = torch.where(torch.rand(12, 8, 3, 3) < 0.5, 0.2, -0.2)
    mask = torch.rand(12, 8, 3, 3) < 0.5
    conv = SupermaskConv2d.from_weight_and_mask(w, mask, torch.randn(12), padding=1, groups=2)
    x = torch.randn(2, 16, 9, 9)  # groups=2: 2 x 8 input channels
    expected = conv(x)
    torch.testing.assert_close(conv.cuda()(x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
    wl = torch.where(torch.rand(10, 70) < 0.5, 0.1, -0.1)
    lin = SupermaskLinear.from_weight_and_mask(wl, torch.rand(10, 70) < 0.3, torch.randn(10))
    xl = torch.randn(5, 70)
    torch.testing.assert_close(lin.cuda()(xl.cuda()).cpu(), lin.cpu()(xl), atol=1e-4, rtol=1e-4)
