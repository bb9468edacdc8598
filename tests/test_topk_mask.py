"""Edge-popup top-k score masking: reference semantics, the C++ CPU kernel against the reference,
input checks, the straight-through gradient, the batched op, opcheck and torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subkern import backend as _backend
from subkern.ops import topk_mask as tm
from subkern.ops import topk_mask_reference as ref

needs_cpp = pytest.mark.skipif(_backend.unavailable_reason("cpp", torch.device("cpu"),
                                                           "topk_mask") is not None,
                               reason="subkern._C has no topk_mask CPU kernel")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
KS = (1e-4, 0.3, 0.5, 1.0)
SIZES = (1, 7, 1000, 9408)


def make_scores(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Scores of a given flavour: random, all equal, quantised (many ties), with NaN/inf, signs."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "equal":
        return torch.full((n,), -0.5, dtype=dtype)
    if kind == "quantised":  # few distinct magnitudes, both signs and zeros
        return (torch.randn(n, generator=gen) * 3).round().to(dtype)
    if kind == "special":
        s = torch.randn(n, generator=gen).to(dtype)
        idx = torch.randperm(n, generator=gen)[: max(1, n // 4)]
        third = max(1, len(idx) // 3)
        s[idx[:third]] = float("nan")
        s[idx[third: 2 * third]] = float("inf")
        s[idx[2 * third:]] = -float("inf")
        if n > 3:
            s[1], s[2] = 0.0, -0.0
        return s
    raise ValueError(kind)


def oracle_mask(scores: torch.Tensor, k: float) -> np.ndarray:
    """Independent numpy oracle: lexsort by (-|s| with NaN lowest, index)."""
    mag = np.abs(scores.detach().to(torch.float64).flatten().numpy())
    key = np.where(np.isnan(mag), -1.0, mag)
    n = mag.size
    keep = n - math.floor((1.0 - k) * n)
    order = np.lexsort((np.arange(n), -key))
    out = np.zeros(n)
    out[order[:keep]] = 1
    return out.reshape(tuple(scores.shape))


def same_threshold(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.dim() == 0 and (
        bool(torch.equal(a, b)) or (bool(a.isnan()) and bool(b.isnan())))


# ----------------------------------------------------------------------------- reference

def test_kept_count_is_getsubnets():
    # GetSubnet zeroes floor((1 - k) n) entries
    assert ref.kept_count(10, 0.3) == 10 - math.floor(0.7 * 10)
    # floor((1 - k) n) < n for k > 0: a non-empty tensor always keeps at least one entry
    assert ref.kept_count(1, 1e-4) == 1 and ref.kept_count(9408, 1e-4) == 1
    assert ref.kept_count(9408, 0.5) == 4704


@pytest.mark.parametrize("kind", ["randn", "equal", "quantised", "special"])
@pytest.mark.parametrize("k", [0.1, 0.5, 0.9])
def test_reference_matches_numpy_oracle(kind, k):
    s = make_scores(kind, 257, torch.float32, seed=3)
    assert np.array_equal(ref.topk_mask(s, k).numpy(), oracle_mask(s, k))


def test_reference_matches_official_getsubnet_without_ties():
    # The official code: out[idx[:j]] = 0, out[idx[j:]] = 1 with idx = sort(|s|).indices
    s = torch.randn(3, 5, 7, dtype=torch.float64)
    k = 0.37
    idx = s.abs().flatten().sort().indices
    j = int((1 - k) * s.numel())
    official = torch.zeros(s.numel(), dtype=s.dtype)
    official[idx[j:]] = 1
    assert torch.equal(ref.topk_mask(s, k).flatten(), official)


def test_special_values_documented_ranking():
    s = torch.tensor([float("nan"), 1.0, -float("inf"), 0.0, -2.0, float("nan")])
    # inf > 2 > 1 > 0 > NaN (NaN ties broken by index)
    expected_order = [2, 4, 1, 3, 0, 5]
    for keep in range(1, 7):
        k = keep / 6
        mask = tm.topk_mask(s, k)
        kept = sorted(expected_order[: ref.kept_count(6, k)])
        assert torch.nonzero(mask).flatten().tolist() == kept
    assert tm.topk_threshold(s, 1 / 6).item() == float("inf")
    assert tm.topk_threshold(s, 4 / 6).item() == 0.0
    assert math.isnan(tm.topk_threshold(s, 1.0).item())


# ----------------------------------------------------------------------------- C++ vs reference

@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "equal", "quantised", "special"])
def test_cpp_matches_reference(dtype, kind):
    with _backend.use_backend("cpp"):
        for n in SIZES:
            s = make_scores(kind, n, dtype, seed=n)
            for k in KS:
                want = ref.topk_mask(s, k)
                got = tm.topk_mask(s, k)
                assert got.dtype == dtype and got.shape == s.shape
                assert torch.equal(got, want), (n, k)
                assert same_threshold(tm.topk_threshold(s, k), ref.topk_threshold(s, k)), (n, k)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_large_layer_and_thread_counts(dtype):
    # ResNet-50's largest layer (512 * 512 * 3 * 3), many ties from coarse quantisation
    s = (torch.randn(2_359_296, dtype=dtype) * 64).round() / 64
    s = s.view(512, 512, 3, 3)
    want = ref.topk_mask(s, 0.3)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with _backend.use_backend("cpp"):
                results.append(tm.topk_mask(s, 0.3))
    finally:
        torch.set_num_threads(old)
    for got in results:
        assert torch.equal(got, want)
    assert int(want.sum()) == ref.kept_count(s.numel(), 0.3)


@needs_cpp
def test_cpp_ties_split_across_threads():
    # all-equal scores: the kept entries are exactly the first `keep` ones, whatever the threads
    s = torch.full((300_000,), 0.25)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            with _backend.use_backend("cpp"):
                got = tm.topk_mask(s, 0.3)
            keep = ref.kept_count(s.numel(), 0.3)
            assert got[:keep].eq(1).all() and got[keep:].eq(0).all()
    finally:
        torch.set_num_threads(old)


def _isas() -> list[str]:
    import subkern._C as ext

    return ["portable"] + (["avx512"] if ext.cpu_isa() == "avx512vpopcntdq" else [])


def _layouts(n: int) -> dict[str, torch.Tensor]:
    """Layouts for the sample-bracket select: iid, sorted (the sample sees a skewed order),
    a periodic spike pattern, mostly ties (candidate overflow -> radix fallback), NaN/inf."""
    gen = torch.Generator().manual_seed(n)
    periodic = torch.randn(n, generator=gen)
    periodic[::37] = 1000.0
    mostly_ties = torch.randn(n, generator=gen).abs()
    mostly_ties[n // 3:] = 0.5
    special = torch.randn(n, generator=gen)
    special[::3] = float("nan")
    special[::7] = -float("inf")
    return {"randn": torch.randn(n, generator=gen),
            "sorted": torch.randn(n, generator=gen).sort()[0], "periodic": periodic,
            "mostly_ties": mostly_ties, "special": special,
            "sparse": torch.zeros(n).index_fill_(0, torch.arange(0, n, 9973), 1.0)}


@needs_cpp
@pytest.mark.parametrize("isa", _isas())
def test_cpp_bracket_select_layouts_and_bool_mask(isa):
    # above 2^14 entries the kernel brackets the threshold from a sample (AVX-512 or portable
    # pass) and falls back to radix select when the sample misses: the result never changes
    import subkern._C as ext

    old = torch.get_num_threads()
    ext.set_cpu_isa(isa)
    try:
        torch.set_num_threads(1)
        for name, s in _layouts(20_001).items():
            for k in (1e-17, 0.2, 0.5, 0.97):
                want = ref.topk_mask(s, k)
                with _backend.use_backend("cpp"):
                    assert torch.equal(tm.topk_mask(s, k), want), (name, k)
                    assert torch.equal(tm.topk_mask_bool(s, k), want.bool()), (name, k)
                    assert same_threshold(tm.topk_threshold(s, k), ref.topk_threshold(s, k))
        # two threads: per-thread candidate buffers and tie counts
        torch.set_num_threads(2)
        s = torch.randn(150_001, generator=torch.Generator().manual_seed(9))
        s[::101] = 0.6745  # ties around the median of |s|: the k = 0.5 threshold falls in them
        for k in (0.3, 0.5):
            with _backend.use_backend("cpp"):
                assert torch.equal(tm.topk_mask_bool(s, k), ref.topk_mask(s, k).bool()), k
    finally:
        ext.set_cpu_isa("auto")
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bool_mask_small_dtypes_and_no_grad(backend):
    for dtype in DTYPES:
        for n in (0, 1, 7, 1000):
            s = make_scores("special", n, dtype, seed=n).view(-1, 1).requires_grad_(True)
            with _backend.use_backend(backend):
                got = tm.topk_mask_bool(s, 0.3)
            assert got.dtype == torch.bool and got.shape == s.shape and not got.requires_grad
            assert torch.equal(got, ref.topk_mask(s.detach(), 0.3).bool())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_non_contiguous_and_nd(backend):
    base = torch.randn(6, 5, 4)
    s = base.permute(2, 0, 1)[:, ::2]  # non-contiguous
    assert not s.is_contiguous()
    with _backend.use_backend(backend):
        got = tm.topk_mask(s, 0.4)
        assert torch.equal(got, ref.topk_mask(s.contiguous(), 0.4))
        assert got.shape == s.shape
        assert same_threshold(tm.topk_threshold(s, 0.4), ref.topk_threshold(s.contiguous(), 0.4))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_empty_and_zero_dim(backend):
    with _backend.use_backend(backend):
        empty = torch.empty(0, 3)
        got = tm.topk_mask(empty, 0.5)
        assert got.shape == (0, 3) and got.dtype == empty.dtype
        assert tm.topk_threshold(empty, 0.5).item() == float("inf")
        scalar = torch.tensor(-3.0)
        assert tm.topk_mask(scalar, 0.5).item() == 1.0 and tm.topk_mask(scalar, 0.5).dim() == 0
        assert tm.topk_threshold(scalar, 1.0).item() == 3.0


# ----------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_k_raises_naming_k(k):
    with pytest.raises(ValueError, match="k must be in"):
        tm.topk_mask(torch.randn(10), k)
    with pytest.raises(ValueError, match="k must be in"):
        tm.topk_threshold(torch.randn(10), k)
    with pytest.raises(ValueError, match=r"k\[1\] must be in"):
        tm.topk_mask_batched([torch.randn(3), torch.randn(4)], [0.5, k])


def test_bad_inputs():
    with pytest.raises(TypeError, match="scores must be float16"):
        tm.topk_mask(torch.arange(10), 0.5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        tm.topk_mask([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="k must be a float"):
        tm.topk_mask(torch.randn(3), "0.5")
    with pytest.raises(ValueError, match="one per tensor"):
        tm.topk_mask_batched([torch.randn(3)], [0.5, 0.5])
    with pytest.raises(TypeError, match="sequence of tensors"):
        tm.topk_mask_batched(torch.randn(3), 0.5)


# ----------------------------------------------------------------------------- batched

@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_batched_equals_per_tensor(backend):
    layers = [make_scores("randn", 9408, torch.float32, 1).view(64, 3, 7, 7),
              make_scores("quantised", 300_000, torch.float32, 2),
              make_scores("special", 1000, torch.float16, 3),
              make_scores("equal", 7, torch.float64),
              torch.empty(0),
              make_scores("randn", 1, torch.bfloat16)]
    ks = [0.3, 0.5, 1e-4, 1.0, 0.5, 0.5]
    with _backend.use_backend(backend):
        got = tm.topk_mask_batched(layers, ks)
        same_k = tm.topk_mask_batched(layers, 0.3)
        for s, k, g, g3 in zip(layers, ks, got, same_k, strict=True):
            assert torch.equal(g, ref.topk_mask(s, k))
            assert torch.equal(g3, tm.topk_mask(s, 0.3))
    assert tm.topk_mask_batched([], 0.5) == []


@needs_cpp
def test_batched_thread_counts_identical():
    layers = [make_scores("quantised", n, torch.float32, n) for n in (9408, 36864, 600_000)]
    layers += [make_scores("equal", 70_000, torch.float16)]
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            with _backend.use_backend("cpp"):
                outs.append(tm.topk_mask_batched(layers, 0.3))
    finally:
        torch.set_num_threads(old)
    for s, *masks in zip(layers, *outs, strict=True):
        want = ref.topk_mask(s, 0.3)
        assert all(torch.equal(m, want) for m in masks)


# ----------------------------------------------------------------------------- gradient

@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_straight_through_gradient(backend):
    s = torch.randn(4, 6, dtype=torch.float64)
    s[0, 0] = 0.0
    s.requires_grad_(True)
    with _backend.use_backend(backend):
        mask = tm.topk_mask(s, 0.5)
        upstream = torch.randn_like(mask)
        (grad,) = torch.autograd.grad(mask, s, upstream)
    # edge-popup: GetSubnet(scores.abs()) passes the gradient through; abs multiplies by sign
    assert torch.equal(grad, upstream * torch.sign(s.detach()))
    assert grad[0, 0] == 0
    # the same as the official formulation through autograd of |s|
    s2 = s.detach().clone().requires_grad_(True)
    official = _OfficialGetSubnet.apply(s2.abs(), 0.5)
    (grad2,) = torch.autograd.grad(official, s2, upstream)
    assert torch.equal(grad, grad2)


class _OfficialGetSubnet(torch.autograd.Function):
    """The official edge-popup GetSubnet (sort-based, gradient passed through)."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return flat_out.view_as(scores)

    @staticmethod
    def backward(ctx, g):
        return g, None


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_fp64_jacobian_is_straight_through_rule(backend):
    # The mask is piecewise constant, so a finite-difference gradcheck would only see zeros; the
    # straight-through estimator is checked exactly instead: in fp64 the Jacobian of the op's
    # autograd is diag(sign(s)), the Jacobian of GetSubnet(|s|) with GetSubnet passing through.
    s = torch.randn(20, dtype=torch.float64)
    s[3] = 0.0
    with _backend.use_backend(backend):
        jac = torch.autograd.functional.jacobian(lambda x: tm.topk_mask(x, 0.3), s)
        mask = tm.topk_mask(s, 0.3)
    assert jac.dtype == torch.float64
    assert torch.equal(jac, torch.diag(torch.sign(s)))
    assert torch.equal(mask, ref.topk_mask(s, 0.3))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_batched_gradient(backend):
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    with _backend.use_backend(backend):
        ma, mb = tm.topk_mask_batched([a, b], [0.5, 0.2])
    (ma * 2).sum().backward()
    assert torch.equal(a.grad, 2 * torch.sign(a.detach()))
    assert b.grad is None or torch.equal(b.grad, torch.zeros_like(b))


