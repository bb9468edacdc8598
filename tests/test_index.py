"""BinaryIndex: search / range_search against a brute-force reference, ids, removal, validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from subkern import BackendUnavailableError, use_backend
from subkern.ops import binary_reference as reference
from subkern.retrieval import MISSING_DISTANCE, MISSING_ID, BinaryIndex
from subkern.retrieval import index as index_module

WIDTHS = [1, 3, 8, 12, 24, 32, 128, 512]  # bytes
SIZES = [0, 1, 5, 123]


def cpu_backends() -> list[str]:
    """The CPU backends that can run hamming_topk in this build (reference always can)."""
    found = []
    probe = torch.zeros(2, 1, dtype=torch.uint8)
    for name in ("reference", "cpp"):
        try:
            with use_backend(name):
                BinaryIndex(8).search(probe, 1)
                index = BinaryIndex(8)
                index.add(probe)
                index.search(probe, 1)
                index.range_search(probe, 1)
        except BackendUnavailableError:
            continue
        found.append(name)
    return found


def random_codes(n: int, nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, nbytes), dtype=torch.uint8)


def brute_search(db: torch.Tensor, ids: torch.Tensor, queries: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full sort of the distance matrix by (distance, position), padded with missing slots."""
    nq, n = queries.shape[0], db.shape[0]
    out_d = torch.full((nq, k), MISSING_DISTANCE, dtype=torch.int32)
    out_i = torch.full((nq, k), MISSING_ID, dtype=torch.int64)
    if n and nq:
        dist = reference.hamming_distance(queries.contiguous(), db.contiguous())
        sorted_d, pos = torch.sort(dist, dim=1, stable=True)
        m = min(k, n)
        out_d[:, :m] = sorted_d[:, :m]
        out_i[:, :m] = ids[pos[:, :m]]
    return out_d, out_i


