"""The Triton Hamming kernels (``subkern.kernels.hamming``) against the torch reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``); on a CUDA machine the same tests run the compiled kernels on the GPU.
The interpreter is slow, so shapes are small but ragged. One test also compiles the kernels for
sm_80 and sm_90 (PTX and cubin, Triton's bundled ptxas), which needs no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from subkern.kernels import hamming as th  # noqa: E402

import subkern  # noqa: E402
from subkern.ops import binary_reference as ref  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if torch.cuda.is_available() and not INTERPRETED:
    DEVICE = torch.device("cuda")
elif INTERPRETED:
    DEVICE = torch.device("cpu")
else:  # pragma: no cover - conftest sets TRITON_INTERPRET=1 on machines without CUDA
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

INT32_MAX = 2**31 - 1
WIDTHS = (1, 3, 5, 8, 12, 32, 128, 512)  # bytes: byte words (1, 3, 5) and 32-bit words


def codes(n: int, nbytes: int, seed: int, high: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, nbytes), dtype=torch.uint8, generator=gen).to(DEVICE)


def assert_topk_matches(q: torch.Tensor, db: torch.Tensor, k: int, slices: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    dist, idx = th.hamming_topk(q, db, k, slices=slices)
    rdist, ridx = ref.hamming_topk(q.cpu().contiguous(), db.cpu().contiguous(), k)
    assert dist.dtype == torch.int32 and idx.dtype == torch.int64
    assert dist.shape == idx.shape == (q.shape[0], k)
    assert dist.device == q.device and idx.device == q.device
    assert torch.equal(dist.cpu(), rdist), (dist, rdist)
    assert torch.equal(idx.cpu(), ridx), (idx, ridx)
    return dist, idx


@pytest.mark.parametrize("nbytes", WIDTHS)
def test_distance_matches_reference(nbytes):
    a, b = codes(5, nbytes, seed=nbytes), codes(37, nbytes, seed=nbytes + 1)
    out = th.hamming_distance(a, b)
    assert out.dtype == torch.int32 and out.shape == (5, 37) and out.device == a.device
    assert torch.equal(out.cpu(), ref.hamming_distance(a.cpu(), b.cpu()))


@pytest.mark.parametrize("na,nb", [(1, 1), (1, 123), (17, 3), (33, 40)])
def test_distance_ragged_shapes(na, nb):
    a, b = codes(na, 12, seed=na), codes(nb, 12, seed=nb + 100)
    assert torch.equal(th.hamming_distance(a, b).cpu(), ref.hamming_distance(a.cpu(), b.cpu()))


def test_distance_extreme_bits():
    """All-ones against all-zeros: every 32-bit word has its sign bit set (negative int32)."""
    ones = torch.full((3, 12), 255, dtype=torch.uint8, device=DEVICE)
    zeros = torch.zeros((2, 12), dtype=torch.uint8, device=DEVICE)
    assert th.hamming_distance(ones, zeros).eq(96).all()
    assert th.hamming_distance(ones, ones).eq(0).all()
    alternating = torch.full((1, 4), 0xAA, dtype=torch.uint8, device=DEVICE)
    assert th.hamming_distance(alternating, zeros[:1, :4]).item() == 16


def test_distance_unaligned_storage_uses_byte_words():
    """A storage offset that is no multiple of 4 bytes cannot be viewed as int32 words."""
    flat = codes(1, 4 * 9 + 1, seed=3).reshape(-1)
    a = flat[1:].view(9, 4)  # contiguous, storage offset 1
    assert a.is_contiguous() and a.storage_offset() == 1
    b = codes(6, 4, seed=4)
    assert torch.equal(th.hamming_distance(a, b).cpu(), ref.hamming_distance(a.cpu(), b.cpu()))
    assert_topk_matches(a, b, 4)


@pytest.mark.parametrize("nbytes", WIDTHS)
@pytest.mark.parametrize("slices", [None, 3])
def test_topk_matches_reference(nbytes, slices):
    q, db = codes(5, nbytes, seed=2 * nbytes), codes(123, nbytes, seed=2 * nbytes + 1)
    assert_topk_matches(q, db, 10, slices=slices)


@pytest.mark.parametrize("nq,n,k,slices", [
    (1, 1, 1, None),
    (3, 57, 1, 4),     # k = 1 over several slices
    (6, 40, 33, None),  # query tile not full, k not a power of two
    (2, 7, 20, None),  # k > n: missing slots
    (2, 7, 20, 3),     # k > n over slices, some slices shorter than k
    (9, 200, 64, 5),
])
def test_topk_ragged(nq, n, k, slices):
    q, db = codes(nq, 8, seed=nq), codes(n, 8, seed=n)
    dist, idx = assert_topk_matches(q, db, k, slices=slices)
    if k > n:
        assert dist[:, n:].eq(INT32_MAX).all() and idx[:, n:].eq(-1).all()


@pytest.mark.parametrize("slices", [None, 4])
def test_topk_ties_take_lowest_indices(slices):
    base = codes(3, 5, seed=7)
    db = base.repeat(30, 1)  # every code appears 30 times: rows r, r + 3, r + 6, ...
    q = base[[1, 0]]
    dist, idx = assert_topk_matches(q, db, 12, slices=slices)
    assert dist[0, :10].eq(0).all()
    assert torch.equal(idx[0, :10].cpu(), torch.arange(1, 30, 3))


@pytest.mark.parametrize("slices", [None, 3])
def test_topk_all_zero_codes(slices):
    q = torch.zeros((2, 12), dtype=torch.uint8, device=DEVICE)
    db = torch.zeros((50, 12), dtype=torch.uint8, device=DEVICE)
    dist, idx = assert_topk_matches(q, db, 16, slices=slices)
    assert dist.eq(0).all()
    assert torch.equal(idx.cpu(), torch.arange(16).expand(2, 16))


def test_topk_low_entropy_many_ties():
    q, db = codes(4, 3, seed=11, high=2), codes(90, 3, seed=12, high=2)  # distances 0..3
    assert_topk_matches(q, db, 40, slices=2)


def test_topk_k_2048_tiny_input():
    q, db = codes(2, 4, seed=5), codes(50, 4, seed=6)
    dist, idx = assert_topk_matches(q, db, 2048, slices=2)
    assert idx[:, 50:].eq(-1).all() and dist[:, 50:].eq(INT32_MAX).all()


def test_empty_inputs():
    empty, some = codes(0, 8, seed=0), codes(4, 8, seed=1)
    assert th.hamming_distance(empty, some).shape == (0, 4)
    assert th.hamming_distance(some, empty).shape == (4, 0)
    dist, idx = th.hamming_topk(empty, some, 3)
    assert dist.shape == idx.shape == (0, 3)
    dist, idx = th.hamming_topk(some, empty, 3)
    assert dist.eq(INT32_MAX).all() and idx.eq(-1).all() and dist.shape == (4, 3)


def test_launcher_rejects_bad_arguments():
    q = codes(2, 8, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        th.hamming_topk(q, q, th.MAX_K + 1)
    with pytest.raises(ValueError, match="k must be"):
        th.hamming_topk(q, q, 0)
    with pytest.raises(ValueError, match="same width"):
        th.hamming_distance(q, codes(2, 4, seed=0))
    with pytest.raises(TypeError, match="uint8"):
        th.hamming_distance(q.to(torch.int32), q.to(torch.int32))


def test_public_api_triton_backend():
    q, db = codes(4, 24, seed=21), codes(70, 24, seed=22)
    with subkern.use_backend("triton"):
        dist, idx = subkern.hamming_topk(q, db, 9)
        d = subkern.hamming_distance(q, db)
    rdist, ridx = ref.hamming_topk(q.cpu(), db.cpu(), 9)
    assert torch.equal(dist.cpu(), rdist) and torch.equal(idx.cpu(), ridx)
    assert torch.equal(d.cpu(), ref.hamming_distance(q.cpu(), db.cpu()))


def test_public_api_triton_backend_non_contiguous():
    wide = codes(60, 16, seed=31)
    db = wide[::2, 3:11]  # strided rows and columns
    q = codes(8, 3, seed=32).t()  # [3, 8] transposed view
    assert not db.is_contiguous() and not q.is_contiguous()
    with subkern.use_backend("triton"):
        dist, idx = subkern.hamming_topk(q, db, 5)
        d = subkern.hamming_distance(q, db)
    rdist, ridx = ref.hamming_topk(q.cpu().contiguous(), db.cpu().contiguous(), 5)
    assert torch.equal(dist.cpu(), rdist) and torch.equal(idx.cpu(), ridx)
    assert torch.equal(d.cpu(), ref.hamming_distance(q.cpu().contiguous(), db.cpu().contiguous()))


# Compiles every kernel for sm_80 and sm_90 without a GPU (Triton's front end, LLVM and bundled
# ptxas), in a child process where TRITON_INTERPRET is unset so that @triton.jit compiles.
_AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from subkern.kernels import hamming as th

    def jit_fn(kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn  # through @autotune and @heuristics
        return kernel

    def build(kernel, types, consts, arch, num_warps):
        fn = jit_fn(kernel)
        sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
        out = triton.compile(ASTSource(fn, sig, constexprs=consts),
                             target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert out.asm["cubin"], "no cubin"
        assert "popc" in out.asm["ptx"] or kernel is th._merge_kernel, "no hardware popcount"

    def log2(x):
        return x.bit_length() - 1

    # the largest sort network (k = 2048) once; the small cases for both architectures
    topk_cases = {80: [(4, 2, 16, 16, 128, False)],
                  90: [(4, 2, 16, 16, 128, False), (1, 3, 2048, 1, 2048, True)]}
    for arch in (80, 90):
        for wb, nwords, kp, tq, tn, direct in topk_cases[arch]:
            word = "*i32" if wb == 4 else "*u8"
            types = dict(q_ptr=word, d_ptr=word, ws_ptr="*i64", out_d_ptr="*i32", out_i_ptr="*i64",
                         nq="i32", n="i64", k="i32", slice_len="i64", num_slices="i32")
            consts = dict(NWORDS=nwords, BLOCK_W=min(triton.next_power_of_2(nwords), 4),
                          WORD_BYTES=wb, KP=kp, LOG_KP=log2(kp), DIRECT=direct,
                          USE_POPC=True, BLOCK_Q=tq, BLOCK_N=tn, TILE_Q=tq, TILE_N=tn,
                          LOG_TQ=log2(tq), LOG_TN=log2(tn))
            build(th._topk_kernel, types, consts, arch, 4)
        types = dict(a_ptr="*i32", b_ptr="*i32", out_ptr="*i32", na="i32", nb="i64")
        consts = dict(NWORDS=3, BLOCK_W=4, WORD_BYTES=4, USE_POPC=True, BLOCK_M=64, BLOCK_N=64,
                      GROUP_M=8)
        build(th._distance_kernel, types, consts, arch, 8)
        types = dict(ws_ptr="*i64", out_d_ptr="*i32", out_i_ptr="*i64", nq="i32", k="i32",
                     num_slices="i32")
        build(th._merge_kernel, types, dict(KP=64, LOG_KP=6, TILE_Q=16, LOG_TQ=4), arch, 4)
    print("compiled")
""")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means no NVIDIA backend
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend")
def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


def test_autotune_prune_keeps_one_config_per_effective_tile():
    """GPU autotuning benchmarks each distinct (TILE_Q, TILE_N, num_warps) once."""
    configs = [triton.Config({"BLOCK_Q": 8, "BLOCK_N": 128}, num_warps=4),
               triton.Config({"BLOCK_Q": 16, "BLOCK_N": 128}, num_warps=4),
               triton.Config({"BLOCK_Q": 32, "BLOCK_N": 128}, num_warps=8),
               triton.Config({"BLOCK_Q": 16, "BLOCK_N": 256}, num_warps=8)]
    # k = 2048: every tile is [1 or 2, 2048], one query per 4 warps
    kept = th._distinct_topk_configs(configs, {"nq": 100}, KP=2048)
    assert [(c.kwargs["BLOCK_Q"], c.num_warps) for c in kept] == [(8, 4), (32, 8)]
    # one query: the query tile is 1 whatever BLOCK_Q says
    kept = th._distinct_topk_configs(configs, {"nq": 1}, KP=16)
    assert len(kept) == 3
    # many queries, small k: all four differ
    assert th._distinct_topk_configs(configs, {"nq": 1000}, KP=16) == configs
