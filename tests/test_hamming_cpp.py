"""The C++ CPU kernels of subkern._C (``torch.ops.subkern.hamming_distance/hamming_topk`` on CPU
tensors) against the torch reference, for every instruction-set level this CPU can run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import subkern
from subkern import _ext
from subkern.ops import binary_reference as ref

_C = _ext.extension()
pytestmark = pytest.mark.skipif(_C is None, reason=f"subkern._C not loaded: {_ext.load_error()}")

INT32_MAX = 2**31 - 1
ISAS = ("avx512", "avx2", "portable")
WIDTHS = (1, 3, 8, 12, 24, 32, 70, 128, 512)  # bytes; 70 = 8 full words + 6 bytes


def cpp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.subkern.hamming_distance(a, b)


def cpp_topk(q: torch.Tensor, db: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.subkern.hamming_topk(q, db, k)


def codes(n: int, nbytes: int, seed: int = 0, high: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, nbytes), dtype=torch.uint8, generator=gen)


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def assert_topk_equal(q: torch.Tensor, db: torch.Tensor, k: int) -> None:
    dist, idx = cpp_topk(q, db, k)
    rdist, ridx = ref.hamming_topk(q.contiguous(), db.contiguous(), k)
    assert dist.dtype == torch.int32 and idx.dtype == torch.int64
    assert dist.shape == idx.shape == (q.shape[0], k)
    assert torch.equal(dist, rdist)
    assert torch.equal(idx, ridx)


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces one CPU kernel level for the test; skips the levels this CPU cannot run."""
    try:
        _C.set_cpu_isa(request.param)
    except RuntimeError as err:
        pytest.skip(f"this CPU cannot run the {request.param} kernels: {err}")
    try:
        yield request.param
    finally:
        _C.set_cpu_isa("auto")


def test_isa_switch_reports_level(isa):
    expected = {"avx512": "avx512vpopcntdq", "avx2": "avx2", "portable": "portable"}[isa]
    assert _C.cpu_isa() == expected


def test_cpu_kernels_are_registered():
    assert subkern.ops.library.has_kernel("hamming_distance", "CPU")
    assert subkern.ops.library.has_kernel("hamming_topk", "CPU")


# ----------------------------------------------------------------------------- distances

@pytest.mark.parametrize("nbytes", WIDTHS)
@pytest.mark.parametrize("na,nb", [(1, 1), (5, 123), (123, 5), (37, 300)])
def test_distance_matches_reference(isa, nbytes, na, nb):
    a, b = codes(na, nbytes, 1), codes(nb, nbytes, 2)
    out = cpp_distance(a, b)
    assert out.dtype == torch.int32 and out.shape == (na, nb)
    assert torch.equal(out, ref.hamming_distance(a, b))


@pytest.mark.parametrize("nbytes", [1, 8, 12, 70])
def test_distance_many_tiles_and_threads(isa, nbytes):
    # Large enough for several database tiles and for both threading splits (rows / columns).
    b = codes(9001, nbytes, 3)
    for na in (3, 40):
        a = codes(na, nbytes, 4)
        expected = ref.hamming_distance(a, b)
        for threads in (1, 2):
            with _num_threads(threads):
                assert torch.equal(cpp_distance(a, b), expected)


def test_distance_extremes(isa):
    zeros = torch.zeros(3, 64, dtype=torch.uint8)
    ones = torch.full((2, 64), 255, dtype=torch.uint8)
    assert torch.equal(cpp_distance(zeros, ones), torch.full((3, 2), 512, dtype=torch.int32))
    assert torch.equal(cpp_distance(ones, ones), torch.zeros(2, 2, dtype=torch.int32))


def test_distance_empty(isa):
    a, b = codes(4, 5), codes(0, 5)
    assert cpp_distance(a, b).shape == (4, 0)
    assert cpp_distance(b, a).shape == (0, 4)


# ----------------------------------------------------------------------------- top-k