# ----------------------------------------------------------------------------- dispatcher

def test_opcheck():
    s = torch.randn(6, 7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.subkern.topk_mask.default, (s, 0.4))
    torch.library.opcheck(torch.ops.subkern.topk_mask.default,
                          (s.clone().requires_grad_(True), 0.4))
    torch.library.opcheck(torch.ops.subkern.topk_threshold.default, (s, 0.4),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.subkern.topk_mask_batched.default,
                          ([s, torch.randn(9, dtype=torch.float64)], [0.4, 0.7]))
    torch.library.opcheck(torch.ops.subkern.topk_mask_batched.default,
                          ([s.clone().requires_grad_(True)], [0.4]))
    torch.library.opcheck(torch.ops.subkern.topk_mask_bool.default, (s, 0.4),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


def test_torch_compile_fullgraph():
    def step(scores, w, layers):
        mask = tm.topk_mask(scores, 0.3)
        masks = tm.topk_mask_batched(layers, 0.5)
        kept = tm.topk_mask_bool(scores, 0.3)
        return ((w * mask).sum() + sum(m.sum() for m in masks) + kept.sum(),
                tm.topk_threshold(scores, 0.3))

    scores = torch.randn(8, 9, requires_grad=True)
    w = torch.randn(8, 9)
    layers = [torch.randn(4, 5), torch.randn(30)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, thr = compiled(scores, w, layers)
    want, want_thr = step(scores, w, layers)
    assert torch.equal(got, want) and torch.equal(thr, want_thr)
    got.backward()
    assert torch.equal(scores.grad, w * torch.sign(scores.detach()))


# ----------------------------------------------------------------------------- benchmark module

def test_resnet50_layer_sizes():
    from subkern.bench import topk_mask as bench

    layers = bench.resnet50_weight_numels()
    numels = [torch.Size(shape).numel() for _, shape in layers]
    # torchvision resnet50: 25,557,032 parameters = conv/fc weights + fc bias (1000) + BN
    # weight and bias (2 x 26,560 channels)
    assert len(layers) == 54 and sum(numels) == 25_557_032 - 1000 - 2 * 26_560
    assert min(n for n in numels if n != 4096) == 9408 and max(numels) == 2_359_296


@needs_cpp
def test_benchmark_family_tiny_run():
    from subkern.bench import topk_mask as bench
    from subkern.bench.harness import BenchConfig

    result = bench.run(BenchConfig(size="tiny", log=lambda _msg: None))
    assert result.ok and not result.errors
    assert {row.rival for row in result.rows} == {bench.SORT_NAME, bench.KTH_NAME}
    assert all(row.match for row in result.rows) and len(result.rows) == 4


# ----------------------------------------------------------------------------- CUDA header

def test_cuda_header_is_valid_host_cpp(tmp_path):
    """csrc/cuda/topk_mask.cuh compiles as host C++ (the bindings include it) and its constants
    agree with the Triton kernels' (the .cu itself is compiled by tests/test_cuda_compile.py)."""
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    from subkern.kernels import topk_mask as triton_topk

    root = Path(__file__).resolve().parents[1]
    main = tmp_path / "use_header.cpp"
    main.write_text(
        '#include "cuda/topk_mask.cuh"\n'
        f"static_assert(subkern::cuda::kTopkDigitBits == {triton_topk.DIGIT_BITS}, \"digits\");\n"
        "int main() {\n"
        "  namespace c = subkern::cuda;\n"
        "  return (c::topk_mask_tiles(4097) == 2 && c::topk_mask_meta_size(3) == 16 &&\n"
        "          c::topk_mask_workspace_size(1, 2) == (2 + 2048 + 2) * 8) ? 0 : 1;\n"
        "}\n")
    cmd = [nvcc, "-x", "c++", "-std=c++17", "-Xcompiler", "-Wall,-Wextra,-Werror", "-I",
           str(root / "csrc"), str(main), "-o", str(tmp_path / "use_header")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    assert subprocess.run([str(tmp_path / "use_header")], timeout=30).returncode == 0
