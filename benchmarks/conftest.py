"""pytest-benchmark setup for ``pytest benchmarks/ --benchmark-only``.

Environment variables:

``SUBKERN_BENCH_SIZE=quick|full``  sizes of :mod:`subkern.bench.hamming` (default ``quick``;
                                   ``tiny`` works too, for a smoke run);
``SUBKERN_BENCH_THREADS=N``        threads for torch and FAISS alike (default ``os.cpu_count()``).

Data, FAISS indexes and FAISS's answers are built once per session and shared by the cases.
"""

from __future__ import annotations

import os

import pytest
import torch

from subkern.bench import hamming, harness

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()
if SIZE not in harness.SIZES:
    raise pytest.UsageError(f"SUBKERN_BENCH_SIZE must be one of {harness.SIZES}, got {SIZE!r}")
THREADS = int(os.environ.get("SUBKERN_BENCH_THREADS", "0") or 0) or (os.cpu_count() or 1)


def pytest_report_header(config):
    return (f"subkern benchmarks: SUBKERN_BENCH_SIZE={SIZE}, {THREADS} threads "
            f"(torch and faiss), torch {torch.__version__}")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    state = harness.set_threads(THREADS)
    yield state
    harness.restore_threads(state)


class _Store:
    """Session cache: codes per (device, bits), FAISS searchers and results per case."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.faiss_fns: dict[int, object] = {}
        self.faiss_results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def codes(self, device: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, bits)
        if key not in self.data:
            if len(self.data) >= 2:      # keep at most two code sets (memory at full size)
                self.data.clear()
            size = hamming.size_for(device, SIZE)
            self.data[key] = hamming.make_data(bits, size.n, size.nq, device)
        return self.data[key]

    def faiss_search(self, bits: int):
        faiss, why = hamming.import_faiss()
        if faiss is None:
            pytest.skip(why)
        if bits not in self.faiss_fns:
            self.faiss_fns.clear()
            _, database = self.codes("cpu", bits)
            self.faiss_fns[bits] = hamming.faiss_topk(faiss, database)
        return self.faiss_fns[bits]

    def faiss_answer(self, bits: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (bits, k) not in self.faiss_results:
            queries, database = self.codes("cpu", bits)
            self.faiss_results[(bits, k)] = self.faiss_search(bits)(queries, database, k)
        return self.faiss_results[(bits, k)]


@pytest.fixture(scope="session")
def store() -> _Store:
    return _Store()


@pytest.fixture(scope="session")
def size_name() -> str:
    return SIZE
