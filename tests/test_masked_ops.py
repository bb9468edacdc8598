"""masked_linear / masked_conv2d: forward and gradients against plain autograd on the official
edge-popup formulation ``W * GetSubnet(|S|, k)`` (straight-through), on the reference and C++
backends; op registration (opcheck), torch.compile, gradcheck and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subkern  # noqa: F401  (loads subkern._C)
from subkern import backend as _backend
from subkern.ops import masked as mk
from subkern.ops.topk_mask_reference import kept_count

CPU_BACKENDS = ["reference"] + (
    ["cpp"] if _backend.unavailable_reason("cpp", torch.device("cpu"),
                                           "masked_linear_with_mask") is None else [])


def _official(x, weight, scores, k, bias=None):
    """The official code, verbatim in spirit: GetSubnet on |S| with an identity backward."""

    class GetSubnet(torch.autograd.Function):
        @staticmethod
        def forward(ctx, abs_scores, kk):
            out = abs_scores.clone()
            n = abs_scores.numel()
            j = n - kept_count(n, kk)
            # ties to the lower flat index (subkern's deterministic rule): stable sort ascending
            # by (|s|, -index) i.e. descending order of the kept ranking, reversed
            flat = abs_scores.flatten().double()
            flat = torch.where(flat.isnan(), -1.0, flat)   # NaN ranks below every number
            order = torch.sort(flat, descending=True, stable=True).indices.flip(0)
            flat_out = out.flatten()
            flat_out[order[:j]] = 0
            flat_out[order[j:]] = 1
            return out

        @staticmethod
        def backward(ctx, g):
            return g, None

    return F.linear(x, weight * GetSubnet.apply(scores.abs(), k), bias)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _grads(out, inputs, gy):
    out.backward(gy)
    return [None if t is None or t.grad is None else t.grad for t in inputs]


def _close(a, b, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2,
           torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _case(shape_x, out_f, dtype=torch.float64, bias=True):
    in_f = shape_x[-1]
    x = torch.randn(*shape_x, dtype=dtype)
    w = torch.randn(out_f, in_f, dtype=dtype)
    s = torch.randn(out_f, in_f, dtype=dtype)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    return x, w, s, b


# --------------------------------------------------------------------------------------------
# linear: parity with the official formulation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("shape_x", "out_f", "k", "bias"), [
    ((5, 47), 33, 0.3, True),
    ((1, 8), 1, 1.0, False),
    ((2, 3, 17), 9, 0.5, True),
    ((12,), 7, 0.05, True),          # 1-D x (no batch), tiny k keeps 1 weight
    ((123, 64), 40, 0.77, False),
])
def test_linear_matches_official(backend, shape_x, out_f, k, bias):
    x, w, s, b = _case(shape_x, out_f, bias=bias)
    gy = torch.randn(*shape_x[:-1], out_f, dtype=torch.float64)
    ref_in = _leaves(x, w, s, b)
    ref = _official(*ref_in[:3], k, ref_in[3])
    ref_g = _grads(ref, ref_in, gy)
    ours_in = _leaves(x, w, s, b)
    with subkern.use_backend(backend):
        out = mk.masked_linear(ours_in[0], ours_in[1], ours_in[2], k, ours_in[3])
    ours_g = _grads(out, ours_in, gy)
    _close(out, ref, torch.float64)
    for got, want in zip(ours_g, ref_g, strict=True):
        if want is None:
            assert got is None
        else:
            _close(got, want, torch.float64)
    # also the reference helper of the module (used by benchmarks) agrees
    _close(mk.reference_masked_linear(x, w, s, k, b), ref.detach(), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_weight_grad_only_when_required(backend):
    x, w, s, b = _case((6, 20), 10, dtype=torch.float32)
    x.requires_grad_()
    s.requires_grad_()
    with subkern.use_backend(backend):
        mk.masked_linear(x, w, s, 0.4, b).sum().backward()
    assert w.grad is None and b.grad is None
    assert x.grad is not None and s.grad is not None
    # only the scores: still correct
    s2 = s.detach().clone().requires_grad_()
    with subkern.use_backend(backend):
        mk.masked_linear(x.detach(), w, s2, 0.4, b).sum().backward()
    _close(s2.grad, s.grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_low_precision(backend, dtype):
    x, w, s, b = _case((7, 3, 40), 24, dtype=dtype)
    gy = torch.randn(7, 3, 24, dtype=dtype)
    ref_in = _leaves(*(t.double() for t in (x, w, s, b)))
    ref = _official(*ref_in[:3], 0.6, ref_in[3])
    ref_g = _grads(ref, ref_in, gy.double())
    ours_in = _leaves(x, w, s, b)
    with subkern.use_backend(backend):
        out = mk.masked_linear(ours_in[0], ours_in[1], ours_in[2], 0.6, ours_in[3])
    ours_g = _grads(out, ours_in, gy)
    assert out.dtype == dtype
    _close(out.double(), ref, dtype)
    for got, want in zip(ours_g, ref_g, strict=True):
        assert got.dtype == dtype
        scale = max(1.0, float(want.abs().max()))
        _close(got.double() / scale, want / scale, dtype)


def test_cpp_bit_identical_epilogue():
    """float32: grad_scores = (G * W) * sign(S) and grad_weight = G * M exactly as autograd."""
    g = torch.randn(31, 45)
    w = torch.randn(31, 45)
    s = torch.randn(31, 45)
    s[0, :5] = 0.0
    s[1, :3] = float("nan")
    m = torch.rand(31, 45) > 0.5
    gs, gw = torch.ops.subkern.masked_weight_grads(g, w, s, m, True)
    assert torch.equal(gs, g * w * torch.sign(s))
    assert torch.equal(gw, g * m.float())
    gs2, gw2 = torch.ops.subkern.masked_weight_grads(g, w, s, m, False)
    assert torch.equal(gs2, gs) and gw2.numel() == 0


@pytest.mark.skipif(_backend.unavailable_reason("cpp", torch.device("cpu"),
                                                 "masked_linear_with_mask") is not None,
                    reason="needs the C++ CPU kernels")
def test_cpp_fast_path_bit_identical_with_tails_and_specials():
    """float32 AVX-512 passes (chunks of 16 plus a tail, two threads) against autograd's
    products, with NaN / inf weights and zero / NaN scores; the forward's W * M too."""
    import subkern._C as ext

    gen = torch.Generator().manual_seed(5)
    out_f, in_f = 301, 229  # 68929 entries: several threads' chunks and a ragged tail
    g = torch.randn(out_f, in_f, generator=gen)
    w = torch.randn(out_f, in_f, generator=gen)
    s = torch.randn(out_f, in_f, generator=gen)
    w[0, :7] = float("nan")
    w[1, :5] = float("inf")
    s[2, :9] = 0.0
    s[3, :4] = float("nan")
    m = torch.rand(out_f, in_f, generator=gen) > 0.5
    x = torch.randn(3, in_f, generator=gen)
    old = torch.get_num_threads()
    isas = ["portable"] + (["avx512"] if ext.cpu_isa() == "avx512vpopcntdq" else [])
    try:
        torch.set_num_threads(2)
        for isa in isas:
            ext.set_cpu_isa(isa)
            gs, gw = torch.ops.subkern.masked_weight_grads(g, w, s, m, True)
            want = g * w * torch.sign(s)
            assert torch.equal(gs.isnan(), want.isnan()), isa
            assert torch.equal(gs.nan_to_num(), want.nan_to_num()), isa
            assert torch.equal(gw, g * m.float()), isa
            y = torch.ops.subkern.masked_linear_with_mask(x, w, s, m, None)
            y_want = x @ (w * m.float()).t()
            assert torch.equal(y.isnan(), y_want.isnan()), isa
            assert torch.allclose(y.nan_to_num(), y_want.nan_to_num(), rtol=1e-5, atol=1e-5)
    finally:
        ext.set_cpu_isa("auto")
        torch.set_num_threads(old)


