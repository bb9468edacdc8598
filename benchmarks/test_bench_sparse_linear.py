"""``csr_linear`` / ``bitmap_linear`` as a pytest-benchmark suite: the cases of ``subkern bench
--ops sparse_linear`` (same layers, sparsities, batches and data), one benchmark per (case,
implementation).

Run: ``pytest benchmarks/test_bench_sparse_linear.py --benchmark-only`` (``SUBKERN_BENCH_SIZE``
picks tiny / quick / full). Benchmarks of one case share a ``group``, so the table compares our
CSR (fp32 and bf16 values) and bitmap kernels with dense ``F.linear`` fp32 / bf16 and torch's CSR
product side by side.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from subkern import backend as _backend
from subkern.bench import sparse_linear as bench
from subkern.ops.sparse_linear import bitmap_linear, csr_linear, pack_bitmap, pack_csr

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()
_SIZE = bench.SIZES[SIZE]
CASES = [(out, inp, s, b) for out, inp in _SIZE.layers for s in _SIZE.sparsities
         for b in _SIZE.batches + (_SIZE.big_batches if inp <= 4096 else ())]
IMPLS = ["csr_fp32", "csr_bf16_values", "bitmap_fp32", "dense_fp32", "dense_bf16", "torch_csr"]
_layers: dict[tuple[int, int, float], dict] = {}


def _layer(out: int, inp: int, sparsity: float) -> dict:
    key = (out, inp, sparsity)
    if key not in _layers:
        _layers.clear()
        w = bench.make_weight(out, inp, sparsity)
        _layers[key] = {"w": w, "csr": pack_csr(w),
                        "csr16": pack_csr(w, value_dtype=torch.bfloat16),
                        "bitmap": pack_bitmap(w)}
    return _layers[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("out", "inp", "sparsity", "batch"), CASES,
                         ids=[f"{o}x{i}-s{s}-b{b}" for o, i, s, b in CASES])
def test_sparse_linear_cpu(benchmark, out, inp, sparsity, batch, impl):
    layer = _layer(out, inp, sparsity)
    w = layer["w"]
    x = torch.randn(batch, inp)
    benchmark.group = f"cpu sparse_linear {bench.case_label(out, inp, sparsity, batch)}"
    benchmark.extra_info.update({"impl": impl, "out": out, "in": inp, "sparsity": sparsity,
                                 "batch": batch})
    if impl in ("csr_fp32", "csr_bf16_values", "bitmap_fp32"):
        why = _backend.unavailable_reason("cpp", torch.device("cpu"), "csr_linear")
        if why is not None:
            pytest.skip(why)
    if impl == "bitmap_fp32" and batch > 16:
        pytest.skip("the bitmap format serves batch <= 16 (see choose_format)")
    if impl in ("csr_fp32", "csr_bf16_values"):
        p = layer["csr"] if impl == "csr_fp32" else layer["csr16"]

        def fn():
            with _backend.use_backend("cpp"):
                return csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], inp)
    elif impl == "bitmap_fp32":
        p = layer["bitmap"]

        def fn():
            with _backend.use_backend("cpp"):
                return bitmap_linear(x, p["bitmap"], p["row_ptr"], p["values"], inp)
    elif impl == "dense_fp32":
        def fn():
            return F.linear(x, w)
    elif impl == "dense_bf16":
        xb, wb = x.bfloat16(), w.bfloat16()

        def fn():
            return F.linear(xb, wb)
    else:
        w_csr = w.to_sparse_csr()

        def fn():
            return torch.sparse.mm(w_csr, x.t()).t()

    y = benchmark.pedantic(fn, rounds=_SIZE.reps, warmup_rounds=_SIZE.warmup, iterations=1)
    expected = F.linear(x, w)
    if impl == "dense_bf16":
        torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)
    elif impl == "csr_bf16_values":
        torch.testing.assert_close(y, F.linear(x, w.bfloat16().float()), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
