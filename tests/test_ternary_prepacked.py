"""subkern::ternary_prepack / ternary_linear_prepacked (nibble lookup tables) against the
reference; concurrent callers of the CPU kernels; the persistent thread pool of the bit-mask
kernel (csrc/cpu/parallel.cpp) in a forked child."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F
from _helpers import dense_linear_fp64 as dense
from _helpers import needs_cpp, ternary_weight
from _helpers import ternary_tol as tol
from hypothesis import given, settings
from hypothesis import strategies as st

import subkern  # noqa: F401  (loads the op library and subkern._C)
from subkern import _ext
from subkern.backend import use_backend
from subkern.ops import ternary as T

INS = [1, 3, 4, 5, 63, 64, 65, 130, 1000]
OUTS = [1, 15, 16, 17, 100]
BATCHES = [0, 1, 2, 3, 5, 17]


def _prepacked(out: int, inp: int, scale: float = 0.37, seed: int = 0):
    """A seeded ternary weight with its bit planes, scale and prepacked tables."""
    w = ternary_weight(out, inp, scale=scale, seed=seed)
    mb, sb, c = T.pack_ternary(w)
    return w, mb, sb, c, T.ternary_prepack(mb, sb, inp)


def test_prepack_layout_by_hand():
    out, inp = 17, 6
    w, mb, sb, _, packed = _prepacked(out, inp)
    assert packed.dtype == torch.uint8 and packed.shape == T.prepacked_shape(out, inp) == (2, 32)
    for o in range(out):
        q, r = divmod(o, 16)
        for g in range(2):
            byte = int(packed[q, 16 * g + r])
            for j in range(4):
                i = 4 * g + j
                p_bit, n_bit = (byte >> j) & 1, (byte >> (4 + j)) & 1
                want = 0.0 if i >= inp else float(torch.sign(w[o, i]))
                assert p_bit - n_bit == want
    # rows past out_features are zero
    assert int(packed[1, torch.arange(32) % 16 != 0].sum()) == 0


def test_prepack_ignores_padding_and_masked_signs():
    w = ternary_weight(5, 70)
    mb, sb, c = T.pack_ternary(w)
    mb2, sb2 = mb.clone(), sb.clone()
    mb2[:, 1] |= -(1 << 20)         # mask bits past in_features
    sb2 |= ~mb                      # sign bits where the mask is 0
    torch.testing.assert_close(T.ternary_prepack(mb2, sb2, 70), T.ternary_prepack(mb, sb, 70))
    torch.testing.assert_close(T.unprepack_ternary(T.ternary_prepack(mb, sb, 70), c, 70, 5), w)


@pytest.mark.parametrize("inp", INS)
def test_reference_of_prepacked(inp):
    for out in OUTS:
        w, mb, sb, c, packed = _prepacked(out, inp, seed=out + inp)
        torch.testing.assert_close(T.unprepack_ternary(packed, c, inp, out), w)
        x = torch.randn(3, inp)
        with use_backend("reference"):
            y = T.ternary_linear_prepacked(x, packed, c, inp, out)
        torch.testing.assert_close(y.double(), dense(x, w, None), atol=tol(inp), rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("inp", INS)
def test_cpp_matches_reference_every_isa(cpu_isa, inp):
    for out in OUTS:
        w, mb, sb, c, packed = _prepacked(out, inp, seed=out * inp)
        bias = torch.randn(out)
        for batch in BATCHES:
            x = torch.randn(batch, inp)
            b = bias if batch % 2 else None
            with use_backend("cpp"):
                y = T.ternary_linear_prepacked(x, packed, c, inp, out, b)
            assert y.shape == (batch, out) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), dense(x, w, b), atol=tol(inp), rtol=1e-5)


@needs_cpp
def test_zero_inputs_and_outputs(cpu_isa):
    for batch, out, inp in [(0, 4, 5), (3, 0, 7), (2, 3, 0), (0, 0, 0)]:
        w, mb, sb, c, packed = _prepacked(out, inp)
        bias = torch.randn(out)
        x = torch.randn(batch, inp)
        with use_backend("cpp"):
            y = T.ternary_linear_prepacked(x, packed, c, inp, out, bias)
        torch.testing.assert_close(y, F.linear(x, w, bias))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(cpu_isa, dtype):
    w, mb, sb, c, packed = _prepacked(33, 130, scale=0.1)
    x = torch.randn(6, 130).to(dtype)
    bias = torch.randn(33)
    with use_backend("cpp"):
        y = T.ternary_linear_prepacked(x, packed, c, 130, 33, bias)
    assert y.dtype == dtype
    # float32 accumulation, one rounding to dtype at the end: within one ulp of dtype
    expected = dense(x.float(), w, bias)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=ulp)


@needs_cpp
def test_noncontiguous_and_batched_shapes():
    w, mb, sb, c, packed = _prepacked(20, 65)
    base = torch.randn(65, 12)
    x = base.t()[::2]                       # [6, 65], non-contiguous
    assert not x.is_contiguous()
    x3 = torch.randn(2, 3, 65)
    with use_backend("cpp"):
        y = T.ternary_linear_prepacked(x, packed, c, 65, 20)
        y3 = T.ternary_linear_prepacked(x3, packed, c, 65, 20)
    torch.testing.assert_close(y.double(), dense(x, w, None), atol=tol(65), rtol=1e-5)
    assert y3.shape == (2, 3, 20)
    torch.testing.assert_close(y3.double(), dense(x3, w, None), atol=tol(65), rtol=1e-5)
    packed_nc = torch.empty(packed.shape[1], packed.shape[0], dtype=torch.uint8).t()
    packed_nc.copy_(packed)
    with use_backend("cpp"):
        torch.testing.assert_close(T.ternary_linear_prepacked(x, packed_nc, c, 65, 20), y)


@needs_cpp
@pytest.mark.parametrize("batch", [7, 3])   # 3: every thread builds its own tables
def test_results_do_not_depend_on_thread_count(batch):
    w, mb, sb, c, packed = _prepacked(1000, 1030, scale=0.05)
    x = torch.randn(batch, 1030)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            with use_backend("cpp"):
                outs.append((T.ternary_linear_prepacked(x, packed, c, 1030, 1000),
                             T.ternary_linear(x, mb, sb, c, 1030)))
    finally:
        torch.set_num_threads(before)
    for y, z in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(z, outs[0][1])
    # and not on the batch blocking: row b alone gives the same bits as inside the batch
    with use_backend("cpp"):
        for b in (0, batch // 2, batch - 1):
            row = T.ternary_linear_prepacked(x[b:b + 1], packed, c, 1030, 1000)
            assert torch.equal(row[0], outs[0][0][b])
    torch.testing.assert_close(outs[0][0].double(), dense(x, w, None), atol=1e-4, rtol=1e-5)


def test_bad_inputs():
    w, mb, sb, c, packed = _prepacked(5, 10)
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="packed must be uint8"):
        T.ternary_linear_prepacked(x, packed[:, :16], c, 10, 5)
    with pytest.raises(ValueError, match="packed must be uint8"):
        T.ternary_linear_prepacked(x, packed, c, 10, 17)
    with pytest.raises(ValueError, match="packed must be uint8"):
        T.ternary_linear_prepacked(x, packed.to(torch.int32), c, 10, 5)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 10\]"):
        T.ternary_linear_prepacked(torch.randn(2, 9), packed, c, 10, 5)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        T.ternary_linear_prepacked(x.double(), packed, c, 10, 5)
    with pytest.raises(ValueError, match="out_features must be a non-negative int"):
        T.ternary_linear_prepacked(x, packed, c, 10, -1)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        T.ternary_linear_prepacked(x, packed, c, 10, 5, torch.randn(4))
    with pytest.raises(TypeError, match="mask_bits must be int64"):
        T.ternary_prepack(mb.int(), sb, 10)
    with pytest.raises(ValueError, match="sign_bits must have shape"):
        T.ternary_prepack(mb, sb[:3], 10)
    with pytest.raises(ValueError, match="in_features must be a non-negative int"):
        T.ternary_prepack(mb, sb, -1)


@needs_cpp
def test_cpp_kernel_checks_directly():
    w, mb, sb, c, packed = _prepacked(5, 10)
    op = torch.ops.subkern.ternary_linear_prepacked
    with pytest.raises(RuntimeError, match="packed must be"):
        op(torch.randn(2, 10), packed[:, :8], c, 10, 5, None)
    with pytest.raises(RuntimeError, match="x has 9 columns"):
        op(torch.randn(2, 9), packed, c, 10, 5, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(torch.randn(2, 10), packed, c, 10, 5, torch.randn(3))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradients_match_dense(backend):
    if backend == "cpp" and not _ext.has_cpu_kernels():
        pytest.skip("subkern._C not built")
    w, mb, sb, c, packed = _prepacked(20, 37, scale=0.1)
    x = torch.randn(4, 37, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    with use_backend(backend):
        y = T.ternary_linear_prepacked(x, packed, c, 37, 20, bias)
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), g)
    gx2, gb2 = torch.autograd.grad(F.linear(x, w, bias), (x, bias), g)
    torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, gb2)


def test_opcheck():
    w, mb, sb, c, packed = _prepacked(19, 70)
    for args in [(torch.randn(5, 70), packed, c, 70, 19, torch.randn(19)),
                 (torch.randn(1, 70), packed, c, 70, 19, None),
                 (torch.randn(3, 70, requires_grad=True), packed, c, 70, 19, None)]:
        torch.library.opcheck(torch.ops.subkern.ternary_linear_prepacked.default, args)
    torch.library.opcheck(torch.ops.subkern.ternary_prepack.default, (mb, sb, 70))


def test_torch_compile_fullgraph():
    w, mb, sb, c, packed = _prepacked(19, 70)
    bias = torch.randn(19)

    def f(x):
        return torch.relu(T.ternary_linear_prepacked(x, packed, c, 70, 19, bias)) * 2

    x = torch.randn(4, 70)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 150), batch=st.integers(0, 9),
       seed=st.integers(0, 2 ** 16))
def test_property_prepacked_equals_bitmask_op(out, inp, batch, seed):
    w, mb, sb, c, packed = _prepacked(out, inp, seed=seed)
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(seed))
    y = T.ternary_linear_prepacked(x, packed, c, inp, out)
    z = T.ternary_linear(x, mb, sb, c, inp)
    torch.testing.assert_close(y, z, atol=tol(inp), rtol=1e-5)
    # the layout is a bijection of the kept bits
    torch.testing.assert_close(T.unprepack_ternary(packed, c, inp, out), w)


# ------------------------------------------------------------------------------------------
# Threads: concurrent Python callers; the bit-mask kernel's pool (csrc/cpu/parallel.cpp) after fork
# ------------------------------------------------------------------------------------------

@needs_cpp
def test_concurrent_callers_from_python_threads():
    w, mb, sb, c, packed = _prepacked(512, 700, scale=0.05)
    xs = [torch.randn(3, 700, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with use_backend("cpp"):
        expected = [T.ternary_linear_prepacked(x, packed, c, 700, 512) for x in xs]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with use_backend("cpp"):
                for _ in range(15):
                    y = T.ternary_linear_prepacked(xs[i], packed, c, 700, 512)
                    assert torch.equal(y, expected[i])
                    z = T.ternary_linear(xs[i], mb, sb, c, 700)
                    torch.testing.assert_close(z, expected[i], atol=1e-4, rtol=1e-5)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors


_FORK_CASE: dict[str, torch.Tensor] = {}


def _child_run(queue) -> None:
    # Only the kernel on subkern's own pool here (the bit-mask ternary kernel): torch's OpenMP
    # pool, which the prepacked kernel runs on, is not usable in a forked child once the parent
    # has used it (a known torch/OpenMP limitation, unrelated to subkern).
    case = _FORK_CASE
    torch.set_num_threads(2)
    with use_backend("cpp"):
        y = T.ternary_linear(case["x"], case["mb"], case["sb"], 0.05, 1024)
    queue.put(torch.equal(y, case["y"]))


@needs_cpp
def test_forked_child_does_not_deadlock():
    # warm the pool in the parent (2 tasks: 1024 x 1024 x 4 is enough work for 2 threads),
    # then run the same kernels in a forked child
    w, mb, sb, _, _ = _prepacked(1024, 1024, scale=0.05)
    x = torch.randn(4, 1024)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with use_backend("cpp"):
            y = T.ternary_linear(x, mb, sb, 0.05, 1024)
    finally:
        torch.set_num_threads(before)
    _FORK_CASE.update(x=x, mb=mb, sb=sb, y=y)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_run, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    _FORK_CASE.clear()
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("the forked child hung in the CPU kernel's thread pool")
    assert proc.exitcode == 0
    assert queue.get(timeout=5) is True
