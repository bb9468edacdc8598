"""Exact search over a database sharded across the ranks of a ``torch.distributed`` group.

Every rank holds one shard, its own :class:`~subkern.retrieval.BinaryIndex` whose ids are *global*
(unique across ranks): give them explicitly with ``index.add(codes, ids=...)``, e.g. from
:func:`shard_offsets` (contiguous id ranges in rank order) or :func:`shard_bounds` (an even split
of a database every rank can see). Every rank passes the same queries; each searches its shard,
the per-rank results are all-gathered (on CPU for gloo, on the rank's CUDA device for NCCL) and
merged, and every rank returns the same merged answer.

Tie rule, and why the answer is exact: candidates are ordered by ``(distance, rank, local
position)``. This is precisely the ``(distance, position)`` order of a single index holding the
concatenation of the shards in rank order (its positions enumerate rank 0's entries, then rank 1's,
...), so the merged answer equals, distances and ids alike, the single-machine
:meth:`BinaryIndex.search` / :meth:`~BinaryIndex.range_search` of that concatenated index. When
the shards are contiguous id ranges in rank order (as :func:`shard_offsets` gives) the rank order is
the global insertion order. The merged top-k is the top-k of the union of the local top-k lists
(every global top-k entry is in its own shard's top-k under the same order).

Without an initialised process group (and ``group=None``) the functions run as a world of one
rank and return the local answer. All ranks must call them together (collectives); a rank whose
arguments disagree with the others' (number of queries, k, radius, nbits) makes every rank raise
the same ``ValueError`` instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .index import BinaryIndex

__all__ = ["sharded_search", "sharded_range_search", "shard_offsets", "shard_bounds"]


def shard_bounds(ntotal: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` rows of rank ``rank`` when ``ntotal`` rows are split evenly.

    The first ``ntotal % world_size`` ranks get one row more; the ranges are contiguous in rank
    order, so ids ``arange(start, stop)`` make the sharded index equal to the unsharded one.
    """
    if world_size <= 0 or not 0 <= rank < world_size or ntotal < 0:
        raise ValueError(f"need ntotal >= 0 and 0 <= rank < world_size, got ntotal={ntotal}, "
                         f"rank={rank}, world_size={world_size}")
    base, extra = divmod(ntotal, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int] | None:
    """``(rank, world_size)`` in ``group``, or None when running as a single process."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not "
                               "initialised (call dist.init_process_group first)")
        return None
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group: dist.ProcessGroup | None, data_device: torch.device) -> torch.device:
    """The device whose tensors the group's backend communicates (CPU for gloo, CUDA for NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    if data_device.type == "cuda" and "nccl" in backend:
        return data_device
    if data_device.type == "cpu" and ("gloo" in backend or "mpi" in backend):
        return data_device
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, world_size: int, group: dist.ProcessGroup | None,
                device: torch.device) -> list[torch.Tensor]:
    tensor = tensor.to(device).contiguous()
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor, group=group)
    return out


def _agree(values: list[int], names: list[str], world_size: int, group: dist.ProcessGroup | None,
           device: torch.device) -> list[torch.Tensor]:
    """All-gather small int metadata; raise the same error on every rank if ranks disagree on
    the entries in ``names`` (the others, e.g. result counts, may differ)."""
    mine = torch.tensor(values, dtype=torch.int64)
    gathered = _all_gather(mine, world_size, group, device)
    table = torch.stack([g.cpu() for g in gathered])
    for column, name in enumerate(names):
        if name and not bool((table[:, column] == table[0, column]).all()):
            per_rank = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(table[:, column]))
            raise ValueError(f"all ranks must pass the same {name}; got {per_rank}")
    return list(table.unbind(0))


def _check_index(local_index: object) -> BinaryIndex:
    if not isinstance(local_index, BinaryIndex):
        raise TypeError(f"local_index must be a subkern BinaryIndex, got "
                        f"{type(local_index).__name__}")
    return local_index


