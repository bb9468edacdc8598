"""Hamming top-k benchmark: ``subkern.hamming_topk`` against FAISS and the torch reference.

Data: uniformly random uint8 codes (FAISS layout ``[n, bits / 8]``), a database of ``n`` codes and
``nq`` queries, fixed seeds. Random codes put the distances in a narrow band around ``bits / 2``,
so the k-th distance is usually shared by many codes: the tie handling is exercised too.

CPU cases (``--device cpu``), the issue's targets for k = 10 against FAISS ``IndexBinaryFlat``:
ours >= 3x its throughput at 64 bits, >= 2x at 256 bits, >= 1.5x at 1024 bits (1M codes, 1000
queries). Rivals: ``faiss.IndexBinaryFlat`` (optional) and the torch reference, timed on a prefix
of the queries (it is slow) and compared per query.

CUDA cases (``--device cuda``): 1.28M 64-bit codes, 10k queries, k = 1, 10, 100: the Triton and
CUDA backends against the torch reference on the GPU and against each other, with the roofline
efficiency ``t_min / t_ours`` where ``t_min = max(compulsory bytes / peak bandwidth, popcounts /
peak popcount rate)`` (:func:`roofline_inputs`, :func:`subkern.bench.harness.roofline_seconds`).

Correctness of every timed result is checked (``match`` per row):

* our result is a valid top-k: ascending distances, distinct in-range indices, and each reported
  distance equals ``popcount(query ^ database[index])`` recomputed here;
* against FAISS: the distances are identical, and the indices of the entries strictly closer than
  the k-th distance are the same set (within the k-th distance ties FAISS may pick other codes);
* against the reference (and between our backends): distances and indices identical (every
  subkern backend breaks ties by the lower index).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import _ext
from .. import backend as _backend
from ..ops.binary import hamming_topk
from ..ops.binary_reference import MISSING_DISTANCE
from . import environment
from .harness import (
    BenchConfig,
    BenchResult,
    Measurement,
    compare,
    gpu_peaks,
    peak_extra_memory,
    roofline_seconds,
    time_fn,
)

FAMILY = "hamming"
DESCRIPTION = "hamming_topk: k nearest uint8 binary codes by Hamming distance vs FAISS / reference"
OP = "hamming_topk"

#: Speedups over FAISS ``IndexBinaryFlat`` that the issue asks of the CPU kernel, by (bits, k).
ISSUE_TARGETS: dict[tuple[int, int], float] = {(64, 10): 3.0, (256, 10): 2.0, (1024, 10): 1.5}

FAISS_NAME = "faiss.IndexBinaryFlat"
REFERENCE_NAME = "torch reference"


@dataclass(frozen=True)
class HammingSize:
    """One benchmark size: database, queries, the (bits, k) cases and the repetition counts.

    ``slow_budget`` bounds the work of one timed call of a slow implementation (the reference):
    it gets ``slow_budget / (n * bytes per code)`` queries, clamped to ``[1, slow_max_queries]``.
    """

    n: int
    nq: int
    cases: tuple[tuple[int, int], ...]      # (bits, k)
    warmup: int
    reps: int
    slow_reps: int
    slow_budget: float
    slow_max_queries: int


SIZES: dict[str, dict[str, HammingSize]] = {
    "cpu": {
        "tiny": HammingSize(n=4_000, nq=16, cases=((64, 10), (256, 10), (64, 1), (64, 100)),
                            warmup=1, reps=2, slow_reps=1, slow_budget=4e6, slow_max_queries=16),
        "quick": HammingSize(n=200_000, nq=200,
                             cases=((64, 10), (256, 10), (1024, 10), (64, 1), (64, 100)),
                             warmup=1, reps=3, slow_reps=1, slow_budget=4e7, slow_max_queries=100),
        "full": HammingSize(n=1_000_000, nq=1000,
                            cases=((64, 10), (256, 10), (1024, 10), (64, 1), (256, 1), (64, 100),
                                   (256, 100)),
                            warmup=1, reps=5, slow_reps=2, slow_budget=1e8, slow_max_queries=100),
    },
    "cuda": {
        "tiny": HammingSize(n=20_000, nq=64, cases=((64, 10), (64, 1), (64, 100)),
                            warmup=2, reps=3, slow_reps=2, slow_budget=1e8, slow_max_queries=64),
        "quick": HammingSize(n=1_280_000, nq=1000, cases=((64, 10), (64, 1), (64, 100)),
                             warmup=2, reps=5, slow_reps=2, slow_budget=2e9, slow_max_queries=500),
        "full": HammingSize(n=1_280_000, nq=10_000, cases=((64, 10), (64, 1), (64, 100)),
                            warmup=2, reps=10, slow_reps=3, slow_budget=4e9,
                            slow_max_queries=1000),
    },
}


def size_for(device: str, size: str) -> HammingSize:
    return SIZES[device][size]


def case_label(bits: int, k: int) -> str:
    return f"{bits}b k={k}"


def slow_query_count(size: HammingSize, nbytes: int) -> int:
    """Queries a slow implementation is timed on (a prefix of the batch)."""
    budgeted = int(size.slow_budget // (size.n * nbytes))
    return max(1, min(size.slow_max_queries, size.nq, budgeted))


def random_codes(n: int, nbytes: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """``n`` uniformly random codes of ``nbytes`` bytes (uint8, contiguous)."""
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8))
    return codes.to(device)


def make_data(bits: int, n: int, nq: int, device: str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries [nq, bits/8], database [n, bits/8])`` with seeds fixed by ``bits``."""
    if bits % 8:
        raise ValueError(f"bits must be a multiple of 8, got {bits}")
    nbytes = bits // 8
    return random_codes(nq, nbytes, 2 * bits + 1, device), random_codes(n, nbytes, 2 * bits, device)


