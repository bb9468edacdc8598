"""End-to-end sparse ResNet-50 inference as a pytest-benchmark suite: the cases of
``subkern bench --ops sparse_e2e`` (same networks, budgets, inputs), one benchmark per (budget,
batch, implementation).

Run: ``pytest benchmarks/test_bench_sparse_e2e.py --benchmark-only`` (``SUBKERN_BENCH_SIZE`` picks
tiny / quick / full). Benchmarks of one case share a ``group``: ours (``deploy.export`` +
``deploy.load``) next to the dense model and the dense model with BatchNorm folded.
"""

from __future__ import annotations

import os

import pytest
import torch

from subkern import deploy
from subkern.bench import sparse_e2e

SIZE = os.environ.get("SUBKERN_BENCH_SIZE", "quick").strip().lower()
_SIZE = sparse_e2e.SIZES[SIZE]
CASES = [(budget, batch) for budget in _SIZE.budgets for batch in _SIZE.batches]
_models: dict[str, dict[str, torch.nn.Module]] = {}


def _variants(budget: str, tmp_dir: str) -> dict[str, torch.nn.Module]:
    if budget not in _models:
        _models.clear()
        dense = sparse_e2e.make_model(_SIZE, budget)
        path = os.path.join(tmp_dir, f"{budget}.safetensors")
        deploy.export(dense, path)
        _models[budget] = {"dense": dense, "dense_folded": deploy.to_sparse(dense, formats="dense"),
                           "subkern": deploy.load(path)}
    return _models[budget]


@pytest.mark.parametrize("impl", ["subkern", "dense", "dense_folded"])
@pytest.mark.parametrize(("budget", "batch"), CASES, ids=[f"{b}-b{n}" for b, n in CASES])
def test_sparse_resnet50_cpu(benchmark, tmp_path_factory, budget, batch, impl):
    models = _variants(budget, str(tmp_path_factory.mktemp("sparse_e2e")))
    model = models[impl]
    x = torch.randn(batch, 3, _SIZE.resolution, _SIZE.resolution,
                    generator=torch.Generator().manual_seed(batch))
    benchmark.group = f"cpu sparse_e2e {budget} b={batch} {_SIZE.resolution}px"
    benchmark.extra_info.update({"impl": impl, "budget": budget, "batch": batch,
                                 "resolution": _SIZE.resolution})

    def fn():
        with torch.inference_mode():
            return model(x)

    y = benchmark.pedantic(fn, rounds=_SIZE.reps, warmup_rounds=_SIZE.warmup, iterations=1)
    with torch.inference_mode():
        expected = models["dense"](x)
    torch.testing.assert_close(y, expected, atol=1e-3 * max(1.0, float(expected.abs().max())),
                               rtol=1e-3)
