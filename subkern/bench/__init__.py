"""Benchmarks of subkern's ops against their rivals (``subkern bench``).

Layout:

* :mod:`subkern.bench.environment`: versions, devices, CPU features, what is built and which
  backend ``auto`` picks (``subkern info`` and the ``machine`` block of every benchmark JSON);
* :mod:`subkern.bench.harness`: op-independent pieces: timers (``time.perf_counter`` on CPU, CUDA
  events with an L2 flush on GPU), peak-memory probes, the GPU roofline, the comparison
  :class:`~subkern.bench.harness.Row`, table printing and the JSON report;
* :mod:`subkern.bench.plot`: the speedup chart (PNG, matplotlib's Agg backend);
* one module per op family with its cases, e.g. :mod:`subkern.bench.hamming`.

A new op family (top-k masking, sparse matmul, ...) adds a module that defines ``FAMILY`` (its
name), ``DESCRIPTION`` and ``run(config: BenchConfig) -> BenchResult``, and lists it in
:data:`FAMILIES`; ``subkern bench --ops <name>`` then runs it and writes ``<name>_<device>.json``
and ``.png``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: op family name -> module implementing ``run(config) -> BenchResult``.
FAMILIES: dict[str, str] = {
    "hamming": "subkern.bench.hamming",
    "topk_mask": "subkern.bench.topk_mask",
    "masked_linear": "subkern.bench.masked",
    "ternary": "subkern.bench.ternary",
    "soft_threshold": "subkern.bench.soft_threshold",
    "sparse_linear": "subkern.bench.sparse_linear",
    "sparse_e2e": "subkern.bench.sparse_e2e",
}


def family_module(name: str) -> ModuleType:
    """The benchmark module of op family ``name`` (raises ``KeyError`` for unknown names)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown benchmark family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


__all__ = ["FAMILIES", "family_module"]