@pytest.mark.skipif(_backend.unavailable_reason("cpp", torch.device("cpu"),
                                                 "masked_linear_with_mask") is not None,
                    reason="needs the C++ CPU kernels")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_training_step_equals_reference(threads):
    """masked_linear on cpp (selection fused with the mask and W * M) against the
    reference's autograd: same kept set (ties at the threshold across thread chunks), same
    output, grad_scores bit for bit."""
    gen = torch.Generator().manual_seed(11)
    out_f, in_f = 700, 300  # 210000 scores: two threads' chunks
    w = torch.randn(out_f, in_f, generator=gen)
    s = torch.randn(out_f, in_f, generator=gen)
    s[::3, ::7] = 0.6745  # ties around the k = 0.5 threshold
    s[5, :4] = float("nan")
    s[6, :4] = 0.0
    x = torch.randn(2, 3, in_f, generator=gen)
    gy = torch.randn(2, 3, out_f, generator=gen)
    b = torch.randn(out_f, generator=gen)
    old = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(threads)
        for backend in ("cpp", "reference"):
            xs, ss, bs = (t.clone().requires_grad_(True) for t in (x, s, b))
            with _backend.use_backend(backend):
                y = mk.masked_linear(xs, w, ss, 0.5, bs)
            y.backward(gy)
            results[backend] = (y.detach(), xs.grad, ss.grad, bs.grad)
    finally:
        torch.set_num_threads(old)
    ours, want = results["cpp"], results["reference"]
    torch.testing.assert_close(ours[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], want[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[2], want[2])
    torch.testing.assert_close(ours[3], want[3])


@pytest.mark.skipif(_backend.unavailable_reason("cpp", torch.device("cpu"),
                                                 "masked_linear_with_mask") is not None,
                    reason="needs the C++ CPU kernels")
def test_cpp_select_saved_tensors_and_backward_bit_identical():
    """masked_linear_select's saved tensors (W * M, and W * sign(S) with NaN where sign(S) = 0)
    equal their definitions, and masked_linear_select_backward's gradients equal autograd's on
    the reference bit for bit, on every ISA with two threads, with NaN / inf weights, zero / NaN
    scores and a G * W that overflows where sign(S) = 0 (the reference's NaN)."""
    import subkern._C as ext

    gen = torch.Generator().manual_seed(23)
    out_f, in_f = 290, 241  # 69890 entries: two threads' chunks and a ragged tail
    w = torch.randn(out_f, in_f, generator=gen)
    s = torch.randn(out_f, in_f, generator=gen)
    w[0, :7] = float("nan")
    w[1, :5] = float("inf")
    w[2, :6] = 3e38
    s[2, :3] = 0.0    # sign 0 and (with grad_y below) G * W overflows: reference gives NaN
    s[3, :4] = float("nan")
    s[4, :9] = -0.0
    x = torch.randn(5, in_f, generator=gen)
    gy = torch.randn(5, out_f, generator=gen)
    gy[:, 2] = 1e6
    old = torch.get_num_threads()
    isas = ["portable"] + (["avx512"] if ext.cpu_isa() == "avx512vpopcntdq" else [])
    mask = mk.select_mask(s, 0.3)
    want_sign = torch.where(torch.sign(s) != 0, w * torch.sign(s), torch.tensor(float("nan")))
    g = gy.t() @ x
    want_gs = g * w * torch.sign(s)
    assert want_gs[2, :3].isnan().all()  # the case is exercised
    try:
        torch.set_num_threads(2)
        for isa in isas:
            ext.set_cpu_isa(isa)
            y, m, w_eff, w_sign = torch.ops.subkern.masked_linear_select(x, w, s, 0.3, None)
            assert torch.equal(m, mask), isa
            want_eff = w * mask.float()
            assert torch.equal(w_eff.isnan(), want_eff.isnan()), isa
            assert torch.equal(w_eff.nan_to_num(), want_eff.nan_to_num()), isa
            assert torch.equal(w_sign.isnan(), want_sign.isnan()), isa
            assert torch.equal(w_sign.nan_to_num(), want_sign.nan_to_num()), isa
            for need in ([True, True, False], [False, True, True]):
                gx, gs, gw = torch.ops.subkern.masked_linear_select_backward(
                    gy, x, w, s, m, w_eff, w_sign, need)
                assert torch.equal(gs.isnan(), want_gs.isnan()), (isa, need)
                assert torch.equal(gs.nan_to_num(), want_gs.nan_to_num()), (isa, need)
                if need[0]:
                    gx_want = gy @ want_eff
                    assert torch.equal(gx.isnan(), gx_want.isnan()), isa
                if need[2]:
                    assert torch.equal(gw, g * mask.float()), isa
    finally:
        ext.set_cpu_isa("auto")
        torch.set_num_threads(old)


@pytest.mark.skipif(_backend.unavailable_reason("cpp", torch.device("cpu"),
                                                 "masked_linear_with_mask") is not None,
                    reason="needs the C++ CPU kernels")
def test_cpp_pooled_buffers_never_overwrite_live_tensors():
    """The training step's buffers come from a pool: a tensor the caller still holds (outputs,
    gradients, views of them) is never handed out again, one nobody holds is reused."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f = 512, 600  # 1.2 MB of float32: pooled
    w = torch.randn(out_f, in_f, generator=gen)
    s = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(4, in_f, generator=gen)
    first = torch.ops.subkern.masked_linear_select(x, w, s, 0.5, None)
    kept = [t.clone() for t in first[1:]]
    view = first[2][3:7]
    s2 = torch.randn(out_f, in_f, generator=gen)
    for _ in range(3):
        second = torch.ops.subkern.masked_linear_select(x, w, s2, 0.5, None)
        assert second[2].data_ptr() != first[2].data_ptr()
        assert second[3].data_ptr() != first[3].data_ptr()
    for held, copy in zip(first[1:], kept, strict=True):
        assert torch.equal(held.nan_to_num(), copy.nan_to_num())
    assert torch.equal(view, kept[1][3:7])
    # gradients: grad_scores from one step stays intact through the next steps
    ss = s.clone().requires_grad_()
    mk.masked_linear(x, w, ss, 0.5).sum().backward()
    grad = ss.grad.clone()
    for _ in range(2):
        s3 = s2.clone().requires_grad_()
        mk.masked_linear(x, w, s3, 0.5).square().sum().backward()
    assert torch.equal(ss.grad, grad)
    # released buffers are reused (no fresh allocation every step)
    del first, view, second
    ptrs = {torch.ops.subkern.masked_linear_select(x, w, s, 0.5, None)[2].data_ptr()
            for _ in range(4)}
    assert len(ptrs) == 1
    # inference mode (inference tensors are not pooled), then a training step again
    with torch.inference_mode():
        y_inf = mk.masked_linear(x, w, s, 0.5)
    ss = s.clone().requires_grad_()
    y = mk.masked_linear(x, w, ss, 0.5)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf)
    assert torch.equal(ss.grad, grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_non_contiguous(backend):
    x, w, s, b = _case((9, 30), 14)
    xt = torch.randn(30, 9, dtype=torch.float64).t()          # non-contiguous x
    wt = w.t().contiguous().t()                                 # transposed storage
    st = torch.randn(14, 60, dtype=torch.float64)[:, ::2]      # strided scores
    gy = torch.randn(9, 14, dtype=torch.float64)
    ref_in = _leaves(xt, wt, st, b)
    ref_g = _grads(_official(*ref_in[:3], 0.5, ref_in[3]), ref_in, gy)
    ours_in = [xt.detach().requires_grad_(), wt.detach().requires_grad_(),
               st.detach().requires_grad_(), b.detach().clone().requires_grad_()]
    with subkern.use_backend(backend):
        out = mk.masked_linear(*ours_in[:3], 0.5, ours_in[3])
    for got, want in zip(_grads(out, ours_in, gy), ref_g, strict=True):
        _close(got, want, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_ties_and_nan(backend):
    x, w, _, b = _case((4, 16), 8)
    s = torch.zeros(8, 16, dtype=torch.float64)
    s[::2] = 1.0                                     # many ties
    s[0, 0] = float("nan")                           # NaN ranks last, gradient 0
    s[3, 3] = -0.0
    gy = torch.randn(4, 8, dtype=torch.float64)
    for k in (0.25, 0.5, 0.9):
        ref_in = _leaves(x, w, s, b)
        ref_g = _grads(_official(*ref_in[:3], k, ref_in[3]), ref_in, gy)
        ours_in = _leaves(x, w, s, b)
        with subkern.use_backend(backend):
            out = mk.masked_linear(*ours_in[:3], k, ours_in[3])
        for got, want in zip(_grads(out, ours_in, gy), ref_g, strict=True):
            _close(got, want, torch.float64)
        assert ours_in[2].grad[0, 0] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_empty(backend):
    w = torch.randn(6, 5, requires_grad=True)
    s = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(0, 5, requires_grad=True)
    with subkern.use_backend(backend):
        y = mk.masked_linear(x, w, s, 0.5)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert torch.equal(s.grad, torch.zeros(6, 5)) and torch.equal(w.grad, torch.zeros(6, 5))
    # zero in_features: y = bias
    b = torch.randn(3)
    with subkern.use_backend(backend):
        y = mk.masked_linear(torch.randn(4, 0), torch.randn(3, 0), torch.randn(3, 0), 0.5, b)
    assert torch.equal(y, b.expand(4, 3))


def test_with_mask_matches_k_form():
    x, w, s, b = _case((5, 21), 11, dtype=torch.float32)
    m = mk.select_mask(s, 0.35)
    assert int(m.sum()) == kept_count(s.numel(), 0.35)
    torch.testing.assert_close(mk.masked_linear_with_mask(x, w, s, m, b),
                               mk.masked_linear(x, w, s, 0.35, b))
    torch.testing.assert_close(torch.ops.subkern.masked_linear(x, w, s, 0.35, b),
                               F.linear(x, w * m, b))


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------

def _official_conv(x, w, s, k, b, stride, padding, dilation, groups):
    mask = mk.select_mask(s, k).to(w.dtype)
    w_eff = w * (mask + s.abs() - s.abs().detach())  # straight-through through |S|
    return F.conv2d(x, w_eff, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("cin", "cout", "ksz", "stride", "padding", "dilation", "groups", "bias"),
                         [(3, 5, 3, 1, 1, 1, 1, True), (4, 6, 3, 2, 0, 1, 2, False),
                          (2, 4, (3, 1), (1, 2), (2, 0), (2, 1), 1, True)])
def test_conv_matches_official(backend, cin, cout, ksz, stride, padding, dilation, groups, bias):
    kh, kw = (ksz, ksz) if isinstance(ksz, int) else ksz
    x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, kh, kw, dtype=torch.float64)
    s = torch.randn_like(w)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    ref_in = _leaves(x, w, s, b)
    ref = _official_conv(*ref_in[:3], 0.4, ref_in[3], stride, padding, dilation, groups)
    gy = torch.randn_like(ref)
    ref_g = _grads(ref, ref_in, gy)
    ours_in = _leaves(x, w, s, b)
    with subkern.use_backend(backend):
        out = mk.masked_conv2d(*ours_in[:3], 0.4, ours_in[3], stride, padding, dilation, groups)
    _close(out, ref, torch.float64)
    for got, want in zip(_grads(out, ours_in, gy), ref_g, strict=True):
        if want is None:
            assert got is None
        else:
            _close(got, want, torch.float64)


def test_conv_weight_frozen_and_unbatched():
    x = torch.randn(3, 7, 7, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    s = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = mk.masked_conv2d(x, w, s, 0.5, padding=1)
    assert y.shape == (4, 7, 7)
    y.sum().backward()
    assert w.grad is None and s.grad is not None and x.grad is not None


# --------------------------------------------------------------------------------------------
# registration: gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_linear(backend):
    # the output does not depend continuously on the scores (a mask); their straight-through
    # gradient is checked against autograd above. x, weight and bias: numerical gradcheck.
    x, w, s, b = _case((3, 2, 6), 5)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    def fn(x_, w_, b_):
        with subkern.use_backend(backend):
            return mk.masked_linear(x_, w_, s, 0.5, b_)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_conv():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: mk.masked_conv2d(x_, w_, s, 0.6, b_, stride=2, padding=1), (x, w, b))


def _linear_samples():
    out = []
    for shape_x, out_f, bias in [((5, 12), 7, True), ((2, 3, 9), 4, False)]:
        x, w, s, b = _case(shape_x, out_f, dtype=torch.float32, bias=bias)
        for t in (x, w, s, b):
            if t is not None:
                t.requires_grad_()
        out.append((x, w, s, mk.select_mask(s, 0.5), b))
    return out


def test_opcheck_linear():
    for x, w, s, m, b in _linear_samples():
        torch.library.opcheck(torch.ops.subkern.masked_linear_with_mask, (x, w, s, m, b))
        torch.library.opcheck(torch.ops.subkern.masked_linear, (x, w, s, 0.5, b))
        gy = torch.randn(*x.shape[:-1], w.shape[0])
        args = (gy, x.detach(), w.detach(), s.detach(), m, [True, True, True])
        torch.library.opcheck(torch.ops.subkern.masked_linear_backward, args)
        torch.library.opcheck(torch.ops.subkern.masked_linear_backward,
                              (*args[:5], [False, True, False]))
        g = torch.randn(w.shape)
        torch.library.opcheck(torch.ops.subkern.masked_weight_grads,
                              (g, w.detach(), s.detach(), m, True))
        # the CPU training step's ops: fused selection + W * M, backward reusing W * M
        torch.library.opcheck(torch.ops.subkern.masked_linear_select, (x, w, s, 0.5, b))
        y_sel, m_sel, w_eff, w_sign = torch.ops.subkern.masked_linear_select(
            x.detach(), w.detach(), s.detach(), 0.5, None)
        assert torch.equal(m_sel, mk.select_mask(s, 0.5))
        torch.testing.assert_close(y_sel, F.linear(x.detach(), w.detach() * m_sel))
        sel_args = (gy, x.detach(), w.detach(), s.detach(), m_sel, w_eff, w_sign)
        for need in ([True, True, True], [False, True, False], [True, False, False]):
            torch.library.opcheck(torch.ops.subkern.masked_linear_select_backward,
                                  (*sel_args, need))


def test_opcheck_conv():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    s = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    m = mk.select_mask(s, 0.5)
    torch.library.opcheck(torch.ops.subkern.masked_conv2d_with_mask,
                          (x, w, s, m, b, [1, 2], [1, 0], [1, 1], 2))
    torch.library.opcheck(torch.ops.subkern.masked_conv2d, (x, w, s, 0.5, b, [1, 1], [1, 1],
                                                            [1, 1], 2))


def test_compile_fullgraph():
    x, w, s, b = _case((2, 5, 16), 12, dtype=torch.float32)
    xc = torch.randn(1, 3, 6, 6)
    wc = torch.randn(4, 3, 3, 3)

    def step(x_, s_, sc_):
        y = mk.masked_linear(x_, w, s_, 0.5, b)
        z = mk.masked_conv2d(xc, wc, sc_, 0.3, padding=1)
        return y.square().sum() + z.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves_eager = _leaves(x, s, torch.randn(4, 3, 3, 3))
    leaves_comp = _leaves(*leaves_eager)
    step(*leaves_eager).backward()
    compiled(*leaves_comp).backward()
    for a, c in zip(leaves_eager, leaves_comp, strict=True):
        torch.testing.assert_close(c.grad, a.grad)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_k(k):
    x, w, s, b = _case((2, 4), 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\]"):
        mk.masked_linear(x, w, s, k, b)
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\]"):
        mk.masked_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1),
                         torch.randn(3, 2, 1, 1), k)


@pytest.mark.parametrize("k", [True, "0.5", None])
def test_bad_k_type(k):
    x, w, s, b = _case((2, 4), 3, dtype=torch.float32)
    with pytest.raises(TypeError, match="k must be a float"):
        mk.masked_linear(x, w, s, k, b)


def test_bad_shapes_dtypes_devices():
    x, w, s, b = _case((2, 4), 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="scores must have the shape of weight"):
        mk.masked_linear(x, w, s[:, :3], 0.5)
    with pytest.raises(ValueError, match="last dimension must be in_features = 4"):
        mk.masked_linear(torch.randn(2, 5), w, s, 0.5)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        mk.masked_linear(x, w[0], s[0], 0.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        mk.masked_linear(x, w, s, 0.5, torch.randn(4))
    with pytest.raises(TypeError, match="scores must have the dtype of x"):
        mk.masked_linear(x, w, s.double(), 0.5)
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        mk.masked_linear(x.double(), w, s.double(), 0.5)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        mk.masked_linear(x.long(), w.long(), s.long(), 0.5)
    with pytest.raises(ValueError, match="same device"):
        mk.masked_linear(x, w.to("meta"), s, 0.5)
    with pytest.raises(TypeError, match="mask must be a bool"):
        mk.masked_linear_with_mask(x, w, s, (s > 0).float())
    with pytest.raises(ValueError, match="mask must have the shape of weight"):
        mk.masked_linear_with_mask(x, w, s, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mk.masked_linear([1.0], w, s, 0.5)
    with pytest.raises(ValueError, match="channels"):
        mk.masked_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 2, 1, 1),
                         torch.randn(2, 2, 1, 1), 0.5)
    with pytest.raises(ValueError, match="stride must be"):
        mk.masked_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 1, 1),
                         torch.randn(2, 2, 1, 1), 0.5, stride=(1, 2, 3))


def test_bench_family_tiny():
    """`subkern bench --ops masked_linear` machinery: every timed result matches the reference."""
    from subkern.bench import harness
    from subkern.bench import masked as bench_masked

    result = bench_masked.run(harness.BenchConfig(device="cpu", size="tiny", log=lambda _: None))
    assert not result.errors and result.rows
    assert all(row.match for row in result.rows), [row.match_detail for row in result.rows]
    assert {row.rival for row in result.rows} == {"reference (sort+mul+F.linear+autograd)",
                                                  "dense F.linear fwd+bwd"}


@pytest.mark.parametrize("env", [None, "materialize"])
def test_bench_case_with_both_matmul_strategies(env, monkeypatch):
    """The rows of both matmul strategies that CUDA runs, exercised on CPU through the
    interpreter; each row is named after the strategy it ran and checked against the
    reference (``SUBKERN_GPU_MATMUL`` swaps which one is the default)."""
    from subkern.bench import harness
    from subkern.bench import masked as bench_masked

    if _backend.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton cannot run CPU tensors here (TRITON_INTERPRET unset)")
    if env is None:
        monkeypatch.delenv("SUBKERN_GPU_MATMUL", raising=False)
    else:
        monkeypatch.setenv("SUBKERN_GPU_MATMUL", env)
    default, other = ("fused", "materialize") if env is None else ("materialize", "fused")
    config = harness.BenchConfig(device="cpu", size="tiny", log=lambda _: None)
    result = harness.BenchResult(bench_masked.FAMILY, "cpu", "tiny")
    size = bench_masked.size_for("cpu", "tiny")
    out_f, in_f = size.layers[0]
    bench_masked._run_case(config, size, result, out_f, in_f, size.tokens[0], torch.float32,
                           "triton", both_strategies=True)
    # on CPU the default strategy is fused (unless the environment says otherwise)
    assert all(row.match for row in result.rows), [row.match_detail for row in result.rows]
    rows = [row for row in result.rows if f", {other}]" in row.ours]
    assert len(rows) == 1 and rows[0].rival == "dense F.linear fwd+bwd"
    assert rows[0].ours == f"subkern[triton, {other}] fwd+bwd (mask given)"
    assert {row.ours for row in result.rows} == {
        f"subkern[triton, {default}] select+fwd+bwd",
        f"subkern[triton, {default}] fwd+bwd (mask given)",
        f"subkern[triton, {other}] fwd+bwd (mask given)"}
