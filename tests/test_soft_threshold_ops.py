"""STR soft-threshold ops (soft_threshold, soft_threshold_linear, soft_threshold_conv2d): forward
and gradients against plain autograd on STR's formula ``sign(W) relu(|W| - sigmoid(s))`` on the
reference and C++ backends; threshold extremes, bf16, non-contiguous and empty inputs, op
registration (opcheck), torch.compile, gradcheck, hypothesis and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst

import subkern  # noqa: F401  (loads subkern._C)
from subkern import backend as _backend
from subkern.ops import soft_threshold as st

CPU_BACKENDS = ["reference"] + (
    ["cpp"] if _backend.unavailable_reason("cpp", torch.device("cpu"),
                                           "soft_threshold_linear") is None else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _paper(weight, s):
    """STR's formula in float64 (the paper: sign(W) * relu(|W| - sigmoid(s)))."""
    w = weight.double()
    sd = s.double()
    sd = sd.reshape(()) if sd.numel() == 1 else sd.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(sd))


def _s(per_channel, out, value=None, dtype=torch.float32):
    if per_channel:
        s = torch.randn(out, dtype=dtype) - 1 if value is None else torch.full((out,), value)
    else:
        s = torch.tensor(-1.0 if value is None else value)
    return s.to(dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _close(got, want, dtype):
    """Close relative to the largest magnitude of ``want`` (sums of many terms)."""
    want = want.detach()
    scale = max(1.0, float(want.double().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, want.double() / scale, rtol=TOL[dtype],
                               atol=TOL[dtype])


def _linear_grads(fn, x, w, s, b, gy):
    leaves = _leaves(x, w, s, b)
    y = fn(*leaves)
    y.backward(gy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


# --------------------------------------------------------------------------------------------
# soft_threshold itself
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(7, 13), (5, 3, 3, 3), (1, 1), (4, 0), (0, 6)])
def test_soft_threshold_forward_and_grads(backend, per_channel, shape):
    w = torch.randn(shape) * 0.5
    s = _s(per_channel, shape[0])
    g = torch.randn(shape)
    ref_w, ref_s = _leaves(w, s)
    st.reference_soft_threshold(ref_w, ref_s).backward(g)
    lw, ls = _leaves(w, s)
    with subkern.use_backend(backend):
        out = st.soft_threshold(lw, ls)
    _close(out, _paper(w, s), torch.float32)
    out.backward(g)
    _close(lw.grad, ref_w.grad, torch.float32)
    _close(ls.grad, ref_s.grad, torch.float32)
    assert ls.grad.shape == s.shape
    # the gradients as stated: dW = G 1[|W| > g]; ds = -g'(s) sum(G sign(W) 1[|W| > g])
    thr = torch.sigmoid(s.double()).reshape(-1, *([1] * (w.dim() - 1)))
    keep = w.double().abs() > thr
    _close(lw.grad, g.double() * keep, torch.float32)
    signed = (g.double() * torch.sign(w.double()) * keep).flatten(1).sum(1)
    want_s = -(thr * (1 - thr)).reshape(-1) * signed
    _close(ls.grad, want_s.sum() if not per_channel else want_s, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threshold_extremes_and_weights_at_the_threshold(backend):
    w = torch.randn(6, 40)
    with subkern.use_backend(backend):
        # very negative s: nothing is pruned (sigmoid(-100) ~ 4e-44, sigmoid(-3200) = 0)
        for value in (-100.0, -3200.0):
            out = st.soft_threshold(w, torch.tensor(value))
            torch.testing.assert_close(out, w, rtol=0, atol=0)
        # large s: sigmoid -> 1 exactly in float32, every |W| <= 1 is pruned
        out = st.soft_threshold(w, torch.tensor(40.0))
        assert torch.equal(out == 0, w.abs() <= 1)
        torch.testing.assert_close(out, torch.sign(w) * (w.abs() - 1).clamp_min(0))
        # weights exactly at the threshold (as torch computes sigmoid): zero, with zero gradient
        s = torch.tensor(-0.7)
        thr = torch.sigmoid(s)
        wt = w.clone()
        wt[0, :4] = torch.stack([thr, -thr, thr, -thr])
        wt[1, 0] = 0.0
        lw, ls = _leaves(wt, s)
        out = st.soft_threshold(lw, ls)
        assert torch.all(out[0, :4] == 0) and out[1, 0] == 0
        out.backward(torch.ones_like(out))
        assert torch.all(lw.grad[0, :4] == 0) and lw.grad[1, 0] == 0
    ref_w, ref_s = _leaves(wt, s)
    st.reference_soft_threshold(ref_w, ref_s).backward(torch.ones_like(wt))
    torch.testing.assert_close(lw.grad, ref_w.grad)
    torch.testing.assert_close(ls.grad, ref_s.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_weights_behave_as_the_formula(backend):
    w = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.5, -0.1]])
    s = torch.tensor(-1.0)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    ref_w, ref_s = _leaves(w, s)
    want = st.reference_soft_threshold(ref_w, ref_s)
    want.backward(g)
    lw, ls = _leaves(w, s)
    with subkern.use_backend(backend):
        out = st.soft_threshold(lw, ls)
    out.backward(g)
    torch.testing.assert_close(out, want.detach(), equal_nan=True)
    torch.testing.assert_close(lw.grad, ref_w.grad, equal_nan=True)
    torch.testing.assert_close(ls.grad, ref_s.grad, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_compute_in_float32(backend, dtype):
    w = torch.randn(9, 31).to(dtype)
    for s in (torch.tensor(-2.0, dtype=dtype), torch.randn(9) - 2):   # s: weight dtype or fp32
        with subkern.use_backend(backend):
            out = st.soft_threshold(w, s)
        assert out.dtype == dtype
        want = _paper(w.float(), s.float()).to(dtype)   # float math, rounded once
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        x = torch.randn(3, 31).to(dtype)
        gy = torch.randn(3, 9).to(dtype)
        b = torch.randn(9).to(dtype)
        y_ref, g_ref = _linear_grads(st.reference_soft_threshold_linear, x, w, s, b, gy)
        with subkern.use_backend(backend):
            y, grads = _linear_grads(st.soft_threshold_linear, x, w, s, b, gy)
        _close(y, y_ref, dtype)
        for got, want in zip(grads, g_ref, strict=True):
            assert got.dtype == want.dtype
            _close(got, want, dtype)


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("shape_x", "out_f", "bias"), [
    ((5, 17), 11, True), ((2, 3, 33), 7, False), ((1, 8), 1, True), ((0, 9), 4, True),
    ((3, 0), 5, True), ((4, 6), 0, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_autograd_on_the_formula(backend, per_channel, shape_x, out_f, bias,
                                                 dtype):
    x = torch.randn(shape_x, dtype=dtype)
    w = torch.randn(out_f, shape_x[-1], dtype=dtype)
    s = _s(per_channel, out_f, dtype=dtype)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    gy = torch.randn(*shape_x[:-1], out_f, dtype=dtype)
    y_ref, g_ref = _linear_grads(st.reference_soft_threshold_linear, x, w, s, b, gy)
    with subkern.use_backend(backend):
        y, grads = _linear_grads(st.soft_threshold_linear, x, w, s, b, gy)
    assert y.shape == y_ref.shape and y.dtype == dtype
    _close(y, y_ref, dtype)
    for got, want in zip(grads, g_ref, strict=True):
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape and got.dtype == want.dtype
            _close(got, want, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_partial_requires_grad_and_noncontiguous(backend):
    x = torch.randn(12, 10)[::2]                 # strided rows
    w = torch.randn(10, 8).t()                   # transposed weight view [8, 10]
    s = (torch.randn(8, 2) - 1)[:, 0]            # strided per-channel s
    b = torch.randn(8)
    gy = torch.randn(6, 8)
    y_ref, g_ref = _linear_grads(st.reference_soft_threshold_linear, x, w, s, b, gy)
    with subkern.use_backend(backend):
        y, grads = _linear_grads(st.soft_threshold_linear, x, w, s, b, gy)
        _close(y, y_ref, torch.float32)
        for got, want in zip(grads, g_ref, strict=True):
            _close(got, want, torch.float32)
        # only s trains (weight frozen), then only x
        ls = s.clone().requires_grad_()
        st.soft_threshold_linear(x, w, ls, b).backward(gy)
        _close(ls.grad, g_ref[2], torch.float32)
        lx = x.clone().requires_grad_()
        st.soft_threshold_linear(lx, w, s).backward(gy)
        _close(lx.grad, g_ref[0], torch.float32)


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("stride", "padding", "dilation", "groups", "per_channel"), [
    (1, 0, 1, 1, False), (2, 1, 1, 2, True), ((1, 2), (2, 0), (2, 1), 1, True),
])
def test_conv_matches_autograd_on_the_formula(backend, stride, padding, dilation, groups,
                                               per_channel):
    x = torch.randn(2, 4, 9, 8)
    w = torch.randn(6, 4 // groups, 3, 3) * 0.5
    s = _s(per_channel, 6)
    b = torch.randn(6)
    args = (stride, padding, dilation, groups)
    ref_leaves = _leaves(x, w, s, b)
    y_ref = st.reference_soft_threshold_conv2d(*ref_leaves, *args)
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    leaves = _leaves(x, w, s, b)
    with subkern.use_backend(backend):
        y = st.soft_threshold_conv2d(*leaves, *args)
    _close(y, y_ref, torch.float32)
    y.backward(gy)
    for got, want in zip(leaves, ref_leaves, strict=True):
        _close(got.grad, want.grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_unbatched_and_empty_batch(backend):
    w = torch.randn(3, 2, 3, 3)
    s = torch.tensor(-1.5)
    x = torch.randn(2, 5, 5)
    with subkern.use_backend(backend):
        y = st.soft_threshold_conv2d(x, w, s, padding=1)
        torch.testing.assert_close(
            y, F.conv2d(x, _paper(w, s).float(), padding=1), rtol=1e-5, atol=1e-5)
        lw, ls = _leaves(w, s)
        y0 = st.soft_threshold_conv2d(torch.randn(0, 2, 5, 5), lw, ls, padding=1)
        assert y0.shape == (0, 3, 5, 5)
        y0.sum().backward()
        assert torch.all(lw.grad == 0) and ls.grad == 0


# --------------------------------------------------------------------------------------------
# registration: gradcheck, opcheck, torch.compile, hypothesis
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "per_channel"),
                         [(b, p) for b, p in zip(CPU_BACKENDS, (True, False), strict=False)]
                         + [(CPU_BACKENDS[-1], True)])
def test_gradcheck_linear_and_conv(backend, per_channel):
    # weights kept away from the threshold so the finite differences do not cross the kink
    def weight(*shape):
        w = torch.rand(shape, dtype=torch.float64) + 0.6
        return (w * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()).requires_grad_()

    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = weight(5, 6)
    with torch.no_grad():
        w[0, :3] *= 0.1   # some pruned weights (|w| < sigmoid(s) ~ 0.27-0.5)
    s = (torch.rand(5 if per_channel else 1, dtype=torch.float64) * 0.5 - 1).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    wc = weight(4, 2, 3, 3)
    sc = (s[:4] if per_channel else s).detach().clone().requires_grad_()   # own storage

    def fn(x_, w_, s_, b_, xc_, wc_, sc_):
        with subkern.use_backend(backend):
            return (st.soft_threshold_linear(x_, w_, s_, b_),
                    st.soft_threshold_conv2d(xc_, wc_, sc_, None, stride=2, padding=1),
                    st.soft_threshold(w_, s_))

    assert torch.autograd.gradcheck(fn, (x, w, s, b, xc, wc, sc), fast_mode=True)


@pytest.mark.parametrize("per_channel", [False, True])
def test_opcheck_every_op(per_channel):
    x = torch.randn(2, 3, 10, requires_grad=True)
    w = torch.randn(6, 10, requires_grad=True)
    s = _s(per_channel, 6).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.subkern.soft_threshold, (w, s))
    torch.library.opcheck(torch.ops.subkern.soft_threshold_linear,
                          (x, w, s, b if per_channel else None))
    gy = torch.randn(2, 3, 6)
    mask = [True, True, True] if per_channel else [False, True, False]
    torch.library.opcheck(torch.ops.subkern.soft_threshold_linear_backward,
                          (gy, x.detach(), w.detach(), s.detach(), mask))
    g = torch.randn(6, 10)
    torch.library.opcheck(torch.ops.subkern.soft_threshold_grads,
                          (g, w.detach(), s.detach(), per_channel, True))
    if per_channel:
        xc = torch.randn(2, 4, 6, 6, requires_grad=True)
        wc = torch.randn(6, 2, 3, 3, requires_grad=True)
        torch.library.opcheck(torch.ops.subkern.soft_threshold_conv2d,
                              (xc, wc, s, b, [1, 2], [1, 0], [1, 1], 2))


def test_compile_fullgraph():
    w = torch.randn(12, 16)
    wc = torch.randn(4, 3, 3, 3)
    xc = torch.randn(1, 3, 6, 6)

    def step(x_, w_, s_, sc_):
        y = st.soft_threshold_linear(x_, w_, s_)
        z = st.soft_threshold_conv2d(xc, wc, sc_, padding=1)
        return y.square().sum() + z.sum() + st.soft_threshold(w_, s_).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves_eager = _leaves(torch.randn(2, 5, 16), w, torch.randn(12) - 1, torch.tensor(-1.0))
    leaves_comp = _leaves(*leaves_eager)
    step(*leaves_eager).backward()
    compiled(*leaves_comp).backward()
    for a, c in zip(leaves_eager, leaves_comp, strict=True):
        torch.testing.assert_close(c.grad, a.grad)


@settings(max_examples=25, deadline=None)
@given(out_f=hst.integers(0, 9), in_f=hst.integers(0, 19), rows=hst.integers(0, 5),
       per_channel=hst.booleans(), s_value=hst.floats(-8, 3), scale=hst.floats(0.01, 4),
       seed=hst.integers(0, 2**31 - 1))
def test_hypothesis_linear_matches_reference(out_f, in_f, rows, per_channel, s_value, scale,
                                             seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=gen)
    w = torch.randn(out_f, in_f, generator=gen) * scale
    s = (torch.full((out_f,), s_value) + torch.randn(out_f, generator=gen) if per_channel
         else torch.tensor(s_value))
    gy = torch.randn(rows, out_f, generator=gen)
    y_ref, g_ref = _linear_grads(st.reference_soft_threshold_linear, x, w, s, None, gy)
    for backend in CPU_BACKENDS:
        with subkern.use_backend(backend):
            y, grads = _linear_grads(st.soft_threshold_linear, x, w, s, None, gy)
            out = st.soft_threshold(w, s)
        _close(y, y_ref, torch.float32)
        for got, want in zip(grads[:3], g_ref[:3], strict=True):
            _close(got, want, torch.float32)
        # properties: |W_eff| = relu(|W| - g) with W's sign, zeros exactly where |W| <= g
        thr = torch.sigmoid(s).reshape(-1, 1) if per_channel else torch.sigmoid(s)
        assert torch.equal(out == 0, w.abs() <= thr)
        assert torch.all(out * w >= 0)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_clear_errors():
    x, w, s = torch.randn(2, 4), torch.randn(3, 4), torch.tensor(-1.0)
    with pytest.raises(ValueError, match=r"s must have one element .* out_channels = 3"):
        st.soft_threshold_linear(x, w, torch.zeros(2))
    with pytest.raises(ValueError, match="s must have one element"):
        st.soft_threshold(w, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="s must have the weight's dtype"):
        st.soft_threshold(w, s.double())
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        st.soft_threshold(w.long(), s)
    with pytest.raises(ValueError, match="last dimension must be in_features = 4"):
        st.soft_threshold_linear(torch.randn(2, 5), w, s)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        st.soft_threshold_linear(x, w[0], s)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        st.soft_threshold_linear(x, w, s, torch.randn(4))
    with pytest.raises(TypeError, match="x must have the weight's dtype"):
        st.soft_threshold_linear(x.double(), w, s)
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        st.soft_threshold_linear(x, w, s, torch.randn(3).double())
    with pytest.raises(ValueError, match="same device"):
        st.soft_threshold_linear(x, w, s.to("meta"))
    with pytest.raises(TypeError, match="s must be a torch.Tensor"):
        st.soft_threshold(w, -1.0)
    with pytest.raises(TypeError, match="dense"):
        st.soft_threshold(w.to_sparse(), s)
    with pytest.raises(ValueError, match="channels"):
        st.soft_threshold_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 2, 1, 1), s)
    with pytest.raises(ValueError, match="stride must be"):
        st.soft_threshold_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 1, 1), s,
                                 stride=(1, 2, 3))
    with pytest.raises(ValueError, match="x must be 4-D"):
        st.soft_threshold_conv2d(torch.randn(2, 4), torch.randn(2, 2, 1, 1), s)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        st.soft_threshold_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 1, 1), s, groups=0)


