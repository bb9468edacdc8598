"""``hamming_topk`` as a pytest-benchmark suite: the cases of ``subkern bench`` (same sizes, data
and correctness checks), one benchmark per (device, bits, k, implementation).

Run: ``pytest benchmarks/ --benchmark-only`` (quick sizes, a couple of minutes on 2 cores) or
``SUBKERN_BENCH_SIZE=full pytest benchmarks/ --benchmark-only``. Benchmarks of one case share a
``group``, so pytest-benchmark's table compares ours, FAISS and the reference side by side. The
reference is timed on a prefix of the queries (it is slow): compare ``extra_info``'s
``queries_per_s`` across implementations, not the raw times.
"""

from __future__ import annotations

import os

import pytest
import torch

from subkern import backend as _backend
from subkern.bench import hamming

# validated by conftest.py
SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()


def _cases(device: str) -> list[tuple[int, int]]:
    return list(hamming.size_for(device, SIZE).cases)


def _ids(cases: list[tuple[int, int]]) -> list[str]:
    return [f"{bits}b-k{k}" for bits, k in cases]


def _run(benchmark, fn, queries, database, k, *, rounds, warmup, group, impl, device):
    benchmark.group = group
    benchmark.extra_info.update({"impl": impl, "device": device, "queries": queries.shape[0],
                                 "n": database.shape[0], "bits": database.shape[1] * 8, "k": k})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        out = fn(queries, database, k)
        sync()
        return out

    out = benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.min > 0:
        benchmark.extra_info["queries_per_s"] = queries.shape[0] / stats.min
    return out


@pytest.mark.parametrize("impl", ["subkern", "faiss", "reference"])
@pytest.mark.parametrize(("bits", "k"), _cases("cpu"), ids=_ids(_cases("cpu")))
def test_hamming_topk_cpu(benchmark, store, bits, k, impl):
    size = hamming.size_for("cpu", SIZE)
    queries, database = store.codes("cpu", bits)
    group = f"cpu {hamming.case_label(bits, k)} n={size.n} nq={size.nq}"
    if impl == "faiss":
        fn = store.faiss_search(bits)
        d, i = _run(benchmark, fn, queries, database, k, rounds=size.reps, warmup=size.warmup,
                    group=group, impl=hamming.FAISS_NAME, device="cpu")
        assert hamming.check_valid(queries, database, d, i, k) is None
        return
    if impl == "reference" or hamming.is_slow("cpp"):
        # slow (the torch reference, also when _C has no C++ kernel yet): a prefix of the queries
        m = hamming.slow_query_count(size, bits // 8)
        queries = queries[:m]
        rounds, warmup = size.slow_reps, 0
        backend = "reference" if impl == "reference" else "cpp"
    else:
        rounds, warmup, backend = size.reps, size.warmup, "cpp"
    why = _backend.unavailable_reason(backend, torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    d, i = _run(benchmark, hamming.subkern_topk(backend), queries, database, k, rounds=rounds,
                warmup=warmup, group=group, impl=f"subkern[{backend}]", device="cpu")
    assert hamming.check_valid(queries, database, d, i, k) is None
    if hamming.import_faiss()[0] is not None:
        fd, fi = store.faiss_answer(bits, k)
        m = queries.shape[0]
        assert hamming.check_against_faiss(d, i, fd[:m], fi[:m]) is None


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton", "reference"])
@pytest.mark.parametrize(("bits", "k"), _cases("cuda"), ids=_ids(_cases("cuda")))
def test_hamming_topk_cuda(benchmark, store, bits, k, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    why = _backend.unavailable_reason(impl, torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    size = hamming.size_for("cuda", SIZE)
    queries, database = store.codes("cuda", bits)
    if impl == "reference":
        queries = queries[:hamming.slow_query_count(size, bits // 8)]
        rounds, warmup = size.slow_reps, 1
    else:
        rounds, warmup = size.reps, size.warmup
    group = f"cuda {hamming.case_label(bits, k)} n={size.n} nq={size.nq}"
    d, i = _run(benchmark, hamming.subkern_topk(impl), queries, database, k, rounds=rounds,
                warmup=warmup, group=group, impl=f"subkern[{impl}]", device="cuda")
    assert hamming.check_valid(queries, database, d, i, k) is None
    if impl != "reference":
        m = min(queries.shape[0], 64)
        rd, ri = hamming.subkern_topk("reference")(queries[:m], database, k)
        assert hamming.check_identical(d[:m], i[:m], rd, ri, "torch reference") is None
