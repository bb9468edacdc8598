"""Sparse-weight inference benchmark: ``subkern.ops.sparse_linear`` (CSR and bitmap + values)
against dense ``F.linear`` (fp32 and bf16) and torch's own CSR product on the same weight.

Cases: STR-style unstructured sparse layers ``out x in`` = 3072 x 768 (BERT FFN) and 4096 x 11008
at 90 %, 95 % and 98 % sparsity (random pattern, fixed seed), batch 1, 16, 128 (in ``full`` also
4, and 1024 for the BERT layer). Rows per case:

* ``subkern SparseLinear`` vs ``F.linear fp32`` (targets: >= 4x at batch 1 and >= 1.5x at 128
  tokens for 90 % sparsity). On CPU "ours" is the deployed layer (:class:`subkern.nn.SparseLinear`
  in CSR format, what ``subkern.deploy.load`` returns: at batch <= 3 it runs the permuted-chunk
  kernel of :mod:`subkern.ops.sparse_permuted` where its cost model predicts a gain); the
  functional ``csr_linear`` op is timed too (``subkern[cpp] csr fp32`` in the JSON);
* the same vs ``torch.sparse CSR`` (``weight.to_sparse_csr()``; the faster of
  ``torch.sparse.mm(W, x^T)^T`` and ``F.linear(x, W_csr)``, picked per case; target >= 3x);
* the best of our formats (CSR with fp32 or bf16 values, bitmap + values; named in the row) vs
  ``F.linear bf16`` (AMX on CPUs that have it; target: faster, at >= 95 % sparsity and batch <=
  16).

Roofline (batch 1, memory bound): the bytes our format moves (``row_ptr`` + indices + values +
x + y) over a stream bandwidth measured in the same run (best of a 256 MiB ``torch`` copy, read
+ write bytes). ``efficiency = roofline time / our time``; values above 1 mean the weight was
served from a cache faster than DRAM (layers of tens of MiB stay in a large L3 across calls).

CUDA (``--device cuda``): the ``cuda`` and ``triton`` csr_linear against cuBLAS fp32 / bf16
(target: >= 2x bf16 at 95 % sparsity, 4096 x 11008, batch <= 16).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..nn.sparse import SparseLinear
from ..ops.sparse_linear import BITMAP_BACKENDS, bitmap_linear, csr_linear, pack_bitmap, pack_csr
from . import environment
from .harness import BenchConfig, BenchResult, Measurement, compare, time_with_result

FAMILY = "sparse_linear"
DESCRIPTION = ("sparse_linear: CSR / bitmap sparse weights x dense activations vs dense "
               "F.linear fp32 / bf16 and torch.sparse CSR")
OP = "csr_linear"
TARGET_BATCH1 = 4.0          # vs dense fp32 at 90 % sparsity, batch 1
TARGET_BATCH128 = 1.5        # vs dense fp32 at 90 % sparsity, batch 128
TARGET_TORCH_CSR = 3.0       # vs torch.sparse CSR, every batch
TARGET_BF16 = 1.0            # vs dense bf16 at >= 95 % sparsity, batch <= 16 (CPU)
TARGET_GPU_BF16 = 2.0        # vs cuBLAS bf16 at 95 % sparsity, batch <= 16 (GPU)


@dataclass(frozen=True)
class SparseSize:
    layers: tuple[tuple[int, int], ...]       # (out, in)
    sparsities: tuple[float, ...]
    batches: tuple[int, ...]
    big_batches: tuple[int, ...]              # extra batches for layers with in <= 4096
    warmup: int
    reps: int


#: Name of the deployed-layer measurement (CPU).
LAYER_LABEL = "SparseLinear csr fp32 (deployed layer)"
#: Name of the CUDA row-warp kernel's measurement (SUBKERN_CUDA_CSR_KERNEL=warp).
WARP_LABEL = "csr fp32 (row-warp kernel)"


SIZES: dict[str, SparseSize] = {
    "tiny": SparseSize(layers=((96, 80),), sparsities=(0.9,), batches=(1, 20), big_batches=(),
                       warmup=1, reps=2),
    "quick": SparseSize(layers=((3072, 768), (4096, 11008)), sparsities=(0.9, 0.95, 0.98),
                        batches=(1, 16, 128), big_batches=(), warmup=2, reps=10),
    "full": SparseSize(layers=((3072, 768), (4096, 11008)), sparsities=(0.9, 0.95, 0.98),
                       batches=(1, 4, 16, 128), big_batches=(1024,), warmup=3, reps=30),
}


def case_label(out: int, inp: int, sparsity: float, batch: int) -> str:
    return f"{out}x{inp} s={sparsity:.2f} b={batch}"


def make_weight(out: int, inp: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random fp32 weight with a uniformly random ``sparsity`` fraction of exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) / inp ** 0.5
    return w * (torch.rand(out, inp, generator=g) >= sparsity)


def stream_bandwidth(nbytes: int = 256 << 20, reps: int = 5, device: str = "cpu") -> float:
    """Best copy bandwidth (bytes read + written per second) of a ``nbytes`` torch copy on
    ``device`` (CUDA: timed with events, 4x the bytes so that launch cost does not count)."""
    if device == "cuda":
        nbytes *= 4
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            stop.record()
            stop.synchronize()
            best = min(best, start.elapsed_time(stop) / 1e3)
        else:
            start_s = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start_s)
    return 2 * nbytes / best


def format_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _ours_csr(backend: str, x: torch.Tensor, p: dict[str, torch.Tensor], inp: int
              ) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with _backend.use_backend(backend):
            return csr_linear(x, p["row_ptr"], p["col_idx"], p["values"], inp)

    return run


def _ours_layer(layer: SparseLinear, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    return run


def _ours_bitmap(backend: str, x: torch.Tensor, p: dict[str, torch.Tensor], inp: int
                 ) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with _backend.use_backend(backend):
            return bitmap_linear(x, p["bitmap"], p["row_ptr"], p["values"], inp)

    return run


def _torch_csr(w_csr: torch.Tensor, x: torch.Tensor, device: str, reps: int
               ) -> tuple[Measurement, str]:
    """The faster of torch's CSR products (``torch.sparse.mm`` and ``F.linear``)."""
    best: tuple[Measurement, str] | None = None
    for label, fn in (("torch.sparse.mm", lambda: torch.sparse.mm(w_csr, x.t()).t()),
                      ("F.linear(csr)", lambda: F.linear(x, w_csr))):
        try:
            m, _ = time_with_result(f"torch.sparse CSR [{label}]", fn, device, 1, reps, x.shape[0])
        except (RuntimeError, NotImplementedError):
            continue
        if best is None or m.best_s < best[0].best_s:
            best = (m, label)
    if best is None:
        raise RuntimeError("no torch CSR product supports these tensors")
    return best


