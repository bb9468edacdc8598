"""Triton masked-matmul kernels (kernels/masked_matmul.py) against the reference, on small ragged
shapes: under the Triton interpreter without a GPU (fp32, fp16, fp64), compiled on a GPU
(adds bf16 and the dispatcher's CUDA route)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subkern
from subkern import backend as _backend
from subkern.ops import masked as mk

pytestmark = pytest.mark.skipif(
    _backend.unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available()
                                                       else "cpu")) is not None,
    reason="triton cannot run here (not installed, or no GPU and TRITON_INTERPRET unset)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _data(shape_x, out_f, dtype, bias=True, device=DEVICE):
    in_f = shape_x[-1]
    x = torch.randn(*shape_x, dtype=dtype, device=device)
    w = torch.randn(out_f, in_f, dtype=dtype, device=device)
    s = torch.randn(out_f, in_f, dtype=dtype, device=device)
    b = torch.randn(out_f, dtype=dtype, device=device) if bias else None
    return x, w, s, b


def _reference(x, w, s, b, mask, gy, need):
    """Forward and (grad_x, grad_scores, grad_weight) in float64 by plain autograd."""
    xr, wr, sr = (t.double().detach().requires_grad_() for t in (x, w, s))
    br = b.double() if b is not None else None
    y = F.linear(xr, wr * (mask.double() + sr.abs() - sr.abs().detach()), br)
    y.backward(gy.double())
    return y.detach(), (xr.grad, sr.grad, wr.grad)


def _check(got, want, dtype):
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=TOL[dtype],
                               atol=TOL[dtype])

def _check_grads(need, grads, grads_ref, dtype):
    """Each asked-for gradient matches the reference (shape, dtype, values); the others are
    empty tensors."""
    for flag, got, want in zip(need, grads, grads_ref, strict=True):
        if flag:
            assert got.shape == want.shape and got.dtype == dtype
            _check(got, want, dtype)
        else:
            assert got.numel() == 0

def _step_matches_reference(x, w, s, b, dtype, strategy="auto"):
    """``masked_linear`` forward under the matmul ``strategy`` and backward (after the ``with``
    block, where autograd's CUDA thread runs it): output, grad_x and grad_scores against the
    reference."""
    from subkern.ops.matmul_strategy import use_matmul_strategy

    x.requires_grad_()
    s.requires_grad_()
    with use_matmul_strategy(strategy):
        y = mk.masked_linear(x, w, s, 0.5, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    mask = mk.select_mask(s, 0.5)
    y_ref, (gx_ref, gs_ref, _) = _reference(x, w, s, b, mask, gy, (True, True, False))
    for got, want in ((y, y_ref), (x.grad, gx_ref), (s.grad, gs_ref)):
        _check(got, want, dtype)




def _dtypes():
    out = [torch.float32, torch.float16]
    if DEVICE == "cuda":
        out.append(torch.bfloat16)
    else:
        out.append(torch.float64)  # interpreter only (fp64 dot on GPU is slow and not our target)
    return out


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize(("shape_x", "out_f", "bias", "need"), [
    ((5, 47), 33, True, (True, True, True)),
    ((2, 3, 20), 17, False, (True, True, False)),
    ((1, 16), 1, True, (False, True, False)),
])
def test_kernels_match_reference(dtype, shape_x, out_f, bias, need):
    from subkern.kernels import masked_matmul

    x, w, s, b = _data(shape_x, out_f, dtype, bias)
    mask = mk.select_mask(s, 0.4)
    gy = torch.randn(*shape_x[:-1], out_f, dtype=dtype, device=DEVICE)
    y_ref, grads_ref = _reference(x, w, s, b, mask, gy, need)
    y = masked_matmul.masked_linear_forward(x, w, mask, b)
    assert y.dtype == dtype and y.shape == y_ref.shape
    _check(y, y_ref, dtype)
    grads = masked_matmul.masked_linear_backward(gy, x, w, s, mask, need)
    _check_grads(need, grads, grads_ref, dtype)


def test_public_api_triton_backend_autograd():
    x, w, s, b = _data((5, 47), 33, torch.float32)
    for t in (x, s, b):
        t.requires_grad_()
    gy = torch.randn(5, 33, device=DEVICE)
    with subkern.use_backend("triton"):
        y = mk.masked_linear(x, w, s, 0.3, b)
    y.backward(gy)
    xr, sr, br = (t.detach().clone().requires_grad_() for t in (x, s, b))
    with subkern.use_backend("reference"):
        mk.masked_linear(xr, w, sr, 0.3, br).backward(gy)
    torch.testing.assert_close(y, mk.reference_masked_linear(x, w, s, 0.3, b),
                               rtol=2e-4, atol=2e-4)
    for got, want in ((x.grad, xr.grad), (s.grad, sr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    assert w.grad is None


def test_non_contiguous_and_empty():
    from subkern.kernels import masked_matmul

    w = torch.randn(20, 13, device=DEVICE)
    s = torch.randn(20, 13, device=DEVICE)
    mask = mk.select_mask(s, 0.5)
    x = torch.randn(13, 6, device=DEVICE).t()            # non-contiguous rows
    wt = torch.randn(13, 20, device=DEVICE).t()          # transposed weight storage
    y = masked_matmul.masked_linear_forward(x, wt, mask)
    torch.testing.assert_close(y, F.linear(x, wt * mask), rtol=2e-4, atol=2e-4)
    gy = torch.randn(20, 6, device=DEVICE).t()
    gx, gs, gw = masked_matmul.masked_linear_backward(gy, x, wt, s, mask, (True, True, True))
    g = gy.t() @ x
    torch.testing.assert_close(gx, gy @ (wt * mask), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(gs, g * wt * torch.sign(s), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(gw, g * mask, rtol=2e-4, atol=2e-4)
    # no tokens: empty output, zero weight-side gradients
    x0 = torch.randn(0, 13, device=DEVICE)
    assert masked_matmul.masked_linear_forward(x0, w, mask).shape == (0, 20)
    gx, gs, gw = masked_matmul.masked_linear_backward(torch.randn(0, 20, device=DEVICE), x0, w,
                                                      s, mask, (True, True, True))
    assert gx.shape == (0, 13)
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.gpu
def test_cuda_dispatch_route():
    """On CUDA the op's kernel is Triton (dispatcher), with autograd through the backward op."""
    _step_matches_reference(*_data((64, 96), 80, torch.float16, device="cuda"), torch.float16)


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize(("shape_x", "out_f", "need"), [
    ((5, 47), 33, (True, True, True)),
    ((2, 3, 20), 17, (True, True, False)),
    ((1, 16), 1, (False, True, False)),
    ((4, 9), 6, (False, False, True)),
    ((0, 12), 5, (True, True, True)),
])
def test_materialize_strategy_matches_reference(dtype, shape_x, out_f, need):
    """The materialize strategy (W * M once, torch's GEMMs, one elementwise gradient pass)."""
    from subkern.kernels import masked_matmul

    from subkern.ops.matmul_strategy import use_matmul_strategy

    x, w, s, b = _data(shape_x, out_f, dtype)
    s[0, :3] = 0.0  # sign(S) = 0: zero score gradient there
    mask = mk.select_mask(s, 0.4)
    gy = torch.randn(*shape_x[:-1], out_f, dtype=dtype, device=DEVICE)
    y_ref, grads_ref = _reference(x, w, s, b, mask, gy, need)
    with use_matmul_strategy("materialize"):
        y = mk._triton_linear_with_mask(x, w, s, mask, b)
        grads = mk._triton_linear_backward(gy, x, w, s, mask, list(need))
    assert y.dtype == dtype and y.shape == y_ref.shape
    _check(y, y_ref, dtype)
    _check_grads(need, grads, grads_ref, dtype)
    direct = masked_matmul.materialized_linear_backward(gy, x, w, s, mask, need)
    for got, want in zip(direct, grads, strict=True):
        assert torch.equal(got, want)


def test_masked_weight_grads_pass_is_autograds_products():
    """One elementwise pass: (G * W) * sign(S) (0 where S is +-0 or NaN) and G * M, bit for bit
    the reference's products; non-contiguous inputs; an empty tensor."""
    from subkern.kernels import masked_matmul

    g = torch.randn(30, 41, device=DEVICE).t()     # non-contiguous
    w = torch.randn(41, 30, device=DEVICE)
    s = torch.randn(41, 30, device=DEVICE)
    s[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    mask = mk.select_mask(s.nan_to_num(0.0), 0.5)
    gs, gw = masked_matmul.masked_weight_grads(g, w, s, mask, True, True)
    assert torch.equal(gs, (g * w) * torch.sign(s))
    assert torch.equal(gw, g * mask)
    gs_only, none = masked_matmul.masked_weight_grads(g, w, s, mask, True, False)
    assert torch.equal(gs_only, gs) and none.numel() == 0
    none, gw_only = masked_matmul.masked_weight_grads(g, w, s, mask, False, True)
    assert none.numel() == 0 and torch.equal(gw_only, gw)
    e = torch.empty(0, 7, device=DEVICE)
    gs, gw = masked_matmul.masked_weight_grads(e, e, e, e.bool(), True, True)
    assert gs.shape == (0, 7) and gw.shape == (0, 7)


def test_public_api_materialize_strategy_autograd(monkeypatch):
    """masked_linear on the triton backend with the materialize strategy, weight trained too;
    the backward (run after the ``with`` block, as autograd's CUDA thread would run it) keeps
    the forward's strategy."""
    from subkern.kernels import masked_matmul

    from subkern.ops.matmul_strategy import use_matmul_strategy

    calls = []
    real = masked_matmul.materialized_linear_backward
    monkeypatch.setattr(masked_matmul, "materialized_linear_backward",
                        lambda *a: calls.append(1) or real(*a))
    x, w, s, b = _data((2, 4, 47), 33, torch.float32)
    for t in (x, w, s, b):
        t.requires_grad_()
    gy = torch.randn(2, 4, 33, device=DEVICE)
    with subkern.use_backend("triton"), use_matmul_strategy("materialize"):
        y = mk.masked_linear(x, w, s, 0.3, b)
    y.backward(gy)
    assert calls == [1]
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, s, b)]
    with subkern.use_backend("reference"):
        mk.masked_linear(*leaves[:3], 0.3, leaves[3]).backward(gy)
    torch.testing.assert_close(y, mk.reference_masked_linear(x, w, s, 0.3, b),
                               rtol=2e-4, atol=2e-4)
    for got, want in zip((x, w, s, b), leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=2e-4, atol=2e-4)