def brute_range(db: torch.Tensor, ids: torch.Tensor, queries: torch.Tensor, radius: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lims, dists, found = [0], [], []
    dist = (reference.hamming_distance(queries.contiguous(), db.contiguous())
            if db.shape[0] and queries.shape[0] else torch.empty(queries.shape[0], 0))
    for row in dist:
        hits = [(int(d), p) for p, d in enumerate(row.tolist()) if d < radius]
        hits.sort()
        dists += [d for d, _ in hits]
        found += [int(ids[p]) for _, p in hits]
        lims.append(len(dists))
    return (torch.tensor(lims, dtype=torch.int64), torch.tensor(dists, dtype=torch.int32),
            torch.tensor(found, dtype=torch.int64))


def build(db: torch.Tensor, pieces: int = 3, nbits: int | None = None) -> BinaryIndex:
    index = BinaryIndex(nbits if nbits is not None else 8 * db.shape[1])
    for chunk in torch.tensor_split(db, pieces):
        index.add(chunk)
    return index


# --------------------------------------------------------------------------------------------
# Construction and validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", [8, 24, 256, 4096])
def test_valid_nbits(nbits):
    index = BinaryIndex(nbits)
    assert (index.nbits, index.code_size, index.ntotal, len(index)) == (nbits, nbits // 8, 0, 0)
    assert index.device == torch.device("cpu")
    assert index.codes.shape == (0, nbits // 8) and index.ids.shape == (0,)


@pytest.mark.parametrize("nbits, error", [(0, ValueError), (7, ValueError), (-8, ValueError),
                                          (4104, ValueError), (12, ValueError),
                                          (8.0, TypeError), (True, TypeError), ("8", TypeError)])
def test_invalid_nbits(nbits, error):
    with pytest.raises(error, match="nbits"):
        BinaryIndex(nbits)


def test_bad_codes_and_queries_name_the_argument():
    index = BinaryIndex(32)
    index.add(random_codes(4, 4))
    bad = [
        (torch.zeros(2, 4, dtype=torch.float32), TypeError, "uint8"),
        (torch.zeros(2, 4, dtype=torch.int8), TypeError, "uint8"),
        (torch.zeros(2, 3, dtype=torch.uint8), ValueError, r"\[n, 4\]"),
        (torch.zeros(4, dtype=torch.uint8), ValueError, "unsqueeze"),
        (torch.zeros(1, 2, 4, dtype=torch.uint8), ValueError, "shape"),
        ([[0, 0, 0, 0]], TypeError, "torch.Tensor"),
        (torch.zeros(2, 4, dtype=torch.uint8, device="meta"), ValueError, "device"),
    ]
    for value, error, pattern in bad:
        with pytest.raises(error, match=pattern) as info:
            index.add(value)
        assert "codes" in str(info.value)
        with pytest.raises(error, match=pattern) as info:
            index.search(value, 1)
        assert "queries" in str(info.value)
        with pytest.raises(error, match=pattern):
            index.range_search(value, 3)
    assert index.ntotal == 4  # nothing was added by the failed calls
    for k, error in [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="k must"):
            index.search(random_codes(1, 4), k)
    with pytest.raises(TypeError, match="radius"):
        index.range_search(random_codes(1, 4), 2.5)


def test_bad_ids():
    index = BinaryIndex(16)
    codes = random_codes(3, 2)
    cases = [
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integers"),
        (torch.tensor([True, False, True]), TypeError, "integers"),
        (torch.tensor([[0, 1, 2]]), ValueError, "1-D"),
        (torch.tensor([0, 1]), ValueError, "one id per code"),
        (torch.tensor([0, 1, 1]), ValueError, "unique"),
        (torch.tensor([0, -1, 2]), ValueError, "non-negative"),
        ("abc", TypeError, "ids"),
        (torch.tensor([0, 1, 2], device="meta"), ValueError, "device"),
    ]
    for ids, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            index.add(codes, ids=ids)
    assert index.ntotal == 0 and index.next_id == 0
    index.add(codes, ids=[10, 11, 12])
    with pytest.raises(ValueError, match="in the index: id 11 is already present"):
        index.add(codes, ids=torch.tensor([20, 11, 21]))
    with pytest.raises(TypeError, match="integers"):
        index.remove_ids(torch.tensor([1.5]))
    assert index.ids.tolist() == [10, 11, 12]


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", WIDTHS)
@pytest.mark.parametrize("n", SIZES)
def test_search_matches_reference(nbytes, n):
    db = random_codes(n, nbytes)
    if n > 3:
        db[n // 2] = db[1]  # exact duplicates: ties broken by insertion order
        db[n - 1] = db[1]
    index = build(db)
    assert index.ntotal == n and torch.equal(index.codes, db)
    assert torch.equal(index.ids, torch.arange(n))
    # non-contiguous queries: every second column of a wider tensor, plus database rows
    wide = random_codes(5, 2 * nbytes)[:, ::2]
    queries = torch.cat([wide, db[:2]]) if n else wide
    assert not wide.is_contiguous()
    for k in sorted({1, 7, n + 3}):
        got = index.search(wide, k)
        want = brute_search(db, index.ids, wide, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        got = index.search(queries, k)
        want = brute_search(db, index.ids, queries, k)
        assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64
        assert got[0].shape == (queries.shape[0], k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_search_ties_by_insertion_order():
    # all-zero codes interleaved with duplicates of one random code: massive ties
    zero = torch.zeros(40, 16, dtype=torch.uint8)
    other = random_codes(1, 16).repeat(40, 1)
    db = torch.stack([zero, other], dim=1).reshape(80, 16)
    index = BinaryIndex(128)
    index.add(db, ids=torch.arange(1000, 1080))
    backends = cpu_backends()
    assert "reference" in backends
    for backend in backends:
        with use_backend(backend):
            d, ids = index.search(torch.zeros(2, 16, dtype=torch.uint8), 45)
        assert torch.equal(d[:, :40], torch.zeros(2, 40, dtype=torch.int32)), backend
        assert ids[0, :40].tolist() == list(range(1000, 1080, 2)), backend
        assert ids[0, 40:].tolist() == list(range(1001, 1011, 2)), backend
        assert torch.equal(ids[0], ids[1]), backend


def test_backends_agree():
    db = random_codes(300, 12)
    db[::7] = db[3]
    index = build(db, pieces=4)
    queries = torch.cat([random_codes(9, 12), db[3:4]])
    want = brute_search(db, index.ids, queries, 20)
    want_range = brute_range(db, index.ids, queries, 40)
    for backend in cpu_backends():
        with use_backend(backend):
            got = index.search(queries, 20)
            got_range = index.range_search(queries, 40)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), backend
        assert all(torch.equal(g, w) for g, w in zip(got_range, want_range, strict=True)), backend


def test_empty_index_and_empty_queries():
    index = BinaryIndex(64)
    d, ids = index.search(random_codes(3, 8), 4)
    assert torch.equal(d, torch.full((3, 4), MISSING_DISTANCE, dtype=torch.int32))
    assert torch.equal(ids, torch.full((3, 4), MISSING_ID, dtype=torch.int64))
    index.add(random_codes(5, 8))
    d, ids = index.search(random_codes(0, 8), 3)
    assert d.shape == (0, 3) and ids.shape == (0, 3)
    lims, dd, ii = index.range_search(random_codes(0, 8), 10)
    assert lims.tolist() == [0] and dd.numel() == 0 and ii.numel() == 0
    index.add(random_codes(0, 8))
    assert index.ntotal == 5 and index.next_id == 5


def test_k_larger_than_ntotal_and_large_k():
    db = random_codes(6, 4)
    index = build(db, pieces=2)
    d, ids = index.search(db, 5000)
    assert d.shape == (6, 5000)
    assert bool((d[:, 6:] == MISSING_DISTANCE).all()) and bool((ids[:, 6:] == MISSING_ID).all())
    assert sorted(ids[0, :6].tolist()) == list(range(6))
    want = brute_search(db, index.ids, db, 5000)
    assert torch.equal(d, want[0]) and torch.equal(ids, want[1])


def test_matches_faiss_distances():
    faiss = pytest.importorskip("faiss")
    db = random_codes(500, 8)
    queries = random_codes(13, 8)
    ours = build(db)
    theirs = faiss.IndexBinaryFlat(64)
    theirs.add(db.numpy())
    d_ours, _ = ours.search(queries, 10)
    d_theirs, _ = theirs.search(queries.numpy(), 10)
    assert torch.equal(d_ours, torch.from_numpy(d_theirs).to(torch.int32))
    lims_t, dist_t, ids_t = theirs.range_search(queries.numpy(), 26)
    lims_o, dist_o, ids_o = ours.range_search(queries, 26)
    assert lims_o.tolist() == lims_t.tolist()
    for q in range(13):
        a, b = int(lims_o[q]), int(lims_o[q + 1])
        ours_q = sorted(zip(dist_o[a:b].tolist(), ids_o[a:b].tolist(), strict=True))
        theirs_q = sorted(zip(dist_t[a:b].tolist(), ids_t[a:b].tolist(), strict=True))
        assert ours_q == theirs_q


# --------------------------------------------------------------------------------------------
# range_search
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [1, 3, 12, 32])
@pytest.mark.parametrize("n", [0, 1, 5, 123])
def test_range_search_matches_reference(nbytes, n):
    db = random_codes(n, nbytes)
    if n > 3:
        db[n - 2] = db[0]
    index = build(db)
    queries = torch.cat([random_codes(4, nbytes), db[:1]]) if n else random_codes(4, nbytes)
    nbits = 8 * nbytes
    for radius in sorted({-3, 0, 1, nbits // 2, nbits // 2 + 2, nbits, nbits + 1, 10**12}):
        got = index.range_search(queries, radius)
        want = brute_range(db, index.ids, queries, radius)
        assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32
        assert got[2].dtype == torch.int64
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), radius


def test_range_search_blocks(monkeypatch):
    """Tiny blocks (many database and query blocks) give the same answer as one block."""
    db = random_codes(97, 3)
    db[50:60] = db[5]
    index = build(db)
    queries = torch.cat([random_codes(11, 3), db[5:6]])
    whole = index.range_search(queries, 11)
    monkeypatch.setattr(index_module, "_RANGE_BLOCK_ELEMENTS", 7)
    blocked = index.range_search(queries, 11)
    want = brute_range(db, index.ids, queries, 11)
    for a, b, c in zip(whole, blocked, want, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


# --------------------------------------------------------------------------------------------
# ids, removal, reset, growth
# --------------------------------------------------------------------------------------------

def test_default_and_explicit_ids():
    index = BinaryIndex(16)
    index.add(random_codes(3, 2))
    index.add(random_codes(2, 2), ids=torch.tensor([100, 50], dtype=torch.int32))
    index.add(random_codes(2, 2))
    assert index.ids.tolist() == [0, 1, 2, 100, 50, 101, 102]
    index.add(random_codes(2, 2), ids=[7, 3])  # below next_id but not present
    assert index.ids.tolist()[-2:] == [7, 3] and index.next_id == 103
    assert index.ids.dtype == torch.int64


def test_remove_ids_keeps_order_and_never_reuses_ids():
    db = random_codes(50, 4)
    db[10:20] = db[0]
    index = build(db)
    removed = index.remove_ids(torch.tensor([3, 0, 11, 999, 3]))
    assert removed == 3
    keep = [i for i in range(50) if i not in (0, 3, 11)]
    assert index.ids.tolist() == keep
    assert torch.equal(index.codes, db[keep])
    queries = torch.cat([db[:2], random_codes(3, 4)])
    got = index.search(queries, 60)
    want = brute_search(db[keep], torch.tensor(keep), queries, 60)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = index.range_search(queries, 12)
    want = brute_range(db[keep], torch.tensor(keep), queries, 12)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert index.remove_ids([]) == 0 and index.remove_ids([1234]) == 0
    index.add(random_codes(1, 4))
    assert index.ids[-1].item() == 50  # the counter never goes back
    assert index.remove_ids(index.ids.clone()) == 48 and index.ntotal == 0
    d, ids = index.search(queries, 2)
    assert bool((ids == MISSING_ID).all()) and bool((d == MISSING_DISTANCE).all())


def test_reset():
    index = build(random_codes(20, 8))
    index.reset()
    assert index.ntotal == 0 and index.codes.shape == (0, 8) and index.next_id == 20
    index.add(random_codes(2, 8))
    assert index.ids.tolist() == [20, 21]


def test_add_is_amortised(monkeypatch):
    reallocations = []
    original = BinaryIndex._own_buffers

    def counting(self, capacity):
        reallocations.append(capacity)
        original(self, capacity)

    monkeypatch.setattr(BinaryIndex, "_own_buffers", counting)
    db = random_codes(3000, 2)
    index = BinaryIndex(16)
    for row in range(3000):
        index.add(db[row: row + 1])
    assert len(reallocations) <= 8  # 64, 128, ..., 4096: doubling, not one copy per add
    assert all(b >= 2 * a for a, b in itertools.pairwise(reallocations))
    assert torch.equal(index.codes, db) and torch.equal(index.ids, torch.arange(3000))


def test_views_repr_and_to():
    db = random_codes(7, 3)
    index = build(db)
    assert torch.equal(index.codes, db) and index.codes.shape == (7, 3)
    assert "nbits=24" in repr(index) and "ntotal=7" in repr(index)
    assert index.to("cpu") is index
    moved = index.to("meta")  # another device without a GPU: a new index, original unchanged
    assert moved is not index and moved.device.type == "meta"
    assert moved.ntotal == 7 and moved.next_id == 7 and moved.codes.device.type == "meta"
    assert index.device.type == "cpu" and torch.equal(index.codes, db)


@pytest.mark.gpu
def test_cuda_index_matches_cpu():
    db = random_codes(1000, 32)
    db[::9] = db[4]
    cpu = build(db)
    gpu = cpu.to("cuda")
    assert gpu is not cpu and gpu.device.type == "cuda"
    queries = torch.cat([random_codes(20, 32), db[4:5]])
    for k in (1, 10, 1500):
        d_c, i_c = cpu.search(queries, k)
        d_g, i_g = gpu.search(queries.cuda(), k)
        assert torch.equal(d_c, d_g.cpu()) and torch.equal(i_c, i_g.cpu())
    pairs = zip(gpu.range_search(queries.cuda(), 120), cpu.range_search(queries, 120), strict=True)
    for got, want in pairs:
        assert torch.equal(got.cpu(), want)
    gpu.remove_ids(torch.arange(0, 1000, 3))
    cpu.remove_ids(torch.arange(0, 1000, 3))
    gpu.add(db[:5].cuda())
    cpu.add(db[:5])
    assert torch.equal(gpu.search(queries.cuda(), 50)[1].cpu(), cpu.search(queries, 50)[1])
