"""``topk_mask`` as a pytest-benchmark suite: the cases of ``subkern bench --ops topk_mask`` (same
ResNet-50 layer sizes, data and correctness checks), one benchmark per (case, implementation).

Run: ``pytest benchmarks/test_bench_topk_mask.py --benchmark-only`` (``SUBKERN_BENCH_SIZE=full``
for every distinct layer size). Benchmarks of one case share a ``group``, so pytest-benchmark's
table compares ours, the sort-based GetSubnet and ``torch.kthvalue`` side by side.
"""

from __future__ import annotations

import os

import pytest
import torch

from subkern import backend as _backend
from subkern.bench import topk_mask as bench
from subkern.ops.topk_mask import topk_mask, topk_mask_batched

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()  # validated by conftest.py
CONFIG = bench.size_for("cpu", SIZE)
LAYERS = bench.resnet50_weight_numels()

IMPLS = {
    "subkern": lambda s, k: topk_mask(s, k),
    "getsubnet_sort": bench.getsubnet_sort,
    "kthvalue": bench.kthvalue_mask,
}


def _needs_cpp() -> None:
    why = _backend.unavailable_reason("cpp", torch.device("cpu"), "topk_mask")
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("numel", CONFIG.numels, ids=lambda n: f"n{n}")
def test_topk_mask_layer(benchmark, numel, impl):
    _needs_cpp()
    shape = next(s for _, s in LAYERS if torch.Size(s).numel() == numel)
    scores = bench.make_scores(shape, seed=numel)
    benchmark.group = f"topk_mask n={numel} k={CONFIG.k}"
    benchmark.extra_info.update({"impl": impl, "numel": numel, "k": CONFIG.k})
    fast = impl == "subkern"
    with _backend.use_backend("cpp"):
        out = benchmark.pedantic(IMPLS[impl], args=(scores, CONFIG.k),
                                 rounds=CONFIG.reps if fast else CONFIG.slow_reps,
                                 warmup_rounds=CONFIG.warmup if fast else 1, iterations=1)
        ours = topk_mask(scores, CONFIG.k)
    assert bench.check_mask(scores, CONFIG.k, ours, out) is None


@pytest.mark.parametrize("impl", ["subkern_batched", "subkern_loop", "getsubnet_sort",
                                  "kthvalue"])
def test_topk_mask_all_resnet50_layers(benchmark, impl):
    _needs_cpp()
    if not CONFIG.batched:
        pytest.skip(f"size {SIZE!r} has no all-layers case")
    scores = [bench.make_scores(shape, seed=i) for i, (_, shape) in enumerate(LAYERS)]
    k = CONFIG.k
    fns = {
        "subkern_batched": lambda: topk_mask_batched(scores, k),
        "subkern_loop": lambda: [topk_mask(s, k) for s in scores],
        "getsubnet_sort": lambda: [bench.getsubnet_sort(s, k) for s in scores],
        "kthvalue": lambda: [bench.kthvalue_mask(s, k) for s in scores],
    }
    benchmark.group = f"topk_mask all {len(LAYERS)} ResNet-50 layers k={k}"
    benchmark.extra_info.update({"impl": impl, "layers": len(LAYERS),
                                 "numel": sum(s.numel() for s in scores)})
    fast = impl.startswith("subkern")
    with _backend.use_backend("cpp"):
        outs = benchmark.pedantic(fns[impl], rounds=CONFIG.reps if fast else CONFIG.slow_reps,
                                  warmup_rounds=1, iterations=1)
        ours = topk_mask_batched(scores, k)
    for s, a, b in zip(scores, ours, outs, strict=True):
        assert bench.check_mask(s, k, a, b) is None