def _record(result: BenchResult, m: Measurement, case: str) -> None:
    data = m.to_json()
    data["case"] = case
    result.measurements.append(data)


def _match(y: torch.Tensor, expected: torch.Tensor, rel: float) -> tuple[bool, str]:
    err = float((y.double() - expected.double()).abs().max()) if y.numel() else 0.0
    bound = rel * max(1.0, float(expected.abs().max())) if expected.numel() else rel
    return err <= bound, ("ok" if err <= bound else f"max |ours - dense| = {err:.3g} > {bound:.3g}")


def run(config: BenchConfig) -> BenchResult:
    """Run the sparse_linear cases of ``config.size`` on ``config.device``."""
    size = SIZES[config.size]
    device = config.device
    result = BenchResult(FAMILY, device, config.size)
    reps = config.reps or size.reps
    result.params = {"op": OP, "layers": [list(layer) for layer in size.layers],
                     "sparsities": list(size.sparsities), "batches": list(size.batches),
                     "warmup": size.warmup, "reps": reps, "threads": torch.get_num_threads(),
                     "data": "random unstructured sparse weights (uniform pattern), fixed seed; "
                             "x ~ N(0, 1)"}
    if device == "cuda":
        reason = environment.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"--device cuda: {reason}")
        backends: tuple[str, ...] = ("cuda", "triton")
    else:
        backends = ("cpp",)
    bandwidth = stream_bandwidth(device=device)
    result.params["stream_bandwidth_GBps"] = bandwidth / 1e9
    config.log(f"[{FAMILY}] {device} copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    ours_backends = []
    for name in backends:
        why = _backend.unavailable_reason(name, torch.device(device), OP)
        if why is None:
            ours_backends.append(name)
        else:
            result.skip(f"subkern {name} backend", why)
            config.log(f"NOTE: subkern {name} backend skipped: {why}")
    for out, inp in size.layers:
        batches = size.batches + (size.big_batches if inp <= 4096 else ())
        for sparsity in size.sparsities:
            weight = make_weight(out, inp, sparsity)
            fmt = {"csr fp32": pack_csr(weight),
                   "csr bf16-values": pack_csr(weight, value_dtype=torch.bfloat16)}
            bitmap = pack_bitmap(weight)
            w_dev = weight.to(device)
            w_bf16 = w_dev.to(torch.bfloat16)
            w_csr = w_dev.to_sparse_csr()
            layer = SparseLinear.from_dense(weight, format="csr", bias=None)
            fmt = {k: {n: t.to(device) for n, t in v.items()} for k, v in fmt.items()}
            bitmap = {n: t.to(device) for n, t in bitmap.items()}
            nnz = int(fmt["csr fp32"]["values"].numel())
            for batch in batches:
                case = case_label(out, inp, sparsity, batch)
                config.log(f"[{FAMILY} {device}] {case}")
                x = torch.randn(batch, inp,
                                generator=torch.Generator().manual_seed(batch)).to(device)
                params: dict[str, Any] = {"out": out, "in": inp, "batch": batch,
                                          "sparsity": sparsity, "nnz": nnz,
                                          "bytes_csr_fp32": format_bytes(fmt["csr fp32"]),
                                          "bytes_csr_bf16": format_bytes(fmt["csr bf16-values"]),
                                          "bytes_bitmap_fp32": format_bytes(bitmap),
                                          "bytes_dense_fp32": out * inp * 4}
                try:
                    dense32, y32 = time_with_result(
                        "F.linear fp32", partial(F.linear, x, w_dev), device, size.warmup, reps,
                        batch)
                    xb = x.to(torch.bfloat16)
                    dense16, _ = time_with_result(
                        "F.linear bf16", partial(F.linear, xb, w_bf16), device, size.warmup, reps,
                        batch)
                except Exception as err:  # noqa: BLE001 - recorded
                    result.errors.append({"what": f"dense {case}", "error": repr(err)})
                    continue
                _record(result, dense32, case)
                _record(result, dense16, case)
                tcsr = None
                if device == "cpu" and batch * nnz <= 600_000_000:
                    try:
                        tcsr, label = _torch_csr(w_csr, x, device, max(2, reps // 3))
                        params["torch_csr_impl"] = label
                        _record(result, tcsr, case)
                    except Exception as err:  # noqa: BLE001
                        result.skip(f"torch CSR {case}", repr(err))
                elif device == "cpu":
                    result.skip(f"torch CSR {case}", "too slow at this size (minutes per call)")
                for name in ours_backends:
                    timed: dict[str, Measurement] = {}
                    try:
                        for label, p in fmt.items():
                            m, y = time_with_result(
                                f"subkern[{name}] {label}", _ours_csr(name, x, p, inp), device,
                                size.warmup, reps, batch)
                            timed[label] = m
                            _record(result, m, case)
                            if label == "csr fp32":
                                y_ours = y
                        if name == "cuda" and batch >= 2:
                            # the row-warp CUDA kernel, for comparison with the default
                            # transposed-activation kernel (csrc/cuda/sparse_linear.cu)
                            with mock.patch.dict(os.environ, {"SUBKERN_CUDA_CSR_KERNEL": "warp"}):
                                m, _ = time_with_result(
                                    f"subkern[{name}] {WARP_LABEL}",
                                    _ours_csr(name, x, fmt["csr fp32"], inp), device,
                                    size.warmup, reps, batch)
                            timed[WARP_LABEL] = m
                            _record(result, m, case)
                        if name == "cpp" and device == "cpu":
                            m, y_layer = time_with_result(
                                f"subkern[{name}] {LAYER_LABEL}", _ours_layer(layer, x), device,
                                size.warmup, reps, batch)
                            timed[LAYER_LABEL] = m
                            _record(result, m, case)
                        if batch <= 16 and name in BITMAP_BACKENDS:
                            m, _ = time_with_result(f"subkern[{name}] bitmap fp32",
                                         _ours_bitmap(name, x, bitmap, inp), device,
                                         size.warmup, reps, batch)
                            timed["bitmap fp32"] = m
                            _record(result, m, case)
                    except Exception as err:  # noqa: BLE001
                        result.errors.append({"what": f"{name} {case}", "error": repr(err)})
                        continue
                    match, detail = _match(y_ours, y32, 1e-4)
                    ours = timed["csr fp32"]
                    ours_notes: list[str] = []
                    if LAYER_LABEL in timed:       # the deployed layer: what users run
                        ours = timed[LAYER_LABEL]
                        ours_notes = [f"ours = {LAYER_LABEL}"]
                        match_l, detail_l = _match(y_layer, y32, 1e-4)
                        match, detail = match and match_l, f"op: {detail}; layer: {detail_l}"
                    roofline_s = None
                    if batch == 1 and bandwidth is not None:
                        moved = params["bytes_csr_fp32"] + 4 * (inp + out)
                        roofline_s = moved / bandwidth
                    t_dense = None
                    if sparsity <= 0.9 + 1e-9 and device == "cpu":
                        t_dense = {1: TARGET_BATCH1, 128: TARGET_BATCH128}.get(batch)
                    result.rows.append(compare(
                        family=FAMILY, device=device, case=case, params=params, items=batch,
                        ours=ours, rival=dense32, stat=config.stat, match=match,
                        match_detail=detail, target=t_dense, roofline_s=roofline_s,
                        notes=ours_notes))
                    if tcsr is not None:
                        result.rows.append(compare(
                            family=FAMILY, device=device, case=case, params=params,
                            items=batch, ours=ours, rival=tcsr, stat=config.stat, match=match,
                            match_detail=detail, target=TARGET_TORCH_CSR, notes=ours_notes))
                    best_label = min(timed, key=lambda k: timed[k].seconds(config.stat))
                    t_bf16 = None
                    if sparsity >= 0.95 - 1e-9 and batch <= 16:
                        t_bf16 = TARGET_BF16 if device == "cpu" else (
                            TARGET_GPU_BF16 if (out, inp) == (4096, 11008) else None)
                    result.rows.append(compare(
                        family=FAMILY, device=device, case=case, params=params, items=batch,
                        ours=timed[best_label], rival=dense16, stat=config.stat, match=match,
                        match_detail=detail, target=t_bf16,
                        notes=[f"ours = {best_label}"]))
    return result


__all__ = ["DESCRIPTION", "FAMILY", "LAYER_LABEL", "OP", "SIZES", "SparseSize", "case_label",
           "format_bytes", "make_weight", "run", "stream_bandwidth"]
