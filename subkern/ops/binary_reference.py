"""Plain-torch reference implementations of the binary-code ops (the ground truth).

Codes are FAISS's layout: ``uint8 [n, nbytes]``. The Hamming distance of two codes is
``popcount(a XOR b)`` summed over the bytes. The top-k search orders candidates by the key
``(distance, index)``, so ties are broken by the lower database index; it works on database chunks
and never holds the ``[nq, n]`` distance matrix (memory ``O(nq * (k + chunk))``).
"""

from __future__ import annotations

import torch

#: Distance written in the result slots that have no database entry (k > database size), as FAISS.
MISSING_DISTANCE = torch.iinfo(torch.int32).max
#: Index written in the result slots that have no database entry.
MISSING_INDEX = -1

_INDEX_BITS = 43  # keys pack (distance << 43) | index: indices below 2**43, distances below 2**20
_MAX_KEY = torch.iinfo(torch.int64).max
# Elements of one XOR block [rows, cols, nbytes] the reference builds at a time (~64 MiB of int32).
_BLOCK_ELEMENTS = 1 << 24

_popcount_table: dict[torch.device, torch.Tensor] = {}


def _byte_popcounts(device: torch.device) -> torch.Tensor:
    table = _popcount_table.get(device)
    if table is None:
        values = torch.arange(256, dtype=torch.int32)
        bits = torch.zeros(256, dtype=torch.int32)
        for shift in range(8):
            bits += (values >> shift) & 1
        table = _popcount_table[device] = bits.to(device)
    return table


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = sum_bytes popcount(a[i] ^ b[j])`` as int32 ``[na, nb]``."""
    na, nb, nbytes = a.shape[0], b.shape[0], a.shape[1]
    out = torch.empty((na, nb), dtype=torch.int32, device=a.device)
    if na == 0 or nb == 0:
        return out
    if nbytes == 0:
        return out.zero_()
    table = _byte_popcounts(a.device)
    cols = max(1, min(nb, _BLOCK_ELEMENTS // nbytes))
    rows = max(1, _BLOCK_ELEMENTS // (cols * nbytes))
    for j0 in range(0, nb, cols):
        bj = b[j0:j0 + cols]
        for i0 in range(0, na, rows):
            x = torch.bitwise_xor(a[i0:i0 + rows, None, :], bj[None, :, :])
            out[i0:i0 + rows, j0:j0 + cols] = table[x.long()].sum(dim=-1, dtype=torch.int32)
    return out


def hamming_topk(queries: torch.Tensor, database: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest database codes of every query: ``(distances int32 [nq, k], indices int64)``.

    Ascending by distance, ties by the lower index; missing slots hold
    (:data:`MISSING_DISTANCE`, :data:`MISSING_INDEX`).
    """
    nq, n, nbytes = queries.shape[0], database.shape[0], queries.shape[1]
    device = queries.device
    if n >= (1 << _INDEX_BITS):
        raise ValueError(f"the reference hamming_topk supports databases below 2**{_INDEX_BITS} "
                         f"codes (got {n})")
    best = torch.full((nq, k), _MAX_KEY, dtype=torch.int64, device=device)
    if nq > 0 and n > 0:
        chunk = max(1, min(n, max(4 * k, _BLOCK_ELEMENTS // max(1, nq * max(nbytes, 1)))))
        for start in range(0, n, chunk):
            dist = hamming_distance(queries, database[start:start + chunk]).long()
            index = torch.arange(start, start + dist.shape[1], device=device, dtype=torch.int64)
            keys = (dist << _INDEX_BITS) | index
            merged = torch.cat([best, keys], dim=1)
            best = torch.topk(merged, k, dim=1, largest=False, sorted=True).values
    missing = best == _MAX_KEY
    distances = (best >> _INDEX_BITS).to(torch.int32)
    indices = best & ((1 << _INDEX_BITS) - 1)
    distances = distances.masked_fill(missing, MISSING_DISTANCE)
    indices = indices.masked_fill(missing, MISSING_INDEX)
    return distances, indices
