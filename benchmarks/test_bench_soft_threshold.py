"""STR soft-threshold training step (forward + backward) as a pytest-benchmark suite: the cases of
``subkern bench --ops soft_threshold`` (same sizes and data), one benchmark per (device, case,
implementation), grouped by case so the table shows ours, the autograd reference and the dense
layer side by side.

Run: ``pytest benchmarks/test_bench_soft_threshold.py --benchmark-only``
(``SUBKERN_BENCH_SIZE=tiny`` for a smoke run). Every timed result of ours is checked against the
reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from subkern import backend as _backend
from subkern.bench import soft_threshold as stb

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()  # validated by conftest.py
IMPLS = ["subkern", "reference", "dense"]


def _cases(device: str) -> list[tuple]:
    size = stb.size_for(device, SIZE)
    linear = [("linear", (o, i, t, d)) for d in size.dtypes for o, i in size.layers
              for t in size.tokens]
    conv = [("conv", (c, d)) for d in size.dtypes for c in size.convs]
    return linear + conv


def _ids(cases) -> list[str]:
    return [(stb.case_label(*args) if kind == "linear" else stb.conv_label(*args))
            .replace(" ", "-") for kind, args in cases]


def _bench(benchmark, device, case, impl, backend):
    kind, args = case
    size = stb.size_for(device, SIZE)
    if kind == "linear":
        out_f, in_f, tokens, dtype = args
        data = stb.make_data(out_f, in_f, tokens, dtype, device)
        fns = stb._linear_fns()
        label = stb.case_label(*args)
        info = {"out_features": out_f, "in_features": in_f, "tokens": tokens}
    else:
        conv, dtype = args
        data = stb.make_conv_data(conv, dtype, device)
        fns = stb._conv_fns(data["padding"])
        label = stb.conv_label(*args)
        info = {"batch": conv.batch, "channels": conv.channels, "size": conv.size}
    key = {"subkern": "ours", "reference": "ref", "dense": "dense"}[impl]
    step = stb._step(data, fns[key], backend if impl == "subkern" else None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        out = step()
        sync()
        return out

    benchmark.group = f"{device} {label}"
    benchmark.extra_info.update({"impl": impl, "backend": backend, **info})
    slow = impl == "reference"
    result = benchmark.pedantic(call, rounds=size.slow_reps if slow else size.reps,
                                warmup_rounds=1 if slow else size.warmup, iterations=1)
    if impl == "subkern":
        ok, detail = stb.check_match(result, stb._step(data, fns["ref"], None)(), dtype)
        assert ok, detail


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases("cpu"), ids=_ids(_cases("cpu")))
def test_soft_threshold_cpu(benchmark, case, impl):
    why = _backend.unavailable_reason("cpp", torch.device("cpu"), stb.OP)
    if why is not None and impl == "subkern":
        pytest.skip(why)
    _bench(benchmark, "cpu", case, impl, "cpp")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases("cuda"), ids=_ids(_cases("cuda")))
def test_soft_threshold_cuda(benchmark, case, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _bench(benchmark, "cuda", case, impl, "triton")
