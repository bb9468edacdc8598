"""``ternary_linear`` as a pytest-benchmark suite: the cases of ``subkern bench --ops ternary``
(same layers, batches and data), one benchmark per (layer, batch, implementation).

Run: ``pytest benchmarks/test_bench_ternary.py --benchmark-only`` (``SUBKERN_BENCH_SIZE`` picks
tiny / quick / full). Benchmarks of one case share a ``group``, so the table compares ours with
dense ``F.linear`` fp32 and bf16 side by side. ``supermask`` is what
:class:`subkern.nn.SupermaskLinear` runs (the prepacked nibble-table kernel on AVX-512 CPUs; the
layout is built before timing), ``subkern`` the bit-mask kernel on the packed words.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from subkern import backend as _backend
from subkern.bench import ternary
from subkern.nn.supermask import SupermaskLinear
from subkern.ops.ternary import ternary_linear

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()
_SIZE = ternary.SIZES[SIZE]
CASES = [(out, inp, batch) for out, inp in _SIZE.layers for batch in _SIZE.batches]
_layers: dict[tuple[int, int], tuple] = {}


def _layer(out: int, inp: int):
    if (out, inp) not in _layers:
        _layers.clear()
        _layers[(out, inp)] = ternary.make_layer(out, inp)
    return _layers[(out, inp)]


@pytest.mark.parametrize("impl", ["supermask", "subkern", "dense_fp32", "dense_bf16"])
@pytest.mark.parametrize(("out", "inp", "batch"), CASES,
                         ids=[f"{o}x{i}-b{b}" for o, i, b in CASES])
def test_ternary_linear_cpu(benchmark, out, inp, batch, impl):
    weight, mb, sb, c = _layer(out, inp)
    x = torch.randn(batch, inp)
    benchmark.group = f"cpu ternary {ternary.case_label(out, inp, batch)}"
    benchmark.extra_info.update({"impl": impl, "out": out, "in": inp, "batch": batch})
    if impl in ("subkern", "supermask"):
        why = _backend.unavailable_reason("cpp", torch.device("cpu"), "ternary_linear")
        if why is not None:
            pytest.skip(why)
    if impl == "supermask":
        layer = SupermaskLinear.from_weight_and_mask(weight, weight != 0, atol=1e-5).eval()
        with torch.no_grad():
            layer(x[:1])                    # builds the prepacked layout (one-off, at load)

        def fn():
            with torch.no_grad(), _backend.use_backend("cpp"):
                return layer(x)
    elif impl == "subkern":

        def fn():
            with _backend.use_backend("cpp"):
                return ternary_linear(x, mb, sb, c, inp)
    elif impl == "dense_fp32":
        def fn():
            return F.linear(x, weight)
    else:
        xb, wb = x.bfloat16(), weight.bfloat16()

        def fn():
            return F.linear(xb, wb)

    y = benchmark.pedantic(fn, rounds=_SIZE.reps, warmup_rounds=_SIZE.warmup, iterations=1)
    expected = F.linear(x, weight)
    if impl == "dense_bf16":
        torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)
    else:
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