def test_bench_family_tiny():
    """`subkern bench --ops soft_threshold` machinery: every timed result matches the reference."""
    from subkern.bench import harness
    from subkern.bench import soft_threshold as bench_st

    result = bench_st.run(harness.BenchConfig(device="cpu", size="tiny", log=lambda _: None))
    assert not result.errors and len(result.rows) == 4
    assert all(row.match for row in result.rows), [row.match_detail for row in result.rows]
    assert {row.rival for row in result.rows} == {"reference (torch ops + autograd) fwd+bwd",
                                                  "dense F.linear fwd+bwd",
                                                  "dense F.conv2d fwd+bwd"}


def test_bench_case_with_both_matmul_strategies():
    """The rows CUDA adds for the Triton backend's two matmul strategies (and the forward-only
    rows against the dense forward), exercised on CPU through the interpreter."""
    from subkern.bench import harness
    from subkern.bench import soft_threshold as bench_st

    if _backend.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton cannot run CPU tensors here (TRITON_INTERPRET unset)")
    config = harness.BenchConfig(device="cpu", size="tiny", log=lambda _: None)
    size = bench_st.size_for("cpu", "tiny")
    result = harness.BenchResult(bench_st.FAMILY, "cpu", "tiny")
    out_f, in_f = size.layers[0]
    data = bench_st.make_data(out_f, in_f, size.tokens[0], torch.float32, "cpu")
    forward = (bench_st._linear_forward(data), lambda: F.linear(data["x"], data["weight"]))
    bench_st._run_case(config, size, result, "tiny", {}, size.tokens[0], data,
                       bench_st._linear_fns(), torch.float32, "triton", bench_st.OP, "F.linear",
                       forward, both_strategies=True)
    assert all(row.match for row in result.rows), [row.match_detail for row in result.rows]
    # on CPU the default strategy is fused, so the other one timed is materialize
    assert [row.ours for row in result.rows] == [
        "subkern[triton, fused] fwd+bwd", "subkern[triton, fused] fwd+bwd",
        "subkern[triton, materialize] fwd+bwd", "subkern[triton, fused] forward",
        "subkern[triton, materialize] forward"]
    assert result.rows[-1].rival == "dense F.linear forward"