# ----------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------

TopK = tuple[torch.Tensor, torch.Tensor]


def subkern_topk(backend: str) -> Callable[[torch.Tensor, torch.Tensor, int], TopK]:
    """``hamming_topk`` forced onto ``backend`` (raises if it is unavailable)."""

    def run(queries: torch.Tensor, database: torch.Tensor, k: int) -> TopK:
        with _backend.use_backend(backend):
            return hamming_topk(queries, database, k)

    return run


def import_faiss() -> tuple[Any, str | None]:
    """``(faiss module, None)`` or ``(None, why not)``."""
    try:
        import faiss
    except ImportError as err:
        return None, f"faiss is not importable ({err}); pip install faiss-cpu for these rows"
    return faiss, None


def faiss_topk(faiss: Any, database: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, int],
                                                                 TopK]:
    """A FAISS ``IndexBinaryFlat`` holding ``database`` (CPU), searched like ``hamming_topk``."""
    index = faiss.IndexBinaryFlat(database.shape[1] * 8)
    index.add(database.numpy())

    def run(queries: torch.Tensor, _database: torch.Tensor, k: int) -> TopK:
        distances, labels = index.search(queries.numpy(), k)
        return torch.from_numpy(distances), torch.from_numpy(labels)

    return run


def is_slow(backend: str) -> bool:
    """Whether ``backend`` runs the torch reference (explicitly, or as a dispatcher fallback)."""
    return backend == "reference" or environment.native_kernel_missing(OP, backend)


# ----------------------------------------------------------------------------------------------
# correctness checks: None when fine, else a sentence
# ----------------------------------------------------------------------------------------------

_POPCOUNT8 = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)