def test_materialize_ignores_autocast():
    """The materialize strategy's GEMMs run in the op's dtype under autocast (as the fused
    kernels and the op's fake kernel do), and the backward works."""
    from subkern.ops.matmul_strategy import use_matmul_strategy

    x, w, s, b = _data((6, 40), 24, torch.float32)
    x.requires_grad_()
    s.requires_grad_()
    with subkern.use_backend("triton"), use_matmul_strategy("materialize"), \
            torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = mk.masked_linear(x, w, s, 0.5, b)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and s.grad.dtype == torch.float32
    torch.testing.assert_close(y, mk.reference_masked_linear(x, w, s, 0.5, b),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "materialize"])
def test_cuda_route_both_strategies(strategy, monkeypatch):
    """On CUDA both strategies give the reference's output and gradients (bf16 and fp16); the
    backward, which autograd runs on its device thread after the ``with`` block, keeps the
    forward's strategy."""
    from subkern.kernels import masked_matmul

    calls = []
    for name in ("materialized_linear_backward", "masked_linear_backward"):
        real = getattr(masked_matmul, name)
        monkeypatch.setattr(masked_matmul, name,
                            lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    want = ("materialized_linear_backward" if strategy == "materialize"
            else "masked_linear_backward")
    for dtype in (torch.float16, torch.bfloat16):
        _step_matches_reference(*_data((3, 50, 96), 80, dtype, device="cuda"), dtype, strategy)
    assert calls == [want, want]


@pytest.mark.gpu
def test_cuda_float64_materializes_even_when_fused_is_asked():
    """The fused masked matmul does not compile for float64 on CUDA; float64 runs the
    materialize path whatever the strategy, with the reference's gradients."""
    _step_matches_reference(*_data((5, 40), 24, torch.float64, device="cuda"), torch.float64,
                            "fused")
