"""Sharded search over torch.distributed (gloo on CPU, loopback): every rank must get exactly the
answer of one BinaryIndex holding the whole database."""

from __future__ import annotations

import datetime
import itertools
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from subkern.retrieval import (
    BinaryIndex,
    shard_bounds,
    shard_offsets,
    sharded_range_search,
    sharded_search,
)

KS = (1, 5, 37, 400)  # 400 > database size: missing slots
RADII = (0, 1, 20, 30, 65)
JOIN_TIMEOUT_S = 90.0


def make_database() -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes with many duplicates (some across shard boundaries) and all-zero rows."""
    gen = torch.Generator().manual_seed(1234)
    db = torch.randint(0, 256, (230, 8), dtype=torch.uint8, generator=gen)
    db[100:150] = db[0:50]  # duplicates on the other shard
    db[60:70] = 0
    db[200:215] = 0
    db[115] = db[3]
    queries = torch.cat([torch.randint(0, 256, (6, 8), dtype=torch.uint8, generator=gen),
                         db[[0, 3, 60, 120]], torch.zeros(1, 8, dtype=torch.uint8)])
    return db, queries


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_cpu(v) for v in value)
    return value


def _worker(rank: int, world_size: int, port: int, out_dir: str, device: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        db, queries = make_database()
        db, queries = db.to(device), queries.to(device)
        results: dict = {}
        # 1. an even split with contiguous global ids from shard_bounds
        start, stop = shard_bounds(db.shape[0], world_size, rank)
        even = BinaryIndex(64, device=device)
        even.add(db[start:stop], ids=torch.arange(start, stop))
        # 2. an uneven split (rank 0 holds most rows, the last rank few), ids from shard_offsets;
        #    the rows are added in two pieces to exercise the ids of several adds
        cuts = [0] + [int(db.shape[0] * f) for f in (0.9, 0.97, 0.99)][: world_size - 1]
        cuts.append(db.shape[0])
        rows = db[cuts[rank]: cuts[rank + 1]]
        offsets = shard_offsets(rows.shape[0])
        results["offsets"] = offsets
        uneven = BinaryIndex(64, device=device)
        mid = rows.shape[0] // 2
        uneven.add(rows[:mid], ids=torch.arange(offsets[rank], offsets[rank] + mid))
        uneven.add(rows[mid:], ids=torch.arange(offsets[rank] + mid, offsets[rank + 1]))
        # 3. all rows on rank 0, empty shards elsewhere
        lopsided = BinaryIndex(64, device=device)
        if rank == 0:
            lopsided.add(db)
        for name, index in (("even", even), ("uneven", uneven), ("lopsided", lopsided)):
            for k in KS:
                results[name, "search", k] = sharded_search(index, queries, k)
            for radius in RADII:
                results[name, "range", radius] = sharded_range_search(index, queries, radius)
        # ranks that disagree all raise the same error instead of hanging
        try:
            sharded_search(even, queries, 3 + rank)
        except ValueError as err:
            results["mismatch"] = str(err)
        for key, value in results.items():
            if isinstance(value, tuple):
                assert all(v.device == queries.device for v in value), key
        torch.save({key: _cpu(value) for key, value in results.items()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, out_dir: str, device: str = "cpu") -> None:
    context = mp.spawn(_worker, args=(world_size, free_port(), out_dir, device),
                       nprocs=world_size, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sharded workers did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def check_ranks(tmp_path, world_size: int) -> None:
    db, queries = make_database()
    single = BinaryIndex(64)
    single.add(db)
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        if world_size == 1:
            assert results["offsets"] == [0, db.shape[0]]
            assert "mismatch" not in results
        else:
            assert results["offsets"] == [0, 207, db.shape[0]]
            assert "all ranks must pass the same k; got rank 0: 3, rank 1: 4" in results["mismatch"]
        for name in ("even", "uneven", "lopsided"):
            for k in KS:
                want = single.search(queries, k)
                got = results[name, "search", k]
                assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64
                assert torch.equal(got[0], want[0]), (rank, name, k)
                assert torch.equal(got[1], want[1]), (rank, name, k)
            for radius in RADII:
                want = single.range_search(queries, radius)
                got = results[name, "range", radius]
                assert [g.dtype for g in got] == [torch.int64, torch.int32, torch.int64]
                for g, w in zip(got, want, strict=True):
                    assert torch.equal(g, w), (rank, name, radius)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_equals_single_index(tmp_path, world_size):
    run_ranks(world_size, str(tmp_path))
    check_ranks(tmp_path, world_size)


@pytest.mark.gpu
def test_sharded_cuda_indexes_over_gloo(tmp_path):
    """CUDA shards over a gloo group: results travel through the CPU and come back on CUDA."""
    run_ranks(2, str(tmp_path), device="cuda")
    check_ranks(tmp_path, 2)


def test_without_process_group_is_local():
    assert not dist.is_initialized()
    db, queries = make_database()
    index = BinaryIndex(64)
    index.add(db)
    for k in (1, 300):
        got, want = sharded_search(index, queries, k), index.search(queries, k)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    got, want = sharded_range_search(index, queries, 25), index.range_search(queries, 25)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert shard_offsets(17) == [0, 17]
    with pytest.raises(TypeError, match="local_index"):
        sharded_search(db, queries, 3)
    with pytest.raises(ValueError, match="local_count"):
        shard_offsets(-1)


def test_shard_bounds():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(10, 2, 2)