def sharded_search(local_index: BinaryIndex, queries: torch.Tensor, k: int,
                   group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN over the union of the ranks' shards; every rank gets the same answer.

    Returns ``(distances int32 [nq, k], ids int64 [nq, k])`` on ``queries.device``, ordered by
    ``(distance, rank, local position)`` (see the module docstring: equal to the search of one
    index holding the shards concatenated in rank order); missing slots hold
    ``(2**31 - 1, -1)``. Communication: one all-gather of ``2 * nq * k`` int64 per rank.
    """
    index = _check_index(local_index)
    distances, ids = index.search(queries, k)
    info = _group_info(group)
    if info is None or info[1] == 1:
        return distances, ids
    _, world = info
    device = _comm_device(group, index.device)
    nq = queries.shape[0]
    _agree([nq, k, index.nbits], ["number of queries", "k", "nbits"], world, group, device)
    payload = torch.stack([distances.to(torch.int64), ids])  # [2, nq, k]
    gathered = _all_gather(payload, world, group, device)
    merged = torch.cat(gathered, dim=2)  # [2, nq, world * k], rank-major
    # A stable sort by distance keeps the rank-major, then (distance, position) order of ties.
    order = torch.sort(merged[0], dim=1, stable=True).indices[:, :k]
    out_d = torch.gather(merged[0], 1, order).to(torch.int32)
    out_i = torch.gather(merged[1], 1, order)
    return out_d.to(queries.device), out_i.to(queries.device)


def sharded_range_search(local_index: BinaryIndex, queries: torch.Tensor, radius: int,
                         group: dist.ProcessGroup | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact range search (distance ``< radius``) over the union of the ranks' shards.

    Returns FAISS-style ``(lims int64 [nq + 1], distances int32 [m], ids int64 [m])`` on
    ``queries.device``, each query's results ordered by ``(distance, rank, local position)``,
    equal to :meth:`BinaryIndex.range_search` of the shards concatenated in rank order.
    Communication: one small all-gather of counts, then one of ``nq + 2 * max_rank_results``
    int64 per rank.
    """
    index = _check_index(local_index)
    lims, distances, ids = index.range_search(queries, radius)
    info = _group_info(group)
    if info is None or info[1] == 1:
        return lims, distances, ids
    _, world = info
    device = _comm_device(group, index.device)
    nq, nbits = queries.shape[0], index.nbits
    m = distances.shape[0]
    meta = _agree([nq, radius, nbits, m], ["number of queries", "radius", "nbits", ""], world,
                  group, device)
    width = max(int(row[3]) for row in meta)
    payload = torch.zeros(nq + 2 * width, dtype=torch.int64, device=index.device)
    payload[:nq] = lims[1:] - lims[:-1]
    payload[nq: nq + m] = distances.to(torch.int64)
    payload[nq + width: nq + width + m] = ids
    gathered = _all_gather(payload, world, group, device)
    q_parts, d_parts, i_parts = [], [], []
    query_numbers = torch.arange(nq, device=device)
    for row, data in zip(meta, gathered, strict=True):
        count = int(row[3])
        q_parts.append(torch.repeat_interleave(query_numbers, data[:nq]))
        d_parts.append(data[nq: nq + count])
        i_parts.append(data[nq + width: nq + width + count])
    hit_q, hit_d, hit_i = torch.cat(q_parts), torch.cat(d_parts), torch.cat(i_parts)
    # Rank-major concatenation; within a rank each query's hits are (distance, position) sorted.
    order = torch.sort(hit_q * (nbits + 1) + hit_d, stable=True).indices
    out_lims = torch.zeros(nq + 1, dtype=torch.int64, device=device)
    out_lims[1:] = torch.cumsum(torch.bincount(hit_q, minlength=nq), dim=0)
    target = queries.device
    return (out_lims.to(target), hit_d[order].to(torch.int32).to(target),
            hit_i[order].to(target))


def shard_offsets(local_count: int, group: dist.ProcessGroup | None = None) -> list[int]:
    """Global id offsets of contiguous shards in rank order (a collective).

    Every rank passes the number of entries it holds; every rank gets ``offsets`` of length
    ``world_size + 1`` with ``offsets[r]`` the first global id of rank ``r`` and ``offsets[-1]``
    the total, so rank ``r`` adds its codes with ``ids=torch.arange(offsets[r], offsets[r + 1])``.
    """
    if isinstance(local_count, bool) or not isinstance(local_count, int) or local_count < 0:
        raise ValueError(f"local_count must be a non-negative int, got {local_count!r}")
    info = _group_info(group)
    if info is None or info[1] == 1:
        return [0, local_count]
    _, world = info
    device = _comm_device(group, torch.device("cpu"))
    counts = _agree([local_count], [""], world, group, device)
    offsets = [0]
    for row in counts:
        offsets.append(offsets[-1] + int(row[0]))
    return offsets
