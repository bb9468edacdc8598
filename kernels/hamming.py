"""Triton kernels for Hamming distances and fused Hamming top-k over packed binary codes.

Codes are ``uint8 [n, nbytes]`` (FAISS layout, ``1 <= nbytes <= 512``). Both kernels read a code as
a row of *words*: 32-bit words (a zero-copy ``int32`` view of the bytes) when ``nbytes % 4 == 0``,
else single bytes. The Hamming distance of two codes is ``sum_w popcount(q[w] XOR d[w])``, the
popcount being the hardware ``popc.b32`` (``libdevice.popc``) on NVIDIA GPUs and a SWAR bit trick
under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) and on other GPUs.

Top-k (:func:`hamming_topk`) never materialises the ``[nq, n]`` distance matrix:

* Every candidate is the int64 key ``(distance << 43) | index``; ordering keys orders by distance,
  then by lower index (the reference's tie-break), and keys are unique. A missing slot is the key
  ``2**63 - 1`` (decoded as distance ``2**31 - 1``, index ``-1``).
* The grid is ``(query tiles, database slices)``. A program keeps, for each of its ``TILE_Q``
  queries, a sorted running top-``KP`` (``KP = next_pow2(k)``) of the keys of its contiguous slice
  of the database. It walks the slice in tiles of ``TILE_N`` codes; a tile with no key below the
  current ``KP``-th best of any of the program's queries is skipped, otherwise the tile's ``KP``
  smallest keys (bitonic top-k, sorted descending) are merged into the running list with one
  bitonic merge: ``min(best, cand)`` holds the ``KP`` smallest keys of both lists as a bitonic
  sequence, which ``log2(KP)`` compare-exchange stages sort. The sorting networks are written here
  (same hypercube layout as ``tl.sort``) with ``tl.sum``/``tl.min`` reductions, which the
  interpreter vectorises, instead of ``tl.sort``'s ``xor_sum``, which it runs element by element.
* With one slice the program decodes its list straight into the outputs; with ``S`` slices each
  writes its sorted list to a workspace ``[nq, S, KP]`` (the only extra memory, ``O(nq * KP * S)``)
  and a small kernel merges the ``S`` lists per query the same way and decodes the first ``k``.

Everything is deterministic: the result is exactly the reference's (same distances, same indices,
same order) for any tiling, slicing or autotuned configuration. Index arithmetic is 64-bit, so
databases past ``2**31`` codes (up to ``2**43``) are fine.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._matmul_common import AUTOTUNE

__all__ = ["hamming_distance", "hamming_topk", "INDEX_BITS", "MAX_K"]

#: Low bits of a top-k key holding the database index: keys are ``(distance << 43) | index``.
INDEX_BITS = 43
#: Largest k one pass selects (as ``subkern.ops.binary.MAX_GPU_K``).
MAX_K = 2048

_INDEX_BITS = tl.constexpr(INDEX_BITS)
_INDEX_MASK = tl.constexpr((1 << INDEX_BITS) - 1)
_KEY_MAX = tl.constexpr(2**63 - 1)  # "no candidate"; larger than every real key
_INT32_MAX = tl.constexpr(2**31 - 1)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Keys of a database tile (TILE_Q * TILE_N) per GPU thread: bounds the registers of the tile, the
# running lists and the sort network (16 int64 keys per thread compile without local-memory
# spills for sm_90).
_KEYS_PER_THREAD = 16


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _popcount(x, USE_POPC: tl.constexpr):
    """Bits set in each element of the int32 tensor ``x`` (any bit pattern, negatives included)."""
    if USE_POPC:
        c = libdevice.popc(x)  # one popc.b32 per word
    else:
        # SWAR: 2-bit, 4-bit, 8-bit partial sums; the masks also clear the sign-extended bits of
        # the arithmetic shifts, and the final byte sum (<= 32) fits in 6 bits.
        c = x - ((x >> 1) & 0x55555555)
        c = (c & 0x33333333) + ((c >> 2) & 0x33333333)
        c = (c + (c >> 4)) & 0x0F0F0F0F
        c = c + (c >> 8)
        c = (c + (c >> 16)) & 0x3F
    return c


@triton.jit
def _distance_tile(a_ptr, b_ptr, rows_a, rows_b, mask_a, mask_b,
                   NWORDS: tl.constexpr, BLOCK_W: tl.constexpr, USE_POPC: tl.constexpr):
    """``D[i, j] = sum_w popcount(a[rows_a[i], w] ^ b[rows_b[j], w])`` as int32 ``[BA, BB]``.

    ``rows_*`` are int64 row numbers of row-major ``[*, NWORDS]`` word arrays; masked rows read
    zeros (their distances are meaningless and must be masked by the caller). Words are read
    ``BLOCK_W`` at a time (the last chunk masked), as the K loop of a matmul.
    """
    acc = tl.zeros([rows_a.shape[0], rows_b.shape[0]], dtype=tl.int32)
    base_a = a_ptr + rows_a[:, None] * NWORDS
    base_b = b_ptr + rows_b[:, None] * NWORDS
    for w0 in range(0, NWORDS, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        mask_w = offs_w < NWORDS
        wa = tl.load(base_a + offs_w[None, :], mask=mask_a[:, None] & mask_w[None, :], other=0)
        wb = tl.load(base_b + offs_w[None, :], mask=mask_b[:, None] & mask_w[None, :], other=0)
        x = (wa[:, None, :] ^ wb[None, :, :]).to(tl.int32)  # uint8 words zero-extend
        acc += tl.sum(_popcount(x, USE_POPC), axis=2)
    return acc


# Sorting networks on int64 keys. A [2**R, 2**C] tile is viewed as a hypercube [2] * (R + C):
# the j-th innermost axis is bit j of the column, so a compare-exchange across that axis pairs
# columns c and c ^ 2**j of every row (the layout of Triton's own tl.sort). The partner of each
# element is sum(pair) - element (int64 wrap-around is exact modulo 2**64). tl.sum/tl.min have a
# vectorised path in the interpreter (tl.sort's xor_sum runs element by element in Python there);
# compiled, each stage is one reduction over a size-2 axis, as in tl.sort.

@triton.jit
def _right_half(N_DIMS: tl.constexpr, J: tl.constexpr):
    """1 where the bit of hypercube axis ``J`` (from the innermost) is set, else 0.

    Shaped to broadcast against the hypercube.
    """
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - J - 1) + [2] + [1] * J)


@triton.jit
def _compare_exchange(h, descending, J: tl.constexpr, N_DIMS: tl.constexpr):
    """Order every pair across hypercube axis ``J``: min left / max right, swapped where
    ``descending`` (0, 1, or a 0/1 tensor broadcastable to ``h``) is 1."""
    partner = tl.sum(h, axis=N_DIMS - 1 - J, keep_dims=True) - h
    take_partner = (h > partner) != (descending ^ _right_half(N_DIMS, J))
    return tl.where(take_partner, partner, h)


@triton.jit
def _bitonic_stages(h, STAGE: tl.constexpr, ORDER: tl.constexpr, N_DIMS: tl.constexpr):
    """Sort every bitonic block of ``2**STAGE`` columns (axes ``STAGE - 1 .. 0``).

    ``ORDER`` 0: ascending, 1: descending, 2: alternating (block ``b`` ascending iff ``b`` even),
    which makes neighbouring sorted blocks bitonic pairs for the next stage.
    """
    if ORDER == 2:
        descending = _right_half(N_DIMS, STAGE)
    else:
        descending = ORDER
    for i in tl.static_range(STAGE):
        h = _compare_exchange(h, descending, STAGE - 1 - i, N_DIMS)
    return h


@triton.jit
def _smallest_k(x, LOG_R: tl.constexpr, LOG_C: tl.constexpr, LOG_K: tl.constexpr,
                DESCENDING: tl.constexpr):
    """The ``2**LOG_K`` smallest keys of every row of ``x [2**LOG_R, 2**LOG_C]``, sorted.

    Bitonic top-k: sort blocks of ``2**LOG_K`` columns in alternating order; then, repeatedly,
    ``min`` of an ascending and a descending neighbour (a bitonic sequence holding the smallest
    ``2**LOG_K`` of both) and a bitonic merge, until one block is left.
    """
    n_dims: tl.constexpr = LOG_R + LOG_C
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_stages(h, i, 2 if i < LOG_C else DESCENDING, n_dims)
    for i in tl.static_range(LOG_K + 1, LOG_C + 1):
        # the hypercube has n_dims - (i - LOG_K) axes after this reduction of column bit LOG_K
        h = tl.min(h, axis=n_dims - (i - LOG_K) - LOG_K)
        h = _bitonic_stages(h, LOG_K, 2 if i < LOG_C else DESCENDING, n_dims - (i - LOG_K))
    return tl.reshape(h, [2**LOG_R, 2**LOG_K])


@triton.jit
def _merge_sorted(best, cand_desc, LOG_R: tl.constexpr, LOG_K: tl.constexpr):
    """The ``KP`` smallest of the ascending ``best`` and descending ``cand_desc`` (both
    ``[2**LOG_R, KP = 2**LOG_K]``), ascending per row.

    ``min(best, cand_desc)`` rises then falls (bitonic) and holds the ``KP`` smallest of the union;
    a bitonic merge network sorts it in ``LOG_K`` compare-exchange stages.
    """
    h = tl.reshape(tl.minimum(best, cand_desc), [2] * (LOG_R + LOG_K))
    h = _bitonic_stages(h, LOG_K, 0, LOG_R + LOG_K)
    return tl.reshape(h, [2**LOG_R, 2**LOG_K])


@triton.jit
def _store_topk(best, rows_q, mask_q, out_d_ptr, out_i_ptr, k, KP: tl.constexpr):
    """Decode the first ``k`` of the ascending keys ``best [TQ, KP]`` into the outputs."""
    offs_k = tl.arange(0, KP)
    missing = best == _KEY_MAX
    dist = tl.where(missing, _INT32_MAX, (best >> _INDEX_BITS).to(tl.int32))
    index = tl.where(missing, -1, best & _INDEX_MASK)
    offs = rows_q[:, None] * k + offs_k[None, :]
    mask = mask_q[:, None] & (offs_k[None, :] < k)
    tl.store(out_d_ptr + offs, dist, mask=mask)
    tl.store(out_i_ptr + offs, index, mask=mask)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

def _distance_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 4}, num_warps=4)]
    configs = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4),
    ]
    return configs if AUTOTUNE else configs[:1]


@triton.autotune(configs=_distance_configs(), key=["NWORDS", "BLOCK_W", "WORD_BYTES"])
@triton.jit
def _distance_kernel(a_ptr, b_ptr, out_ptr, na, nb,
                     NWORDS: tl.constexpr, BLOCK_W: tl.constexpr, WORD_BYTES: tl.constexpr,
                     USE_POPC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """``out[i, j] = popcount(a[i] ^ b[j])``: one ``[BLOCK_M, BLOCK_N]`` output tile per program.

    1-D grid with grouped ordering (as Triton's matmul tutorial) so neighbouring programs reuse
    the same rows of ``a`` from L2. ``WORD_BYTES`` (4 or 1) only separates autotuning keys.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(na, BLOCK_M)
    num_n = tl.cdiv(nb, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows_a = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_b = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_a = rows_a < na
    mask_b = rows_b < nb
    dist = _distance_tile(a_ptr, b_ptr, rows_a, rows_b, mask_a, mask_b, NWORDS, BLOCK_W, USE_POPC)
    offs = rows_a[:, None] * nb + rows_b[None, :]
    tl.store(out_ptr + offs, dist, mask=mask_a[:, None] & mask_b[None, :])


def _topk_configs() -> list[triton.Config]:
    # BLOCK_Q / BLOCK_N are hints: the heuristics below widen the database tile to at least KP
    # and shrink the query tile to _KEYS_PER_THREAD keys per thread and the number of queries.
    if _INTERPRET:
        return [triton.Config({"BLOCK_Q": 4, "BLOCK_N": 32}, num_warps=4)]
    configs = [
        triton.Config({"BLOCK_Q": 8, "BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_Q": 16, "BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_Q": 32, "BLOCK_N": 128}, num_warps=8),
        triton.Config({"BLOCK_Q": 16, "BLOCK_N": 256}, num_warps=8),
    ]
    return configs if AUTOTUNE else configs[:1]


def _log2(x: int) -> int:
    """log2 of a power of two."""
    return x.bit_length() - 1


def _tile_n(args: dict) -> int:
    return max(args["BLOCK_N"], args["KP"])


def _tile_q(args: dict) -> int:
    fit = _KEYS_PER_THREAD * 32 * args.get("num_warps", 4) // _tile_n(args)
    return max(1, min(args["BLOCK_Q"], fit, triton.next_power_of_2(args["nq"])))


def _distinct_topk_configs(configs: list[triton.Config], named_args: dict, **kwargs: object
                           ) -> list[triton.Config]:
    """Autotune prune: drop configs whose effective tiles (after the heuristics) repeat."""
    seen, kept = set(), []
    for config in configs:
        args = {**named_args, **kwargs, **config.all_kwargs()}
        tiles = (_tile_q(args), _tile_n(args), config.num_warps)
        if tiles not in seen:
            seen.add(tiles)
            kept.append(config)
    return kept


@triton.autotune(configs=_topk_configs(), key=["KP", "NWORDS", "BLOCK_W", "WORD_BYTES"],
                 prune_configs_by={"early_config_prune": _distinct_topk_configs})
@triton.heuristics({
    "TILE_N": _tile_n,
    "TILE_Q": _tile_q,
    "LOG_TN": lambda args: _log2(_tile_n(args)),
    "LOG_TQ": lambda args: _log2(_tile_q(args)),
})
@triton.jit
def _topk_kernel(q_ptr, d_ptr, ws_ptr, out_d_ptr, out_i_ptr, nq, n, k, slice_len, num_slices,
                 NWORDS: tl.constexpr, BLOCK_W: tl.constexpr, WORD_BYTES: tl.constexpr,
                 KP: tl.constexpr, LOG_KP: tl.constexpr, DIRECT: tl.constexpr,
                 USE_POPC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILE_Q: tl.constexpr, TILE_N: tl.constexpr, LOG_TQ: tl.constexpr,
                 LOG_TN: tl.constexpr):
    """Running top-``KP`` keys of ``TILE_Q`` queries over database rows
    ``[pid_s * slice_len, min((pid_s + 1) * slice_len, n))``.

    ``DIRECT`` (one slice): decode into ``out_d``/``out_i`` ``[nq, k]``; else store the ascending
    keys in ``ws [nq, num_slices, KP]`` for :func:`_merge_kernel`.
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows_q = pid_q.to(tl.int64) * TILE_Q + tl.arange(0, TILE_Q)
    mask_q = rows_q < nq
    start = pid_s.to(tl.int64) * slice_len
    stop = tl.minimum(start + slice_len, n)

    best = tl.full([TILE_Q, KP], _KEY_MAX, dtype=tl.int64)  # ascending, per query row
    worst = tl.full([TILE_Q], _KEY_MAX, dtype=tl.int64)  # best[:, KP - 1]
    # A while loop: its bounds are run-time values (the interpreter's range() rejects tensors).
    n0 = start
    while n0 < stop:
        rows_n = n0 + tl.arange(0, TILE_N).to(tl.int64)
        mask_n = rows_n < stop
        dist = _distance_tile(q_ptr, d_ptr, rows_q, rows_n, mask_q, mask_n,
                              NWORDS, BLOCK_W, USE_POPC)
        keys = (dist.to(tl.int64) << _INDEX_BITS) | rows_n[None, :]
        keys = tl.where(mask_q[:, None] & mask_n[None, :], keys, _KEY_MAX)
        better = tl.max((keys < worst[:, None]).to(tl.int32))
        if better > 0:
            cand = _smallest_k(keys, LOG_TQ, LOG_TN, LOG_KP, 1)  # descending
            best = _merge_sorted(best, cand, LOG_TQ, LOG_KP)
            worst = tl.max(best, axis=1)
        n0 += TILE_N

    if DIRECT:
        _store_topk(best, rows_q, mask_q, out_d_ptr, out_i_ptr, k, KP)
    else:
        offs_k = tl.arange(0, KP)
        offs = (rows_q[:, None] * num_slices + pid_s) * KP + offs_k[None, :]
        tl.store(ws_ptr + offs, best, mask=mask_q[:, None])


@triton.jit
def _merge_kernel(ws_ptr, out_d_ptr, out_i_ptr, nq, k, num_slices,
                  KP: tl.constexpr, LOG_KP: tl.constexpr, TILE_Q: tl.constexpr,
                  LOG_TQ: tl.constexpr):
    """Merge the ``num_slices`` ascending key lists of every query (``ws [nq, S, KP]``), decode."""
    rows_q = tl.program_id(0).to(tl.int64) * TILE_Q + tl.arange(0, TILE_Q)
    mask_q = rows_q < nq
    offs_k = tl.arange(0, KP)
    best = tl.full([TILE_Q, KP], _KEY_MAX, dtype=tl.int64)
    s = 0
    while s < num_slices:
        # read the ascending list back to front: descending, as _merge_sorted wants it
        offs = (rows_q[:, None] * num_slices + s) * KP + (KP - 1 - offs_k[None, :])
        cand = tl.load(ws_ptr + offs, mask=mask_q[:, None], other=_KEY_MAX)
        best = _merge_sorted(best, cand, LOG_TQ, LOG_KP)
        s += 1
    _store_topk(best, rows_q, mask_q, out_d_ptr, out_i_ptr, k, KP)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _use_popc(device: torch.device) -> bool:
    """Hardware popcount: compiled kernels on NVIDIA GPUs (libdevice has no popc on ROCm)."""
    return device.type == "cuda" and not _INTERPRET and torch.version.hip is None


def _as_words(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Both code tensors as row-major word arrays: ``(a_words, b_words, nwords, word_bytes)``.

    32-bit words (zero-copy ``int32`` views; the byte order is irrelevant to a popcount of an XOR)
    when the width is a multiple of 4 bytes and both views are possible, else the bytes.
    """
    nbytes = a.shape[1]
    if nbytes % 4 == 0:
        try:
            return a.view(torch.int32), b.view(torch.int32), nbytes // 4, 4
        except RuntimeError:  # storage offset not a multiple of 4 bytes
            pass
    return a, b, nbytes, 1


def _block_w(nwords: int) -> int:
    return min(triton.next_power_of_2(nwords), 4)


def _check_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"codes must be 2-D [n, nbytes] of the same width, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if not 1 <= a.shape[1] <= 512:
        raise ValueError(f"codes must be 1 to 512 bytes wide, got {a.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"codes must be on the same device, got {a.device} and {b.device}")


def _device_guard(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs Hamming distances ``D[i, j] = popcount(a[i] ^ b[j])``: int32 ``[na, nb]``.

    ``a``, ``b``: uint8 codes ``[na, nbytes]``, ``[nb, nbytes]`` on the same device (CUDA, or CPU
    under ``TRITON_INTERPRET=1``).
    """
    _check_codes(a, b)
    a, b = a.contiguous(), b.contiguous()
    na, nb = a.shape[0], b.shape[0]
    out = torch.empty((na, nb), dtype=torch.int32, device=a.device)
    if na == 0 or nb == 0:
        return out
    aw, bw, nwords, word_bytes = _as_words(a, b)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(na, meta["BLOCK_M"]) * triton.cdiv(nb, meta["BLOCK_N"]),)

    with _device_guard(a.device):
        _distance_kernel[grid](aw, bw, out, na, nb, NWORDS=nwords, BLOCK_W=_block_w(nwords),
                               WORD_BYTES=word_bytes, USE_POPC=_use_popc(a.device))
    return out


def _default_slices(device: torch.device, nq: int, n: int, kp: int) -> int:
    """Database slices: enough programs to fill the GPU, slices long against the merge cost."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    programs_q = triton.cdiv(nq, 16)
    wanted = triton.cdiv(4 * sms, programs_q)
    return max(1, min(wanted, n // max(4 * kp, 1024)))


def hamming_topk(queries: torch.Tensor, database: torch.Tensor, k: int, *,
                 slices: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest database codes of each query, fused, exactly as the reference.

    Returns ``(distances int32 [nq, k], indices int64 [nq, k])`` ascending by
    ``(distance, index)``; slots past the database size hold ``(2**31 - 1, -1)``. ``k`` is at most
    :data:`MAX_K`. ``slices`` (default: chosen from the GPU size) splits the database into that many
    contiguous ranges searched in parallel and merged at the end; it changes speed, never results.
    """
    _check_codes(queries, database)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    queries, database = queries.contiguous(), database.contiguous()
    nq, n = queries.shape[0], database.shape[0]
    if n >= (1 << INDEX_BITS):
        raise ValueError(f"hamming_topk supports databases below 2**{INDEX_BITS} codes (got {n})")
    device = queries.device
    out_d = torch.empty((nq, k), dtype=torch.int32, device=device)
    out_i = torch.empty((nq, k), dtype=torch.int64, device=device)
    if nq == 0:
        return out_d, out_i
    if n == 0:
        return out_d.fill_(2**31 - 1), out_i.fill_(-1)

    kp = max(2, triton.next_power_of_2(k))
    if slices is None:
        slices = _default_slices(device, nq, n, kp)
    slices = max(1, min(int(slices), n))
    slice_len = triton.cdiv(n, slices)
    slices = triton.cdiv(n, slice_len)  # no empty slice
    direct = slices == 1
    ws = out_i if direct else torch.empty((nq, slices, kp), dtype=torch.int64, device=device)
    qw, dw, nwords, word_bytes = _as_words(queries, database)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(nq, meta["TILE_Q"]), slices)

    with _device_guard(device):
        _topk_kernel[grid](qw, dw, ws, out_d, out_i, nq, n, k, slice_len, slices,
                           NWORDS=nwords, BLOCK_W=_block_w(nwords), WORD_BYTES=word_bytes, KP=kp,
                           LOG_KP=_log2(kp), DIRECT=direct, USE_POPC=_use_popc(device))
        if not direct:
            tile_q = max(1, min(16, 2048 // kp, triton.next_power_of_2(nq)))
            _merge_kernel[(triton.cdiv(nq, tile_q),)](ws, out_d, out_i, nq, k, slices, KP=kp,
                                                      LOG_KP=_log2(kp), TILE_Q=tile_q,
                                                      LOG_TQ=_log2(tile_q),
                                                      num_warps=8 if kp >= 512 else 4)
    return out_d, out_i