def recompute_distances(queries: torch.Tensor, database: torch.Tensor, indices: torch.Tensor
                        ) -> torch.Tensor:
    """``popcount(queries[r] ^ database[indices[r, j]])`` as int64, -1 where ``indices < 0``."""
    table = _POPCOUNT8.to(queries.device)
    nq, k = indices.shape
    nbytes = queries.shape[1]
    out = torch.full((nq, k), -1, dtype=torch.int64, device=queries.device)
    if nq == 0 or k == 0 or database.shape[0] == 0:
        return out
    rows = max(1, (1 << 22) // max(1, k * nbytes))
    for r0 in range(0, nq, rows):
        idx = indices[r0:r0 + rows].long()
        codes = database[idx.clamp(min=0)]                       # [r, k, nbytes]
        xor = torch.bitwise_xor(codes, queries[r0:r0 + rows, None, :])
        dist = table[xor.long()].sum(dim=-1)
        out[r0:r0 + rows] = torch.where(idx >= 0, dist, torch.full_like(dist, -1))
    return out


def _rows(mask: torch.Tensor) -> str:
    bad = mask.nonzero().flatten()
    return f"{bad.numel()} of {mask.numel()} rows (first: row {int(bad[0])})"


def check_valid(queries: torch.Tensor, database: torch.Tensor, distances: torch.Tensor,
                indices: torch.Tensor, k: int) -> str | None:
    """Whether ``(distances, indices)`` is a correct top-k of ``queries`` in ``database``."""
    nq, n = queries.shape[0], database.shape[0]
    if tuple(distances.shape) != (nq, k) or tuple(indices.shape) != (nq, k):
        return (f"shapes {tuple(distances.shape)} / {tuple(indices.shape)}, expected "
                f"{(nq, k)}")
    if nq == 0:
        return None
    d = distances.long()
    i = indices.long()
    missing = i < 0
    expected_missing = torch.arange(k, device=i.device) >= min(k, n)
    if not torch.equal(missing, expected_missing.expand_as(missing)):
        return f"missing slots in the wrong places: {_rows((missing != expected_missing).any(1))}"
    if bool((d[missing] != MISSING_DISTANCE).any()):
        return "missing slots do not hold distance 2**31-1"
    if bool((i >= n).any()):
        return f"indices out of range: {_rows((i >= n).any(1))}"
    if k > 1 and bool((d[:, 1:] < d[:, :-1]).any()):
        return f"distances not ascending: {_rows((d[:, 1:] < d[:, :-1]).any(1))}"
    actual = recompute_distances(queries, database, i)
    wrong = (actual != d) & ~missing
    if bool(wrong.any()):
        return f"reported distances differ from popcount(q ^ db[index]): {_rows(wrong.any(1))}"
    if k > 1:
        ordered = torch.sort(torch.where(missing, torch.arange(k, device=i.device) - k, i),
                             dim=1).values
        dup = ordered[:, 1:] == ordered[:, :-1]
        if bool(dup.any()):
            return f"duplicate indices: {_rows(dup.any(1))}"
    return None


def check_against_faiss(distances: torch.Tensor, indices: torch.Tensor,
                        faiss_distances: torch.Tensor, faiss_indices: torch.Tensor) -> str | None:
    """Same distances as FAISS, same index set strictly below each row's k-th distance."""
    d, fd = distances.long(), faiss_distances.long()
    if d.shape != fd.shape:
        return f"shape {tuple(d.shape)} vs FAISS {tuple(fd.shape)}"
    if d.numel() == 0:
        return None
    diff = (d != fd).any(dim=1)
    if bool(diff.any()):
        row = int(diff.nonzero()[0])
        return (f"distances differ from FAISS in {_rows(diff)}: ours {d[row].tolist()[:8]} vs "
                f"FAISS {fd[row].tolist()[:8]}")
    kth = d[:, -1:]
    sentinel = torch.iinfo(torch.int64).max
    ours = torch.sort(torch.where(d < kth, indices.long(), sentinel), dim=1).values
    theirs = torch.sort(torch.where(fd < kth, faiss_indices.long(), sentinel), dim=1).values
    diff = (ours != theirs).any(dim=1)
    if bool(diff.any()):
        return f"indices strictly below the k-th distance differ from FAISS in {_rows(diff)}"
    return None


def check_identical(distances: torch.Tensor, indices: torch.Tensor, other_distances: torch.Tensor,
                    other_indices: torch.Tensor, other: str) -> str | None:
    """Distances and indices identical (both sides break ties by the lower index)."""
    if distances.shape != other_distances.shape:
        return f"shape {tuple(distances.shape)} vs {other} {tuple(other_distances.shape)}"
    bad = ((distances.long() != other_distances.long())
           | (indices.long() != other_indices.long())).any(dim=1)
    if bool(bad.any()):
        return f"results differ from the {other} in {_rows(bad)}"
    return None


def _join(*problems: str | None) -> tuple[bool, str]:
    found = [p for p in problems if p]
    return (not found, "; ".join(found) if found else "ok")


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------


@dataclass
class _Timed:
    measurement: Measurement
    out: TopK
    queries: torch.Tensor         # the queries it was timed on (a prefix for slow impls)


def _time_impl(name: str, fn: Callable[[torch.Tensor, torch.Tensor, int], TopK],
               queries: torch.Tensor, database: torch.Tensor, k: int, *, device: str,
               warmup: int, reps: int, memory: bool, note: str | None = None) -> _Timed:
    box: list[TopK] = []

    def call() -> None:
        box[:] = [fn(queries, database, k)]

    times = time_fn(call, device, warmup=warmup, reps=reps)
    peak, method = (peak_extra_memory(call, device) if memory else (None, None))
    return _Timed(Measurement(name, queries.shape[0], times, peak, method, note), box[0], queries)


def _time_slow(name: str, fn: Callable[[torch.Tensor, torch.Tensor, int], TopK],
               queries: torch.Tensor, database: torch.Tensor, k: int, *, device: str,
               size: HammingSize, note: str) -> _Timed:
    # warm up on one query (a full warm-up would cost as much as a repetition)
    fn(queries[:1], database, k)
    return _time_impl(name, fn, queries, database, k, device=device, warmup=0,
                      reps=size.slow_reps, memory=False, note=note)


def _record(result: BenchResult, case: str, timed: _Timed) -> None:
    data = timed.measurement.to_json()
    data["case"] = case
    result.measurements.append(data)


def _cpu_ours(config: BenchConfig, result: BenchResult
              ) -> list[tuple[str, str | None, str | None]]:
    """Our CPU variants: ``(label, isa to force or None, note)``; unavailable ones are skipped."""
    why = _backend.unavailable_reason("cpp", torch.device("cpu"))
    if why is not None:
        result.skip("subkern cpp backend (all CPU 'ours' rows)", why)
        return []
    module = _ext.extension()
    if is_slow("cpp"):
        note = ("subkern._C has no C++ kernel for hamming_topk yet: the dispatcher runs the torch "
                "reference, timed on a prefix of the queries")
        result.notes.append(note)
        return [("cpp(ref)", None, note)]
    wanted = list(config.cpu_isas)
    if "all" in wanted:
        wanted = ["avx512", "avx2", "portable"]
    variants = []
    for isa in wanted:
        if isa == "auto":
            label = f"cpp/{module.cpu_isa()}"
            if all(label != existing for existing, _, _ in variants):
                variants.append((label, None, None))
            continue
        try:
            module.set_cpu_isa(isa)
        except Exception as err:  # noqa: BLE001 - reported as a skipped variant
            result.skip(f"subkern cpp backend with ISA {isa}", str(err))
            continue
        label = f"cpp/{module.cpu_isa()}"
        _restore_isa()
        if all(label != existing for existing, _, _ in variants):
            variants.append((label, isa, None))
    return variants


def _restore_isa() -> None:
    """Back to the ISA level in force before the benchmark (SUBKERN_CPU_ISA, else auto)."""
    module = _ext.extension()
    if module is None:
        return
    try:
        module.set_cpu_isa(os.environ.get("SUBKERN_CPU_ISA", "auto") or "auto")
    except Exception:  # noqa: BLE001 - an unusable SUBKERN_CPU_ISA: fall back to auto
        module.set_cpu_isa("auto")


def _case_groups(size: HammingSize, device: str = "cpu"):
    """Per code width, in case order: the data (made once), the reference's query count and
    that width's cases as ``(k, case label, params)``."""
    for bits in dict.fromkeys(bits for bits, _ in size.cases):
        queries, database = make_data(bits, size.n, size.nq, device)
        m = slow_query_count(size, bits // 8)
        cases = [(k, case_label(bits, k),
                  {"bits": bits, "k": k, "n": size.n, "nq": size.nq, "slow_queries": m})
                 for case_bits, k in size.cases if case_bits == bits]
        yield queries, database, m, cases


def _run_cpu(config: BenchConfig, size: HammingSize, result: BenchResult) -> None:
    log = config.log
    faiss, faiss_reason = import_faiss()
    if faiss is None:
        result.skip(f"{FAISS_NAME} rows", faiss_reason or "faiss missing")
        log(f"NOTE: {faiss_reason}; the FAISS comparison rows are skipped")
    variants = _cpu_ours(config, result)
    reference = subkern_topk("reference")
    ours_fn = subkern_topk("cpp")
    try:
        for queries, database, m, cases in _case_groups(size):
            faiss_fn = faiss_topk(faiss, database) if faiss is not None else None
            for k, case, params in cases:
                log(f"[{FAMILY} cpu] {case}: n={size.n} nq={size.nq}")
                _cpu_case(config, size, result, case, params, queries, database, k, m,
                          variants, ours_fn, reference, faiss_fn)
    finally:
        if any(isa is not None for _, isa, _ in variants):
            _restore_isa()


def _cpu_case(config: BenchConfig, size: HammingSize, result: BenchResult, case: str,
              params: dict[str, Any], queries: torch.Tensor, database: torch.Tensor, k: int,
              m: int, variants: list[tuple[str, str | None, str | None]],
              ours_fn: Callable[..., TopK], reference: Callable[..., TopK],
              faiss_fn: Callable[..., TopK] | None) -> None:
    stat, nq = config.stat, queries.shape[0]
    reps = config.reps or size.reps
    target = ISSUE_TARGETS.get((params["bits"], k))
    rivals: list[tuple[_Timed, str]] = []
    try:
        ref = _time_slow(REFERENCE_NAME, reference, queries[:m], database, k, device="cpu",
                         size=size, note=f"timed on the first {m} of {nq} queries")
        _record(result, case, ref)
        rivals.append((ref, "reference"))
    except Exception as err:  # noqa: BLE001 - recorded, the other rows still run
        result.errors.append({"what": f"{REFERENCE_NAME} {case}", "error": repr(err)})
    if faiss_fn is not None:
        try:
            fai = _time_impl(FAISS_NAME, faiss_fn, queries, database, k, device="cpu",
                             warmup=size.warmup, reps=reps, memory=False)
            _record(result, case, fai)
            rivals.insert(0, (fai, "faiss"))
        except Exception as err:  # noqa: BLE001
            result.errors.append({"what": f"{FAISS_NAME} {case}", "error": repr(err)})
    # the reference itself must agree with FAISS (sanity of the yardstick)
    if len(rivals) == 2:
        ref_t, fai_t = rivals[1][0], rivals[0][0]
        problem = check_against_faiss(*ref_t.out, fai_t.out[0][:m], fai_t.out[1][:m])
        if problem:
            result.errors.append({"what": f"{REFERENCE_NAME} vs {FAISS_NAME} {case}",
                                  "error": problem})
    module = _ext.extension()
    for label, isa, note in variants:
        try:
            if isa is not None:
                module.set_cpu_isa(isa)
            if note is not None:   # the dispatcher runs the reference: time a prefix only
                ours = _time_slow(label, ours_fn, queries[:m], database, k, device="cpu",
                                  size=size, note=note)
            else:
                ours = _time_impl(label, ours_fn, queries, database, k, device="cpu",
                                  warmup=size.warmup, reps=reps, memory=True)
        except Exception as err:  # noqa: BLE001
            result.errors.append({"what": f"{label} {case}", "error": repr(err)})
            continue
        finally:
            if isa is not None:
                _restore_isa()
        _record(result, case, ours)
        valid = check_valid(ours.queries, database, *ours.out, k)
        timed = ours.queries.shape[0]
        for rival, kind in rivals:
            if kind == "faiss":
                problem = check_against_faiss(*ours.out, rival.out[0][:timed],
                                              rival.out[1][:timed])
            else:
                common = min(timed, rival.queries.shape[0])
                problem = check_identical(ours.out[0][:common], ours.out[1][:common],
                                          rival.out[0][:common], rival.out[1][:common],
                                          "torch reference")
            match, detail = _join(valid, problem)
            notes = [n for n in (note, rival.measurement.note) if n]
            result.rows.append(compare(
                family=FAMILY, device="cpu", case=case, params=params, items=nq,
                ours=ours.measurement, rival=rival.measurement, stat=stat, match=match,
                match_detail=detail, target=target if kind == "faiss" else None, notes=notes))


def roofline_inputs(n: int, nq: int, nbytes: int, k: int) -> tuple[float, float]:
    """``(compulsory bytes, 32-bit popcounts)`` of one ``hamming_topk`` call.

    bytes = database ``n * nbytes`` + queries ``nq * nbytes`` read once + results written once
    ``nq * k * (4 + 8)`` (int32 distance, int64 index); popcounts = ``nq * n * ceil(nbytes / 4)``
    (one ``__popc`` per 32-bit word of every query-code pair).
    """
    compulsory = n * nbytes + nq * nbytes + nq * k * (4 + 8)
    popcounts = nq * n * math.ceil(nbytes / 4)
    return float(compulsory), float(popcounts)


def _run_accelerator(config: BenchConfig, size: HammingSize, result: BenchResult, *,
                     device: str, backends: tuple[str, ...], props: Any) -> None:
    """The GPU cases: each of ``backends`` against the reference on ``device``, the first two
    against each other, with the roofline of a GPU described by ``props`` (``torch.cuda`` device
    properties). Takes the device and backends as arguments so the tests can drive it on CPU."""
    log = config.log
    dev = torch.device(device)
    peaks = gpu_peaks(props)
    result.params["gpu_peaks"] = peaks
    log(f"[{FAMILY} {device}] {peaks['name']}: {peaks['sms']} SMs, peak bandwidth "
        f"{(peaks['bandwidth_Bps'] or 0) / 1e12:.2f} TB/s ({peaks['bandwidth_source']}), "
        f"popcount {(peaks['popc_per_s'] or 0) / 1e12:.2f} T/s ({peaks['clock_source']})")
    ours_backends = []
    for name in backends:
        why = _backend.unavailable_reason(name, dev)
        if why is None:
            ours_backends.append(name)
        else:
            result.skip(f"subkern {name} backend ({device} rows)", why)
            log(f"NOTE: subkern {name} backend skipped: {why}")
    reference = subkern_topk("reference")
    reps = config.reps or size.reps
    for queries, database, m, cases in _case_groups(size, device):
        nbytes = queries.shape[1]
        for k, case, params in cases:
            log(f"[{FAMILY} {device}] {case}: n={size.n} nq={size.nq}")
            ref = None
            try:
                ref = _time_slow(REFERENCE_NAME, reference, queries[:m], database, k,
                                 device=device, size=size,
                                 note=f"timed on the first {m} of {size.nq} queries")
                _record(result, case, ref)
            except Exception as err:  # noqa: BLE001
                result.errors.append({"what": f"{REFERENCE_NAME} {case}", "error": repr(err)})
            bytes_, popcounts = roofline_inputs(size.n, size.nq, nbytes, k)
            roof = roofline_seconds(bytes_, popcounts, peaks)
            done: dict[str, _Timed] = {}
            for name in ours_backends:
                try:
                    ours = _time_impl(name, subkern_topk(name), queries, database, k,
                                      device=device, warmup=size.warmup, reps=reps, memory=True)
                except Exception as err:  # noqa: BLE001
                    result.errors.append({"what": f"{name} {case}", "error": repr(err)})
                    continue
                _record(result, case, ours)
                done[name] = ours
                if ref is None:
                    continue
                valid = check_valid(queries, database, *ours.out, k)
                problem = check_identical(ours.out[0][:m], ours.out[1][:m], *ref.out,
                                          "torch reference")
                match, detail = _join(valid, problem)
                result.rows.append(compare(
                    family=FAMILY, device=device, case=case, params=params, items=size.nq,
                    ours=ours.measurement, rival=ref.measurement, stat=config.stat,
                    match=match, match_detail=detail, roofline_s=roof,
                    notes=[n for n in (ref.measurement.note,) if n]))
            if len(done) >= 2:
                (name_a, a), (name_b, b) = list(done.items())[:2]
                match, detail = _join(check_valid(queries, database, *a.out, k),
                                      check_identical(*a.out, *b.out, f"{name_b} backend"))
                result.rows.append(compare(
                    family=FAMILY, device=device, case=case, params=params, items=size.nq,
                    ours=a.measurement, rival=b.measurement, stat=config.stat, match=match,
                    match_detail=detail, roofline_s=roof))
            del done
        del queries, database
        if device == "cuda":
            torch.cuda.empty_cache()


def run(config: BenchConfig) -> BenchResult:
    """Run the Hamming cases of ``config.size`` on ``config.device``."""
    size = size_for(config.device, config.size)
    result = BenchResult(FAMILY, config.device, config.size)
    result.params = {"op": OP, "n": size.n, "nq": size.nq,
                     "cases": [list(case) for case in size.cases], "warmup": size.warmup,
                     "reps": config.reps or size.reps, "slow_reps": size.slow_reps,
                     "issue_targets_vs_faiss": {case_label(*key): value
                                                for key, value in ISSUE_TARGETS.items()},
                     "data": "uniformly random uint8 codes, fixed seeds"}
    if config.device == "cuda":
        reason = environment.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"--device cuda: {reason}")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        _run_accelerator(config, size, result, device="cuda", backends=("cuda", "triton"),
                         props=props)
    else:
        _run_cpu(config, size, result)
    order = {case_label(bits, k): i for i, (bits, k) in enumerate(size.cases)}
    result.rows.sort(key=lambda row: order.get(row.case, len(order)))
    return result


__all__ = [
    "DESCRIPTION",
    "FAMILY",
    "ISSUE_TARGETS",
    "OP",
    "SIZES",
    "HammingSize",
    "case_label",
    "check_against_faiss",
    "check_identical",
    "check_valid",
    "faiss_topk",
    "import_faiss",
    "make_data",
    "random_codes",
    "recompute_distances",
    "roofline_inputs",
    "run",
    "size_for",
    "slow_query_count",
    "subkern_topk",
]
