"""Triton soft-threshold kernels (kernels/soft_threshold.py: the fused matmuls and the
elementwise threshold / gradient passes) against autograd on STR's formula, on small ragged
shapes: under the Triton interpreter without a GPU (fp32, fp16, fp64), compiled on a GPU (adds
bf16 and the dispatcher's CUDA route)."""

from __future__ import annotations

import pytest
import torch
from _helpers import TEST_DEVICE, assert_close_scaled, needs_triton, triton_test_dtypes
from hypothesis import given, settings
from hypothesis import strategies as hst

import subkern
from subkern.ops import soft_threshold as st
from subkern.ops.matmul_strategy import use_matmul_strategy

pytestmark = needs_triton()

DEVICE = TEST_DEVICE
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _reference(x, w, s, b, gy):
    """Forward and (grad_x, grad_weight, grad_s) by autograd on the reference formulation."""
    xr, wr, sr = (t.detach().clone().requires_grad_() for t in (x, w, s))
    y = st.reference_soft_threshold_linear(xr, wr, sr, b)
    y.backward(gy)
    return y.detach(), (xr.grad, wr.grad, sr.grad)


def _check(got, want, dtype):
    assert_close_scaled(got, want, TOL[dtype])

def _check_grads(need, grads, grads_ref, dtype):
    """Each asked-for gradient matches the reference (shape, dtype, values); the others are
    empty tensors."""
    for flag, got, want in zip(need, grads, grads_ref, strict=True):
        if flag:
            assert got.shape == want.shape and got.dtype == want.dtype
            _check(got, want, dtype)
        else:
            assert got.numel() == 0



def _triton_linear_matches_reference(x, w, s, b, gy, strategy="auto"):
    """Run the public ``soft_threshold_linear`` on the Triton backend (forward and backward of
    ``gy``, the matmul ``strategy`` of subkern/ops/matmul_strategy.py) and check output and
    (grad_x, grad_weight, grad_s) against ``_reference`` in fp32; returns the leaves
    ``[x, w, s]`` (their ``.grad`` filled)."""
    y_ref, grads_ref = _reference(x, w, s, b, gy)
    with subkern.use_backend("triton"), use_matmul_strategy(strategy):
        leaves = [t.clone().requires_grad_() for t in (x, w, s)]
        y = st.soft_threshold_linear(*leaves, b)
        y.backward(gy)
    _check(y, y_ref, torch.float32)
    for got, want in zip((t.grad for t in leaves), grads_ref, strict=True):
        _check(got, want, torch.float32)
    return leaves


@pytest.mark.parametrize("dtype", triton_test_dtypes(DEVICE))
@pytest.mark.parametrize(("shape_x", "out_f", "bias", "per_channel", "need"), [
    ((5, 47), 33, True, False, (True, True, True)),
    ((2, 3, 20), 17, False, True, (True, False, True)),
    ((1, 16), 1, True, True, (False, True, True)),
    ((3, 70), 40, False, False, (False, False, True)),
])
def test_kernels_match_reference(dtype, shape_x, out_f, bias, per_channel, need):
    from subkern.kernels import soft_threshold as kern

    x = torch.randn(*shape_x, dtype=dtype, device=DEVICE)
    w = (torch.randn(out_f, shape_x[-1], device=DEVICE) * 0.8).to(dtype)
    s = ((torch.randn(out_f, device=DEVICE) - 1) if per_channel
         else torch.tensor(-1.2, device=DEVICE)).to(dtype)
    b = torch.randn(out_f, dtype=dtype, device=DEVICE) if bias else None
    gy = torch.randn(*shape_x[:-1], out_f, dtype=dtype, device=DEVICE)
    y_ref, grads_ref = _reference(x, w, s, b, gy)
    y = kern.soft_threshold_linear_forward(x, w, st.threshold(w, s).reshape(-1), b)
    assert y.dtype == dtype and y.shape == y_ref.shape
    _check(y, y_ref, dtype)
    grads = kern.soft_threshold_linear_backward(gy, x, w, s, need)
    _check_grads(need, grads, grads_ref, dtype)


