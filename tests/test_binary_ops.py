"""The public binary-code API: packing, input checks, reference semantics, dispatcher use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import subkern
from subkern.ops import binary_reference as ref

INT32_MAX = 2**31 - 1


def random_codes(n: int, nbytes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=gen)


def brute_force_topk(q: torch.Tensor, db: torch.Tensor, k: int):
    """Independent oracle through numpy: full distance matrix + stable sort."""
    qa, da = q.numpy(), db.numpy()
    bits = np.unpackbits(qa[:, None, :] ^ da[None, :, :], axis=-1).sum(-1).astype(np.int64)
    nq, n = bits.shape
    dist = np.full((nq, k), INT32_MAX, dtype=np.int64)
    idx = np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        order = np.lexsort((np.arange(n), bits[i]))[:k]
        dist[i, : len(order)] = bits[i, order]
        idx[i, : len(order)] = order
    return dist, idx


# ----------------------------------------------------------------------------- packing

def test_pack_bits_matches_faiss_bit_order():
    bits = torch.zeros(2, 16, dtype=torch.bool)
    bits[0, 0] = True  # bit 0 -> byte 0, value 1
    bits[0, 9] = True  # bit 9 -> byte 1, value 2
    bits[1, 7] = True  # bit 7 -> byte 0, value 128
    assert subkern.pack_bits(bits).tolist() == [[1, 2], [128, 0]]


@pytest.mark.parametrize("nbits", [1, 7, 8, 9, 63, 64, 65, 200, 4096])
def test_pack_unpack_round_trip(nbits):
    bits = torch.rand(5, nbits) > 0.5
    codes = subkern.pack_bits(bits)
    assert codes.dtype == torch.uint8 and codes.shape == (5, (nbits + 7) // 8)
    assert torch.equal(subkern.unpack_bits(codes, nbits), bits)
    if nbits % 8:  # unused high bits are zero
        assert int(codes[:, -1].max()) < (1 << (nbits % 8))


def test_pack_bits_accepts_pm1_and_01_and_batches():
    signs = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    zero_one = (signs > 0).to(torch.int64)
    assert torch.equal(subkern.pack_bits(signs), subkern.pack_bits(zero_one))
    assert subkern.pack_bits(signs).tolist() == [[0b00011001, 1]]
    batched = torch.rand(3, 4, 24) > 0.5
    assert subkern.pack_bits(batched).shape == (3, 4, 3)


def test_pack_bits_matches_numpy_little_bitorder():
    bits = torch.rand(11, 40) > 0.3
    expected = np.packbits(bits.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(subkern.pack_bits(bits).numpy(), expected)


def test_pack_bits_rejects_bad_values():
    with pytest.raises(ValueError, match="0/1"):
        subkern.pack_bits(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        subkern.pack_bits([[0, 1]])
    with pytest.raises(ValueError, match="nbits"):
        subkern.unpack_bits(torch.zeros(2, 1, dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="uint8"):
        subkern.unpack_bits(torch.zeros(2, 1, dtype=torch.int32))


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("nbytes", [1, 3, 8, 13, 128])
def test_reference_distance_matches_numpy(nbytes):
    a, b = random_codes(17, nbytes, 1), random_codes(29, nbytes, 2)
    expected = np.unpackbits(a.numpy()[:, None] ^ b.numpy()[None], axis=-1).sum(-1)
    got = ref.hamming_distance(a, b)
    assert got.dtype == torch.int32
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("n,k", [(1, 1), (50, 7), (5, 9), (300, 300), (257, 64)])
def test_reference_topk_matches_brute_force(n, k):
    q, db = random_codes(13, 4, 3), random_codes(n, 4, 4)
    db[n // 2:] = db[: n - n // 2].clone()  # duplicates: ties must resolve to the lower index
    dist, idx = ref.hamming_topk(q, db, k)
    exp_d, exp_i = brute_force_topk(q, db, k)
    assert np.array_equal(dist.numpy(), exp_d) and np.array_equal(idx.numpy(), exp_i)


def test_reference_topk_chunks_without_full_matrix(monkeypatch):
    monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 64)  # force many tiny chunks
    q, db = random_codes(9, 5, 5), random_codes(333, 5, 6)
    dist, idx = ref.hamming_topk(q, db, 17)
    exp_d, exp_i = brute_force_topk(q, db, 17)
    assert np.array_equal(dist.numpy(), exp_d) and np.array_equal(idx.numpy(), exp_i)


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(0, 6), n=st.integers(0, 40), nbytes=st.integers(1, 9),
       k=st.integers(1, 50), alphabet=st.integers(1, 255), seed=st.integers(0, 2**16))
def test_public_topk_property(nq, n, nbytes, k, alphabet, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, alphabet + 1, (nq, nbytes), dtype=torch.uint8, generator=gen)
    db = torch.randint(0, alphabet + 1, (n, nbytes), dtype=torch.uint8, generator=gen)
    dist, idx = subkern.hamming_topk(q, db, k)
    exp_d, exp_i = brute_force_topk(q, db, k) if nq else (np.zeros((0, k)), np.zeros((0, k)))
    assert dist.shape == (nq, k) and idx.shape == (nq, k)
    assert np.array_equal(dist.numpy(), exp_d) and np.array_equal(idx.numpy(), exp_i)


# ----------------------------------------------------------------------------- public API checks

def test_missing_slots_and_empty_inputs():
    db = random_codes(3, 8)
    dist, idx = subkern.hamming_topk(db, db, 5)
    assert (dist[:, 3:] == INT32_MAX).all() and (idx[:, 3:] == -1).all()
    assert (dist[:, 0] == 0).all()
    empty_db = torch.empty(0, 8, dtype=torch.uint8)
    dist, idx = subkern.hamming_topk(db, empty_db, 2)
    assert (dist == INT32_MAX).all() and (idx == -1).all()
    dist, idx = subkern.hamming_topk(empty_db, db, 2)
    assert dist.shape == (0, 2) and idx.shape == (0, 2)
    assert subkern.hamming_distance(empty_db, db).shape == (0, 3)


def test_non_contiguous_inputs_give_correct_results():
    base = random_codes(40, 16, 7)
    q = base[::3, ::2]  # strided rows and columns: 8-byte codes
    db = random_codes(64, 16, 8)[:, 1::2]
    assert not q.is_contiguous() and not db.is_contiguous()
    dist, idx = subkern.hamming_topk(q, db, 5)
    exp_d, exp_i = brute_force_topk(q.contiguous(), db.contiguous(), 5)
    assert np.array_equal(dist.numpy(), exp_d) and np.array_equal(idx.numpy(), exp_i)
    assert torch.equal(subkern.hamming_distance(q, db),
                       ref.hamming_distance(q.contiguous(), db.contiguous()))


@pytest.mark.parametrize(
    "queries,database,k,error,match",
    [
        (torch.zeros(2, 8), torch.zeros(3, 8, dtype=torch.uint8), 1, TypeError, "queries.*uint8"),
        (torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.int64), 1, TypeError,
         "database.*uint8"),
        (torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.uint8), 1, ValueError,
         "same code width"),
        (torch.zeros(8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8), 1, ValueError,
         "queries must be 2-D"),
        (torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8), 0, ValueError,
         "k must be a positive"),
        (torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8), -3,
         ValueError, "k must be a positive"),
        (torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8), 2.0,
         TypeError, "k must be a positive int"),
        (torch.zeros(2, 0, dtype=torch.uint8), torch.zeros(3, 0, dtype=torch.uint8), 1,
         ValueError, "1 to 512 bytes"),
        (torch.zeros(2, 513, dtype=torch.uint8), torch.zeros(3, 513, dtype=torch.uint8), 1,
         ValueError, "1 to 512 bytes"),
        ("codes", torch.zeros(3, 8, dtype=torch.uint8), 1, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_errors(queries, database, k, error, match):
    with pytest.raises(error, match=match):
        subkern.hamming_topk(queries, database, k)


def test_device_mismatch_is_refused():
    meta = torch.empty(3, 8, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        subkern.hamming_topk(torch.zeros(2, 8, dtype=torch.uint8), meta, 1)


def test_float_codes_error_mentions_pack_bits():
    with pytest.raises(TypeError, match="pack_bits"):
        subkern.hamming_distance(torch.zeros(2, 8), torch.zeros(2, 8))


# ----------------------------------------------------------------------------- dispatcher

def test_opcheck_both_ops():
    q, db = random_codes(7, 12, 9), random_codes(33, 12, 10)
    torch.library.opcheck(torch.ops.subkern.hamming_distance.default, (q, db))
    torch.library.opcheck(torch.ops.subkern.hamming_topk.default, (q, db, 5))
    torch.library.opcheck(torch.ops.subkern.hamming_topk.default, (q, db[:3], 5))


def test_torch_compile_fullgraph_and_export():
    q, db = random_codes(6, 8, 11), random_codes(40, 8, 12)

    def search(qq, dd):
        dist, idx = subkern.hamming_topk(qq, dd, 4)
        return dist.float().mean(dim=1), idx

    compiled = torch.compile(search, fullgraph=True, backend="aot_eager")
    got_mean, got_idx = compiled(q, db)
    exp_mean, exp_idx = search(q, db)
    assert torch.equal(got_idx, exp_idx) and torch.allclose(got_mean, exp_mean)

    class Search(torch.nn.Module):
        def forward(self, qq, dd):
            return torch.ops.subkern.hamming_topk(qq, dd, 3)

    exported = torch.export.export(Search(), (q, db))
    assert any("hamming_topk" in str(node.target) for node in exported.graph.nodes)
    for got, exp in zip(exported.module()(q, db), Search()(q, db), strict=True):
        assert torch.equal(got, exp)


def test_every_available_cpu_backend_agrees():
    q, db = random_codes(21, 24, 13), random_codes(500, 24, 14)
    db[250:] = db[:250].clone()
    expected = ref.hamming_topk(q, db, 12)
    for name in ("reference", "cpp", "triton"):
        if subkern.backend.unavailable_reason(name, q.device) is not None:
            continue
        with subkern.use_backend(name):
            got = subkern.hamming_topk(q, db, 12)
            dist = subkern.hamming_distance(q, db)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), name
        assert torch.equal(dist, ref.hamming_distance(q, db)), name
