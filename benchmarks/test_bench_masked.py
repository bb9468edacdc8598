"""``masked_linear`` forward + backward as a pytest-benchmark suite: the cases of ``subkern bench
--ops masked_linear`` (same sizes and data), one benchmark per (device, layer, tokens, dtype,
implementation), grouped by case so the table shows ours, the sort-based reference and dense
``F.linear`` side by side.

Run: ``pytest benchmarks/test_bench_masked.py --benchmark-only`` (``SUBKERN_BENCH_SIZE=tiny``
for a smoke run). Every timed result of ours is checked against the reference.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from subkern import backend as _backend
from subkern.bench import masked
from subkern.ops import masked as mk

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()  # validated by conftest.py
IMPLS = ["subkern", "subkern-mask-given", "reference", "dense"]


def _cases(device: str) -> list[tuple[int, int, int, torch.dtype]]:
    size = masked.size_for(device, SIZE)
    return [(o, i, t, d) for o, i in size.layers for t in size.tokens for d in size.dtypes]


def _ids(cases) -> list[str]:
    return [masked.case_label(*case).replace(" ", "-") for case in cases]


@functools.lru_cache(maxsize=2)
def _data(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, device: str):
    return masked.make_data(out_f, in_f, tokens, dtype, device)


def _bench(benchmark, device, case, impl, backend):
    out_f, in_f, tokens, dtype = case
    size = masked.size_for(device, SIZE)
    data = _data(out_f, in_f, tokens, dtype, device)
    if impl == "subkern":
        step = masked._masked_step(data, backend, None)
    elif impl == "subkern-mask-given":
        step = masked._masked_step(data, backend, mk.select_mask(data["scores"], masked.K))
    elif impl == "reference":
        step = masked._masked_step(data, "reference", None)
    else:
        step = masked._dense_step(data)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        out = step()
        sync()
        return out

    benchmark.group = f"{device} {masked.case_label(*case)}"
    benchmark.extra_info.update({"impl": impl, "backend": backend, "tokens": tokens,
                                 "out_features": out_f, "in_features": in_f, "k": masked.K})
    slow = impl == "reference"
    result = benchmark.pedantic(call, rounds=size.slow_reps if slow else size.reps,
                                warmup_rounds=1 if slow else size.warmup, iterations=1)
    if impl.startswith("subkern"):
        ok, detail = masked.check_match(result, masked._masked_step(data, "reference", None)(),
                                        dtype)
        assert ok, detail


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases("cpu"), ids=_ids(_cases("cpu")))
def test_masked_linear_cpu(benchmark, case, impl):
    why = _backend.unavailable_reason("cpp", torch.device("cpu"), masked.OP)
    if why is not None and impl.startswith("subkern"):
        pytest.skip(why)
    _bench(benchmark, "cpu", case, impl, "cpp")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases("cuda"), ids=_ids(_cases("cuda")))
def test_masked_linear_cuda(benchmark, case, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _bench(benchmark, "cuda", case, impl, "triton")
