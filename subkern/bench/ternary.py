"""Ternary bit-packed inference benchmark: what :class:`subkern.nn.SupermaskLinear` runs against
dense ``F.linear`` (float32 and bfloat16) on the same effective weight.

On CPU, ``subkern[cpp] SupermaskLinear`` is the layer's forward under the ``cpp`` backend: on an
AVX-512 CPU the nibble-table kernel on the prepacked layout
(:func:`subkern.ops.ternary.ternary_linear_prepacked`; the layout is built once, at the first
forward, and its cost is reported separately in ``params["prepack_ms"]``), elsewhere the bit-mask
kernel. ``subkern[cpp] bitmask`` (:func:`subkern.ops.ternary.ternary_linear` on the words) is
timed next to it for reference.

Cases: layers ``out x in`` = 4096 x 4096, 768 x 3072 and 3072 x 768 (BERT FFN), batch 1, 2, 4, 8,
16 (the deployment regime of a supermask model). The weight is a random signed-constant ternary
matrix with half of the weights kept (edge-popup's default ``k = 0.5``), fixed seed. Ours reads
2 bits per weight (mask + sign), the dense rivals 32 (fp32) or 16 (bf16) bits per weight.

Timing: the harness protocol (warm-up, best of ``reps``), caches warm as in a serving loop; on a
CPU whose last-level cache holds the dense weight (e.g. a 300 MiB L3), dense fp32 reads it from
the cache, not from memory. Rows: ours vs ``F.linear`` fp32 (the issue's target: >= 4x at batch 1)
and ours vs ``F.linear`` bf16. ``match``: ours equals the dense fp32 result within float32
summation-order tolerance.

CUDA (``--device cuda``): the ``cuda`` and ``triton`` backends against fp32 / bf16 ``F.linear``
(cuBLAS), same cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..nn.supermask import SupermaskLinear
from ..ops.ternary import pack_ternary, ternary_linear
from . import environment
from .harness import BenchConfig, BenchResult, compare, time_with_result

FAMILY = "ternary"
DESCRIPTION = ("ternary_linear: bit-packed {-c, 0, +c} layers (supermask inference) vs dense "
               "F.linear fp32 / bf16")
OP = "ternary_linear"
#: The issue's target: speedup over dense fp32 F.linear at batch 1 (CPU).
TARGET_BATCH1 = 4.0


@dataclass(frozen=True)
class TernarySize:
    layers: tuple[tuple[int, int], ...]     # (out, in)
    batches: tuple[int, ...]
    warmup: int
    reps: int


SIZES: dict[str, TernarySize] = {
    "tiny": TernarySize(layers=((256, 320),), batches=(1, 4), warmup=1, reps=2),
    "quick": TernarySize(layers=((4096, 4096), (768, 3072), (3072, 768)),
                         batches=(1, 2, 4, 8, 16), warmup=3, reps=20),
    "full": TernarySize(layers=((4096, 4096), (768, 3072), (3072, 768)),
                        batches=(1, 2, 4, 8, 16), warmup=5, reps=50),
}


def case_label(out: int, inp: int, batch: int) -> str:
    return f"{out}x{inp} b={batch}"


def make_layer(out: int, inp: int, device: str = "cpu", seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(dense fp32 weight, mask_bits, sign_bits, c)``: signed constant, half the weights kept."""
    g = torch.Generator().manual_seed(seed)
    c = 1.0 / inp ** 0.5
    sign = torch.where(torch.rand(out, inp, generator=g) < 0.5, c, -c)
    keep = torch.rand(out, inp, generator=g) < 0.5
    weight = sign * keep
    mb, sb, scale = pack_ternary(weight)
    return weight.to(device), mb.to(device), sb.to(device), scale