@pytest.mark.parametrize("dtype", triton_test_dtypes(DEVICE))
@pytest.mark.parametrize(("shape_x", "out_f", "per_channel", "need"), [
    ((5, 47), 33, False, (True, True, True)),
    ((2, 3, 20), 17, True, (True, False, True)),
    ((1, 16), 1, True, (False, True, False)),
    ((0, 12), 5, False, (True, True, True)),
])
def test_materialize_strategy_matches_reference(dtype, shape_x, out_f, per_channel, need):
    """W_eff written once by the elementwise kernel, torch's GEMMs, one gradient pass."""
    from subkern.kernels import soft_threshold as kern

    x = torch.randn(*shape_x, dtype=dtype, device=DEVICE)
    w = (torch.randn(out_f, shape_x[-1], device=DEVICE) * 0.8).to(dtype)
    s = ((torch.randn(out_f, device=DEVICE) - 1) if per_channel
         else torch.tensor(-1.2, device=DEVICE)).to(dtype)
    b = torch.randn(out_f, dtype=dtype, device=DEVICE)
    gy = torch.randn(*shape_x[:-1], out_f, dtype=dtype, device=DEVICE)
    y_ref, grads_ref = _reference(x, w, s, b, gy)
    with use_matmul_strategy("materialize"):
        y = st._triton_linear(x, w, s, b)
        grads = st._triton_linear_backward(gy, x, w, s, list(need))
    assert y.dtype == dtype and y.shape == y_ref.shape
    _check(y, y_ref, dtype)
    _check_grads(need, grads, grads_ref, dtype)
    direct = kern.materialized_linear_backward(gy, x, w, s, need)
    for got, want in zip(direct, grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("strategy", ["fused", "materialize"])
@pytest.mark.parametrize("s_value", [-100.0, 30.0])
def test_threshold_extremes_and_weights_at_the_threshold(s_value, strategy):
    x = torch.randn(4, 24, device=DEVICE)
    w = torch.randn(10, 24, device=DEVICE) * 2
    s = torch.tensor(s_value, device=DEVICE)
    thr = torch.sigmoid(s)
    w[0, :3] = torch.stack([thr, -thr, thr])   # exactly at the threshold: pruned, no gradient
    gy = torch.randn(4, 10, device=DEVICE)
    leaves = _triton_linear_matches_reference(x, w, s, None, gy, strategy)
    assert torch.all(leaves[1].grad[0, :3] == 0)


@pytest.mark.parametrize("strategy", ["fused", "materialize"])
def test_public_op_noncontiguous_and_empty(strategy):
    x = torch.randn(10, 9, device=DEVICE)[::2]
    w = torch.randn(9, 6, device=DEVICE).t()             # [6, 9] transposed view
    s = (torch.randn(6, 2, device=DEVICE) - 1)[:, 0]      # strided per-channel s
    b = torch.randn(6, device=DEVICE)
    gy = torch.randn(5, 6, device=DEVICE)
    _triton_linear_matches_reference(x, w, s, b, gy, strategy)
    with subkern.use_backend("triton"), use_matmul_strategy(strategy):
        # empty batch: zero gradients; empty reduction: the bias
        lw, ls = w.clone().requires_grad_(), s.clone().requires_grad_()
        y0 = st.soft_threshold_linear(torch.randn(0, 9, device=DEVICE), lw, ls, b)
        assert y0.shape == (0, 6)
        y0.sum().backward()
        assert torch.all(lw.grad == 0) and torch.all(ls.grad == 0)
        y1 = st.soft_threshold_linear(torch.randn(3, 0, device=DEVICE),
                                      torch.randn(6, 0, device=DEVICE), s, b)
        torch.testing.assert_close(y1, b.expand(3, 6))


def test_backward_keeps_the_forwards_strategy_and_ignores_autocast(monkeypatch):
    """The backward (run after the ``with`` block, as autograd's CUDA thread would run it) uses
    the forward's strategy; the materialize GEMMs run in the op's dtype under autocast."""
    from subkern.kernels import soft_threshold as kern

    calls = []
    real = kern.materialized_linear_backward
    monkeypatch.setattr(kern, "materialized_linear_backward",
                        lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, 40, device=DEVICE)
    w = torch.randn(24, 40, device=DEVICE) * 0.8
    s = torch.tensor(-1.2, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, s)]
    with subkern.use_backend("triton"), use_matmul_strategy("materialize"), \
            torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = st.soft_threshold_linear(*leaves, None)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert calls == [1]
    y_ref, grads_ref = _reference(x, w, s, None, torch.ones(6, 24, device=DEVICE))
    _check(y, y_ref, torch.float32)
    for got, want in zip((t.grad for t in leaves), grads_ref, strict=True):
        _check(got, want, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "fused", "materialize"])