@pytest.mark.parametrize("nbytes", WIDTHS)
@pytest.mark.parametrize("nq,n", [(1, 1), (5, 123), (123, 5), (6, 300)])
def test_topk_matches_reference(isa, nbytes, nq, n):
    q, db = codes(nq, nbytes, 5), codes(n, nbytes, 6)
    for k in (1, 10, 100, n + 7):
        assert_topk_equal(q, db, k)


def test_topk_k_larger_than_database_marks_missing(isa):
    q, db = codes(3, 8, 7), codes(5, 8, 8)
    dist, idx = cpp_topk(q, db, 9)
    assert (dist[:, 5:] == INT32_MAX).all() and (idx[:, 5:] == -1).all()
    assert sorted(idx[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert_topk_equal(q, db, 9)


@pytest.mark.parametrize("nbytes", [1, 8, 12, 70])
def test_topk_many_tiles(isa, nbytes):
    # Several tiles of the transposed database, a ragged last tile and both top-k structures
    # (heap for k = 10, counting buffer for k = 300 at these widths).
    q, db = codes(9, nbytes, 9), codes(9001, nbytes, 10)
    for k in (1, 10, 300):
        assert_topk_equal(q, db, k)


@pytest.mark.parametrize("k", [2048, 2049, 3000])
def test_topk_large_k(isa, k):
    # Few distinct codes: long runs of equal distances around the k-th one.
    db = codes(5000, 2, 11, high=4)
    q = codes(3, 2, 12)
    assert_topk_equal(q, db, k)
    assert_topk_equal(codes(2, 32, 12), codes(4000, 32, 13), k)


@pytest.mark.parametrize("nbytes", [1, 8, 24, 512])
def test_topk_ties_pick_lowest_indices(isa, nbytes):
    zeros = torch.zeros(1000, nbytes, dtype=torch.uint8)
    q = codes(5, nbytes, 14)
    for k in (1, 17, 100, 1000):
        dist, idx = cpp_topk(q, zeros, k)
        assert torch.equal(idx, torch.arange(k).expand(5, k))
        popcount = torch.from_numpy(np.unpackbits(q.numpy(), axis=1).sum(1)).to(torch.int32)
        assert torch.equal(dist, popcount[:, None].expand(5, k))
    # Duplicated codes interleaved with others: equal distances come in index order.
    base = codes(7, nbytes, 15)
    db = base[torch.arange(2000) % 7]
    for k in (1, 50, 700):
        assert_topk_equal(q, db, k)


def test_topk_all_equal_codes_and_query(isa):
    db = torch.full((300, 4), 0xA5, dtype=torch.uint8)
    dist, idx = cpp_topk(db[:2], db, 40)
    assert (dist == 0).all()
    assert torch.equal(idx, torch.arange(40).expand(2, 40))


def test_topk_empty_inputs(isa):
    q, db = codes(3, 6), codes(0, 6)
    dist, idx = cpp_topk(q, db, 4)
    assert torch.equal(dist, torch.full((3, 4), INT32_MAX, dtype=torch.int32))
    assert torch.equal(idx, torch.full((3, 4), -1, dtype=torch.int64))
    dist, idx = cpp_topk(codes(0, 6), codes(10, 6), 4)
    assert dist.shape == idx.shape == (0, 4)
    dist, idx = cpp_topk(codes(0, 6), db, 2)
    assert dist.shape == idx.shape == (0, 2)


def test_non_contiguous_inputs(isa):
    wide = codes(400, 48, 16)
    q = wide[:7, ::2]          # strided columns: 24-byte codes
    db = wide[::3, 1::2]       # strided rows and columns
    assert not q.is_contiguous() and not db.is_contiguous()
    assert torch.equal(cpp_distance(q, db), ref.hamming_distance(q.contiguous(), db.contiguous()))
    assert_topk_equal(q, db, 25)
    t = codes(16, 30, 17).t()  # [30, 16] transposed view
    assert torch.equal(cpp_distance(t, t), ref.hamming_distance(t.contiguous(), t.contiguous()))
    assert_topk_equal(t, t, 3)


@pytest.mark.parametrize(
    "nq,n,nbytes,k",
    [
        (4, 300_000, 8, 20),     # few queries: database slices + merge
        (3, 40_000, 70, 100),
        (1, 20_000, 512, 15000),  # k larger than a slice
        (200, 20_000, 8, 10),    # many queries: query chunks
        (150, 5_000, 24, 300),
        (80, 30_000, 8, 50),     # 4 threads: 2 query chunks x 2 database slices
        (40, 60_000, 8, 3500),   # 4 threads: 4 slices, merged by 2 threads
    ],
)
def test_topk_thread_count_independent(isa, nq, n, nbytes, k):
    q, db = codes(nq, nbytes, 18), codes(n, nbytes, 19, high=16)  # many ties
    with _num_threads(1):
        one = cpp_topk(q, db, k)
    with _num_threads(2):
        two = cpp_topk(q, db, k)
    with _num_threads(3):
        three = cpp_topk(q, db, k)
    with _num_threads(4):
        four = cpp_topk(q, db, k)
    for other in (two, three, four):
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
    rdist, ridx = ref.hamming_topk(q, db, k)
    assert torch.equal(one[0], rdist) and torch.equal(one[1], ridx)


# ----------------------------------------------------------------------------- bad input

def u8(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call",
    [
        lambda: cpp_distance(torch.zeros(2, 4), torch.zeros(2, 4)),  # float
        lambda: cpp_distance(u8(2, 4), u8(2, 5)),  # widths differ
        lambda: cpp_distance(u8(4), u8(2, 4)),  # 1-D
        lambda: cpp_distance(u8(2, 4).int(), u8(2, 4).int()),
        lambda: cpp_topk(u8(2, 4), u8(3, 4), 0),
        lambda: cpp_topk(u8(2, 4), u8(3, 4), -3),
        lambda: cpp_topk(u8(2, 4), u8(3, 2), 1),
        lambda: cpp_topk(u8(2, 4).bool(), u8(3, 4).bool(), 1),
        lambda: cpp_topk(u8(2, 2, 4), u8(3, 4), 1),  # 3-D
    ],
)
def test_bad_input_raises_runtime_error(call):
    with pytest.raises(RuntimeError, match="subkern"):
        call()


# ----------------------------------------------------------------------------- FAISS

def test_distances_equal_faiss():
    faiss = pytest.importorskip("faiss")
    q, db = codes(20, 32, 20), codes(3000, 32, 21)
    index = faiss.IndexBinaryFlat(256)
    index.add(db.numpy())
    fdist, _ = index.search(q.numpy(), 50)
    dist, _ = cpp_topk(q, db, 50)
    assert np.array_equal(dist.numpy(), fdist)


# ----------------------------------------------------------------------------- fuzz

@settings(max_examples=60, deadline=None)
@given(
    nq=st.integers(0, 6),
    n=st.integers(0, 80),
    nbytes=st.integers(1, 20),
    k=st.integers(1, 90),
    high=st.sampled_from([2, 4, 256]),
    seed=st.integers(0, 2**31 - 1),
    level=st.sampled_from(ISAS),
)
def test_fuzz_against_reference(nq, n, nbytes, k, high, seed, level):
    try:
        _C.set_cpu_isa(level)
    except RuntimeError:
        _C.set_cpu_isa("auto")
    try:
        q, db = codes(nq, nbytes, seed, high), codes(n, nbytes, seed + 1, high)
        assert torch.equal(cpp_distance(q, db), ref.hamming_distance(q, db))
        assert_topk_equal(q, db, k)
    finally:
        _C.set_cpu_isa("auto")


# ----------------------------------------------------------------------------- 64-bit indices

@pytest.mark.slow
def test_topk_database_past_2_pow_31():
    # 2**31 + 1000 one-byte codes (2 GiB): the matches sit past index 2**31.
    n = 2**31 + 1000
    db = torch.zeros((n, 1), dtype=torch.uint8)
    db[2**31 + 5] = 0xFF
    db[n - 1] = 0xFE
    q = torch.full((1, 1), 0xFF, dtype=torch.uint8)
    dist, idx = cpp_topk(q, db, 3)
    assert dist.tolist() == [[0, 1, 8]]
    assert idx.tolist() == [[2**31 + 5, n - 1, 0]]