def _ours(backend: str, x: torch.Tensor, mb: torch.Tensor, sb: torch.Tensor, c: float,
          inp: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with _backend.use_backend(backend):
            return ternary_linear(x, mb, sb, c, inp)

    return run


def _layer_forward(layer: SupermaskLinear, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad(), _backend.use_backend("cpp"):
            return layer(x)

    return run


def _prepack_ms(layer: SupermaskLinear, x: torch.Tensor, reps: int = 3) -> float | None:
    """Best time of building the layer's prepacked layout (a one-off cost at load), in ms; None
    when the layer does not use it here."""
    import time

    best = None
    for _ in range(reps):
        layer.__dict__.pop("_prepacked_cache", None)
        start = time.perf_counter()
        _layer_forward(layer, x[:1])()
        took = time.perf_counter() - start
        best = took if best is None else min(best, took)
    if "_prepacked_cache" not in layer.__dict__:
        return None
    return None if best is None else best * 1e3


def run(config: BenchConfig) -> BenchResult:
    """Run the ternary cases of ``config.size`` on ``config.device``."""
    size = SIZES[config.size]
    device = config.device
    result = BenchResult(FAMILY, device, config.size)
    reps = config.reps or size.reps
    result.params = {"op": OP, "layers": [list(layer) for layer in size.layers],
                     "batches": list(size.batches), "warmup": size.warmup, "reps": reps,
                     "kept_fraction": 0.5, "target_vs_dense_fp32_batch1": TARGET_BATCH1,
                     "data": "random signed-constant ternary weights, fixed seed; x ~ N(0, 1)"}
    if device == "cuda":
        reason = environment.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"--device cuda: {reason}")
        backends: tuple[str, ...] = ("cuda", "triton")
    else:
        backends = ("cpp",)
    ours_backends = []
    for name in backends:
        why = _backend.unavailable_reason(name, torch.device(device), OP)
        if why is None:
            ours_backends.append(name)
        else:
            result.skip(f"subkern {name} backend", why)
            config.log(f"NOTE: subkern {name} backend skipped: {why}")
    prepack: dict[str, float | None] = {}
    result.params["prepack_ms"] = prepack
    for out, inp in size.layers:
        weight, mb, sb, c = make_layer(out, inp, device)
        weight_bf16 = weight.to(torch.bfloat16)
        layer = None
        if device == "cpu" and ours_backends:
            layer = SupermaskLinear.from_weight_and_mask(weight, weight != 0, atol=1e-5).eval()
            prepack[f"{out}x{inp}"] = _prepack_ms(layer, torch.randn(1, inp))
        for batch in size.batches:
            case = case_label(out, inp, batch)
            params: dict[str, Any] = {"out": out, "in": inp, "batch": batch,
                                      "bytes_ours": int(mb.numel() * 16 + 4),
                                      "bytes_fp32": out * inp * 4}
            config.log(f"[{FAMILY} {device}] {case}")
            x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(batch)).to(device)
            x_bf16 = x.to(torch.bfloat16)
            try:
                dense32, y32 = time_with_result(
                    "F.linear fp32", partial(F.linear, x, weight), device, size.warmup, reps,
                    batch)
                dense16, _ = time_with_result(
                    "F.linear bf16", partial(F.linear, x_bf16, weight_bf16), device, size.warmup,
                    reps, batch)
            except Exception as err:  # noqa: BLE001 - recorded
                result.errors.append({"what": f"dense {case}", "error": repr(err)})
                continue
            for m in (dense32, dense16):
                data = m.to_json()
                data["case"] = case
                result.measurements.append(data)
            for name in ours_backends:
                try:
                    if layer is not None:   # CPU: the layer (prepacked path where it applies)
                        bitmask, _ = time_with_result(f"subkern[{name}] bitmask",
                                           _ours(name, x, mb, sb, c, inp), device, size.warmup,
                                           reps, batch)
                        data = bitmask.to_json()
                        data["case"] = case
                        result.measurements.append(data)
                        ours, y = time_with_result(f"subkern[{name}] SupermaskLinear",
                                        _layer_forward(layer, x), device, size.warmup, reps,
                                        batch)
                    else:
                        ours, y = time_with_result(
                            f"subkern[{name}]", _ours(name, x, mb, sb, c, inp), device,
                            size.warmup, reps, batch)
                except Exception as err:  # noqa: BLE001
                    result.errors.append({"what": f"{name} {case}", "error": repr(err)})
                    continue
                data = ours.to_json()
                data["case"] = case
                result.measurements.append(data)
                err = float((y.double() - y32.double()).abs().max()) if y.numel() else 0.0
                bound = 1e-4 * max(1.0, float(y32.abs().max()))
                match = err <= bound
                detail = "ok" if match else f"max |ours - dense fp32| = {err:.3g} > {bound:.3g}"
                target = TARGET_BATCH1 if (batch == 1 and device == "cpu") else None
                result.rows.append(compare(
                    family=FAMILY, device=device, case=case, params=params, items=batch,
                    ours=ours, rival=dense32, stat=config.stat, match=match,
                    match_detail=detail, target=target))
                result.rows.append(compare(
                    family=FAMILY, device=device, case=case, params=params, items=batch,
                    ours=ours, rival=dense16, stat=config.stat, match=match,
                    match_detail=detail))
    return result


__all__ = ["DESCRIPTION", "FAMILY", "OP", "SIZES", "TARGET_BATCH1", "TernarySize", "case_label",
           "make_layer", "run"]