def test_cuda_route_uses_the_kernels_and_matches(strategy, monkeypatch):
    from subkern.ops.library import has_kernel

    st.register_device_fallbacks()   # idempotent (subkern.ops does it at import)
    for op in ("soft_threshold_linear", "soft_threshold_linear_backward", "soft_threshold",
               "soft_threshold_grads"):
        assert has_kernel(op, "CUDA"), op
    x = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(80, 96, device="cuda", dtype=torch.bfloat16)
    s = torch.full((80,), -1.0, device="cuda")
    gy = torch.randn(64, 80, device="cuda", dtype=torch.bfloat16)
    y_ref, grads_ref = _reference(x, w, s, None, gy)
    from subkern.kernels import soft_threshold as kern

    calls = []
    for name in ("materialized_linear_backward", "soft_threshold_linear_backward"):
        real = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    leaves = [t.clone().requires_grad_() for t in (x, w, s)]
    with use_matmul_strategy(strategy):
        y = torch.ops.subkern.soft_threshold_linear(*leaves, None)
    y.backward(gy)   # on autograd's CUDA thread: the forward's strategy must carry over
    assert calls == ["soft_threshold_linear_backward" if strategy == "fused"
                     else "materialized_linear_backward"]
    _check(y, y_ref, torch.bfloat16)
    for got, want in zip((t.grad for t in leaves), grads_ref, strict=True):
        _check(got, want, torch.bfloat16)


@settings(max_examples=6, deadline=None)
@given(out_f=hst.integers(1, 40), in_f=hst.integers(1, 40), rows=hst.integers(1, 20),
       per_channel=hst.booleans(), s_value=hst.floats(-6, 2), seed=hst.integers(0, 2**31 - 1))
def test_hypothesis_kernels_match_reference(out_f, in_f, rows, per_channel, s_value, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=gen).to(DEVICE)
    w = torch.randn(out_f, in_f, generator=gen).to(DEVICE)
    s = (torch.full((out_f,), s_value) + torch.randn(out_f, generator=gen) if per_channel
         else torch.tensor(s_value)).to(DEVICE)
    gy = torch.randn(rows, out_f, generator=gen).to(DEVICE)
    _triton_linear_matches_reference(x, w, s, None, gy)


@pytest.mark.parametrize("dtype", triton_test_dtypes(DEVICE))
@pytest.mark.parametrize(("shape", "per_channel"), [((7, 300), False), ((5, 3, 3, 3), True),
                                                    ((1, 1), True), ((0, 4), False)])
def test_elementwise_kernels_match_reference(dtype, shape, per_channel):
    from subkern.kernels import soft_threshold as kern

    w = torch.randn(shape, device=DEVICE).to(dtype)
    s = ((torch.randn(shape[0], device=DEVICE) - 1) if per_channel
         else torch.tensor(-1.0, device=DEVICE)).to(dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
    want = st.reference_soft_threshold(wr, sr)
    want.backward(g)
    out = kern.soft_threshold_forward(w, s)
    assert out.dtype == dtype and out.shape == w.shape
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)   # one rounding, as the ref
    for need in ((True, True), (False, True), (True, False)):
        gw, gs = kern.soft_threshold_grads(g, w, s, *need)
        if need[0]:
            _check(gw, wr.grad, dtype)
        else:
            assert gw.numel() == 0
        if need[1]:
            assert gs.shape == s.shape and gs.dtype == s.dtype
            _check(gs, sr.grad, dtype)
        else:
            assert gs.numel() == 0


def test_public_soft_threshold_and_conv_on_the_triton_backend():
    x = torch.randn(2, 4, 7, 6, device=DEVICE)
    w = torch.randn(6, 2, 3, 3, device=DEVICE) * 0.5
    s = torch.randn(6, device=DEVICE) - 1.5
    b = torch.randn(6, device=DEVICE)
    ref = [t.clone().requires_grad_() for t in (x, w, s, b)]
    y_ref = st.reference_soft_threshold_conv2d(*ref, stride=2, padding=1, groups=2)
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    with subkern.use_backend("triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, s, b)]
        y = st.soft_threshold_conv2d(*leaves, stride=2, padding=1, groups=2)
        y.backward(gy)
        lw, ls = w.clone().requires_grad_(), s.clone().requires_grad_()
        out = st.soft_threshold(lw, ls)
        out.square().sum().backward()
    _check(y, y_ref.detach(), torch.float32)
    for got, want in zip(leaves, ref, strict=True):
        _check(got.grad, want.grad, torch.float32)
    torch.testing.assert_close(out, st.reference_soft_threshold(w, s))
    wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
    st.reference_soft_threshold(wr, sr).square().sum().backward()
    _check(lw.grad, wr.grad, torch.float32)
    _check(ls.grad, sr.grad, torch.float32)
