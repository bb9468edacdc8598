"""The CUDA and Triton Hamming kernels on a GPU against the torch reference (run on CPU).

Marked ``gpu``: skipped cleanly where there is no CUDA device (conftest). The ``cuda`` backend
needs ``subkern._C`` built with its CUDA kernels; without them its tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch

import subkern
from subkern import _ext
from subkern.backend import BackendUnavailableError
from subkern.ops import binary
from subkern.ops import binary_reference as ref

pytestmark = pytest.mark.gpu

INT32_MAX = 2**31 - 1
WIDTHS = (1, 3, 5, 8, 12, 24, 32, 70, 128, 512)  # bytes: 1-, 4- and 8-byte word paths


def _backend_skip_reason(name: str) -> str | None:
    if name == "cuda" and not _ext.has_cuda_kernels():
        return f"subkern._C has no CUDA kernels: {_ext.load_error() or 'built without CUDA'}"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    return None


@pytest.fixture(params=["cuda", "triton"])
def backend(request) -> str:
    why = _backend_skip_reason(request.param)
    if why is not None:
        pytest.skip(why)
    return request.param


def codes(n: int, nbytes: int, seed: int, high: int = 256, device: str = "cuda") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, nbytes), dtype=torch.uint8, generator=gen).to(device)


def gpu_topk(backend: str, q: torch.Tensor, db: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    with subkern.use_backend(backend):
        dist, idx = subkern.hamming_topk(q, db, k)
    torch.cuda.synchronize()
    assert dist.device == q.device and idx.device == q.device
    assert dist.dtype == torch.int32 and idx.dtype == torch.int64
    assert dist.shape == idx.shape == (q.shape[0], k)
    return dist, idx


def assert_topk_matches(backend: str, q: torch.Tensor, db: torch.Tensor, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    dist, idx = gpu_topk(backend, q, db, k)
    rdist, ridx = ref.hamming_topk(q.cpu().contiguous(), db.cpu().contiguous(), k)
    assert torch.equal(dist.cpu(), rdist)
    assert torch.equal(idx.cpu(), ridx)
    return dist, idx


@pytest.mark.parametrize("nbytes", WIDTHS)
def test_distance_matches_reference(backend, nbytes):
    a, b = codes(7, nbytes, seed=nbytes), codes(1000, nbytes, seed=nbytes + 1)
    with subkern.use_backend(backend):
        out = subkern.hamming_distance(a, b)
    assert out.dtype == torch.int32 and out.shape == (7, 1000) and out.is_cuda
    assert torch.equal(out.cpu(), ref.hamming_distance(a.cpu(), b.cpu()))


@pytest.mark.parametrize("na,nb", [(1, 1), (1, 5), (65, 63), (129, 700), (300, 1)])
def test_distance_ragged_tiles(backend, na, nb):
    a, b = codes(na, 8, seed=na), codes(nb, 8, seed=nb + 7)
    with subkern.use_backend(backend):
        out = subkern.hamming_distance(a, b)
    assert torch.equal(out.cpu(), ref.hamming_distance(a.cpu(), b.cpu()))


# (width, k) pairs rather than their product: every new pair compiles and autotunes Triton kernels.
@pytest.mark.parametrize("nbytes,k", [(1, 1), (3, 10), (5, 100), (8, 1), (8, 10), (8, 100),
                                      (12, 10), (24, 100), (32, 10), (70, 10), (128, 1),
                                      (128, 100), (512, 10), (3, 2048), (8, 2048), (128, 2048)])
def test_topk_matches_reference(backend, nbytes, k):
    q, db = codes(33, nbytes, seed=3 * nbytes + k), codes(3001, nbytes, seed=5 * nbytes + k)
    assert_topk_matches(backend, q, db, k)


@pytest.mark.parametrize("nq,n,k", [(1, 1, 1), (5, 123, 10), (2, 7, 20), (1, 2047, 2048),
                                    (17, 2049, 2048), (300, 5000, 5), (1, 100_000, 64)])
def test_topk_ragged_shapes(backend, nq, n, k):
    q, db = codes(nq, 8, seed=nq), codes(n, 8, seed=n)
    dist, idx = assert_topk_matches(backend, q, db, k)
    if k > n:
        assert dist[:, n:].eq(INT32_MAX).all() and idx[:, n:].eq(-1).all()


def test_topk_duplicated_codes_lowest_indices_first(backend):
    base = codes(3, 8, seed=1)
    db = base.repeat(20_000, 1)  # row r holds base[r % 3]: 20 000 exact copies of each code
    q = base[[2, 0]]
    dist, idx = assert_topk_matches(backend, q, db, 2048)
    assert dist[:, :2048].eq(0).all()
    assert torch.equal(idx[0].cpu(), torch.arange(2, 3 * 2048, 3))


def test_topk_all_zero_codes(backend):
    q = torch.zeros((4, 8), dtype=torch.uint8, device="cuda")
    db = torch.zeros((50_000, 8), dtype=torch.uint8, device="cuda")
    dist, idx = gpu_topk(backend, q, db, 2048)
    assert dist.eq(0).all()
    assert torch.equal(idx.cpu(), torch.arange(2048).expand(4, 2048))


@pytest.mark.parametrize("k", [7, 2048])
def test_topk_low_entropy_ties_across_the_database(backend, k):
    # bytes 0 or 1, distances 0..8: the k-th distance is shared by many codes in every slice
    q, db = codes(9, 8, seed=4, high=2), codes(200_000, 8, seed=5, high=2)
    assert_topk_matches(backend, q, db, k)


def test_topk_empty_inputs(backend):
    empty, some = codes(0, 8, seed=0), codes(5, 8, seed=1)
    dist, idx = gpu_topk(backend, empty, some, 3)
    assert dist.shape == (0, 3)
    dist, idx = gpu_topk(backend, some, empty, 3)
    assert dist.eq(INT32_MAX).all() and idx.eq(-1).all()
    with subkern.use_backend(backend):
        assert subkern.hamming_distance(empty, some).shape == (0, 5)
        assert subkern.hamming_distance(some, empty).shape == (5, 0)


def test_unaligned_and_non_contiguous_inputs(backend):
    flat = codes(1, 8 * 500 + 3, seed=8).reshape(-1)
    odd = flat[3:].view(500, 8)  # storage offset 3: byte words
    four = flat[4:4 + 8 * 400].view(400, 8)  # offset 4: 32-bit words only
    strided = codes(800, 16, seed=9)[::2, 4:12]  # non-contiguous
    q = codes(6, 8, seed=10)
    for db in (odd, four, strided):
        assert_topk_matches(backend, q, db, 33)
        with subkern.use_backend(backend):
            d = subkern.hamming_distance(q, db)
        assert torch.equal(d.cpu(), ref.hamming_distance(q.cpu(), db.cpu().contiguous()))


def test_topk_on_a_side_stream(backend):
    q, db = codes(8, 32, seed=11), codes(20_000, 32, seed=12)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # q and db were written on the default one
    with torch.cuda.stream(stream):
        with subkern.use_backend(backend):
            dist, idx = subkern.hamming_topk(q, db, 10)
    stream.synchronize()
    rdist, ridx = ref.hamming_topk(q.cpu(), db.cpu(), 10)
    assert torch.equal(dist.cpu(), rdist) and torch.equal(idx.cpu(), ridx)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(backend):
    q, db = codes(3, 8, seed=13, device="cuda:1"), codes(5000, 8, seed=14, device="cuda:1")
    dist, idx = assert_topk_matches(backend, q, db, 10)
    assert dist.device == torch.device("cuda:1")


@pytest.fixture(scope="module")
def big_database():
    """1e6 codes of 8 bytes and 16 queries, with the reference top-100 computed on the CPU."""
    q, db = codes(16, 8, seed=100, device="cpu"), codes(1_000_000, 8, seed=101, device="cpu")
    return q, db, ref.hamming_topk(q, db, 100)


def test_big_database(backend, big_database):
    q, db, (rdist, ridx) = big_database
    dist, idx = gpu_topk(backend, q.cuda(), db.cuda(), 100)
    assert torch.equal(dist.cpu(), rdist) and torch.equal(idx.cpu(), ridx)


@pytest.mark.slow
def test_topk_index_past_2_31(backend):
    n = 2**31 + 64
    try:
        db = torch.zeros((n, 1), dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("needs 2 GiB of free GPU memory")
    far = 2**31 + 5
    db[far] = 0xFF
    db[far + 2] = 0xFF
    db[3] = 0xFE
    q = torch.full((1, 1), 0xFF, dtype=torch.uint8, device="cuda")
    dist, idx = gpu_topk(backend, q, db, 4)
    assert dist.tolist() == [[0, 0, 1, 8]]
    assert idx.tolist() == [[far, far + 2, 3, 0]]


def test_k_above_gpu_limit(backend):
    q, db = codes(2, 8, seed=15), codes(3000, 8, seed=16)
    with subkern.use_backend(backend), pytest.raises(BackendUnavailableError):
        subkern.hamming_topk(q, db, binary.MAX_GPU_K + 1)
    # auto falls back to the reference for large k
    dist, idx = subkern.hamming_topk(q, db, binary.MAX_GPU_K + 1)
    rdist, ridx = ref.hamming_topk(q.cpu(), db.cpu(), binary.MAX_GPU_K + 1)
    assert torch.equal(dist.cpu(), rdist) and torch.equal(idx.cpu(), ridx)


def test_dispatcher_ops_on_cuda_tensors():
    """torch.ops.subkern.* on CUDA tensors: the C++ CUDA kernels, or the Triton fallback."""
    if _backend_skip_reason("cuda") and _backend_skip_reason("triton"):
        pytest.skip("neither the CUDA kernels nor triton are available")
    q, db = codes(4, 12, seed=17), codes(2500, 12, seed=18)
    dist, idx = torch.ops.subkern.hamming_topk(q, db, 16)
    rdist, ridx = ref.hamming_topk(q.cpu(), db.cpu(), 16)
    assert torch.equal(dist.cpu(), rdist) and torch.equal(idx.cpu(), ridx)
    d = torch.ops.subkern.hamming_distance(q, db)
    assert torch.equal(d.cpu(), ref.hamming_distance(q.cpu(), db.cpu()))


@pytest.mark.skipif(_backend_skip_reason("cuda") is not None, reason="no CUDA kernels in _C")
def test_cuda_kernel_input_checks():
    q, db = codes(2, 8, seed=19), codes(10, 8, seed=20)
    with pytest.raises(RuntimeError, match="at most k=2048"):
        torch.ops.subkern.hamming_topk(q, db, 2049)
    with pytest.raises(RuntimeError, match="same code width"):
        torch.ops.subkern.hamming_topk(q, codes(10, 4, seed=21), 3)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.subkern.hamming_distance(q.int(), db.int())
    with pytest.raises(RuntimeError, match="CUDA tensor|same device"):
        torch.ops.subkern.hamming_distance(q, db.cpu())
