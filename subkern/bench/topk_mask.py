"""Top-k score masking benchmark: ``subkern.topk_mask`` against edge-popup's sort-based GetSubnet
and ``torch.kthvalue``.

Data: the weight shapes of torchvision's ResNet-50 (every conv and the fc layer, listed by
:func:`resnet50_weight_numels` from the architecture, without importing torchvision): 54 layers
of 4,096 to 2,359,296 scores, 25.5M in all. Scores are kaiming-normal-like fp32 (``randn *
sqrt(2 / fan_in)``), fixed seeds; ``k = 0.5`` (edge-popup's usual fraction) unless a case says
otherwise.

Rivals (CPU):

* ``GetSubnet (sort)``: the official code's forward, ``idx = scores.abs().flatten().sort()``,
  zero the first ``j = floor((1 - k) n)``, one the rest (scatter). Target: ours >= 10x.
* ``torch.kthvalue``: ``t = kthvalue(|s|.flatten(), j)`` then ``mask = |s| > t``. Target >= 2x.

Cases: one per distinct layer size (``quick`` takes a subset), and ``all layers``: the whole
model's masks, ours through one :func:`subkern.topk_mask_batched` call against a Python loop of
each rival over the 54 layers.

Correctness (``match``, every timed result): our mask keeps exactly ``n - floor((1 - k) n)``
entries and equals the rival's mask wherever ``|s|`` differs from our threshold
(:func:`subkern.ops.topk_mask.topk_threshold`). Random fp32 scores of the large layers do hold a
few equal values; at the threshold the rivals resolve them differently (the unstable sort picks any
of them, ``|s| > t`` drops them all), ours by the lower flat index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import backend as _backend
from ..ops.topk_mask import kept_count, topk_mask, topk_mask_batched, topk_threshold
from .harness import BenchConfig, BenchResult, Measurement, compare, time_fn

FAMILY = "topk_mask"
DESCRIPTION = ("topk_mask: edge-popup top-k score masking on ResNet-50's layer sizes vs sort-based "
               "GetSubnet / torch.kthvalue")
OP = "topk_mask"

SORT_NAME = "GetSubnet (sort)"
KTH_NAME = "torch.kthvalue"
#: Speedups the issue asks of the CPU kernel, by rival.
ISSUE_TARGETS: dict[str, float] = {SORT_NAME: 10.0, KTH_NAME: 2.0}


def resnet50_weight_numels() -> list[tuple[str, tuple[int, ...]]]:
    """``(name, weight shape)`` of every conv and linear layer of torchvision's ``resnet50``.

    Bottleneck blocks ``[3, 4, 6, 3]`` with widths 64, 128, 256, 512 and expansion 4: conv1 1x1,
    conv2 3x3, conv3 1x1, and a 1x1 downsample in the first block of each stage; the stem is a
    7x7 conv of 3 -> 64 channels and the classifier a 2048 -> 1000 linear layer.
    """
    layers: list[tuple[str, tuple[int, ...]]] = [("conv1", (64, 3, 7, 7))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3),
                                                 strict=True), start=1):
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            layers.append((f"{name}.conv1", (planes, inplanes, 1, 1)))
            layers.append((f"{name}.conv2", (planes, planes, 3, 3)))
            layers.append((f"{name}.conv3", (planes * 4, planes, 1, 1)))
            if b == 0:
                layers.append((f"{name}.downsample.0", (planes * 4, inplanes, 1, 1)))
            inplanes = planes * 4
    layers.append(("fc", (1000, 2048)))
    return layers


@dataclass(frozen=True)
class TopkSize:
    numels: tuple[int, ...]   # per-size cases (distinct layer sizes)
    batched: bool             # whether the all-layers case runs
    k: float
    warmup: int
    reps: int
    slow_reps: int            # repetitions of the sort-based rival (kthvalue gets `reps`)


def _distinct_sizes() -> tuple[int, ...]:
    sizes = {torch.Size(shape).numel() for _, shape in resnet50_weight_numels()}
    return tuple(sorted(s for s in sizes if s >= 9408))


SIZES: dict[str, TopkSize] = {
    "tiny": TopkSize((9408, 36864), False, 0.5, 1, 2, 1),
    "quick": TopkSize((9408, 147456, 589824, 2359296), True, 0.5, 2, 7, 3),
    "full": TopkSize(_distinct_sizes(), True, 0.5, 3, 15, 5),
}


def size_for(device: str, size: str) -> TopkSize:
    if device != "cpu":
        raise ValueError("the topk_mask benchmark runs on CPU (--device cpu)")
    return SIZES[size]


def make_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Kaiming-normal-like fp32 scores of a weight shape (std sqrt(2 / fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    fan_in = max(1, torch.Size(shape[1:]).numel())
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def getsubnet_sort(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The official edge-popup GetSubnet forward on ``|scores|`` (sort + scatter)."""
    out = scores.clone()
    _, idx = scores.abs().flatten().sort()
    j = int((1 - k) * scores.numel())
    flat = out.flatten()
    flat[idx[:j]] = 0
    flat[idx[j:]] = 1
    return flat.view_as(scores)


def kthvalue_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """``|s| > kthvalue(|s|, j)`` with ``j = floor((1 - k) n)`` (assumes no ties, ``j >= 1``)."""
    mag = scores.abs()
    j = int((1 - k) * scores.numel())
    t = torch.kthvalue(mag.flatten(), j).values
    return (mag > t).to(scores.dtype)


def _measure(name: str, fn: Callable[[], Any], items: int, *, warmup: int, reps: int
             ) -> tuple[Measurement, Any]:
    box: list[Any] = []

    def call() -> None:
        box[:] = [fn()]

    times = time_fn(call, "cpu", warmup=warmup, reps=reps)
    return Measurement(name, items, times), box[0]


def check_mask(scores: torch.Tensor, k: float, ours: torch.Tensor, rival: torch.Tensor
               ) -> str | None:
    """None if ``ours`` is a correct mask agreeing with ``rival`` off the threshold, else why."""
    if int(ours.sum()) != kept_count(scores.numel(), k):
        return f"ours keeps {int(ours.sum())} entries, expected {kept_count(scores.numel(), k)}"
    differ = ours != rival
    if not bool(differ.any()):
        return None
    t = topk_threshold(scores, k)
    if bool((scores.abs()[differ] == t).all()):
        return None
    return f"{int(differ.sum())} entries differ, not all at the threshold |s| == {float(t)}"


def _rows(config: BenchConfig, result: BenchResult, case: str, params: dict[str, Any], items: int,
          ours: tuple[Measurement, Any], rivals: list[tuple[Measurement, Any]],
          scores: list[torch.Tensor], k: float) -> None:
    for rival, rival_out in rivals:
        outs = ours[1] if isinstance(ours[1], list) else [ours[1]]
        routs = rival_out if isinstance(rival_out, list) else [rival_out]
        problems = [p for s, a, b in zip(scores, outs, routs, strict=True)
                    if (p := check_mask(s, k, a, b)) is not None]
        match = not problems
        ties = sum(int((a != b).sum()) for a, b in zip(outs, routs, strict=True))
        detail = (f"identical off the threshold ({ties} tie entries resolved differently)"
                  if match else "; ".join(problems[:3]))
        result.rows.append(compare(
            family=FAMILY, device="cpu", case=case, params=params, items=items, ours=ours[0],
            rival=rival, stat=config.stat, match=match, match_detail=detail,
            target=ISSUE_TARGETS.get(rival.impl)))
        data = rival.to_json()
        data["case"] = case
        result.measurements.append(data)
    data = ours[0].to_json()
    data["case"] = case
    result.measurements.append(data)


def run(config: BenchConfig) -> BenchResult:
    """Run the cases of ``config.size`` on the CPU (``--device cuda`` is reported as skipped)."""
    result = BenchResult(FAMILY, config.device, config.size)
    if config.device != "cpu":
        result.skip(f"{FAMILY} on {config.device}",
                    "this family benchmarks the CPU kernels only (the GPU kernels are checked by "
                    "tests/test_topk_mask_gpu.py)")
        return result
    size = size_for(config.device, config.size)
    layers = resnet50_weight_numels()
    result.params = {"op": OP, "k": size.k, "sizes": list(size.numels),
                     "resnet50_layers": len(layers),
                     "resnet50_scores": sum(torch.Size(s).numel() for _, s in layers),
                     "warmup": size.warmup, "reps": config.reps or size.reps,
                     "slow_reps": size.slow_reps, "issue_targets": dict(ISSUE_TARGETS),
                     "data": "kaiming-normal-like fp32 scores, fixed seeds"}
    why = _backend.unavailable_reason("cpp", torch.device("cpu"), OP)
    if why is not None:
        result.skip("subkern cpp backend (all rows)", why)
        return result
    reps = config.reps or size.reps
    k = size.k
    log = config.log
    with _backend.use_backend("cpp"):
        for numel in size.numels:
            shape = next(s for _, s in layers if torch.Size(s).numel() == numel)
            scores = make_scores(shape, seed=numel)
            case = f"n={numel}"
            log(f"[{FAMILY} cpu] {case} shape={shape} k={k}")
            ours = _measure("subkern[cpp]", lambda s=scores: topk_mask(s, k), numel,
                            warmup=size.warmup, reps=reps)
            sort = _measure(SORT_NAME, lambda s=scores: getsubnet_sort(s, k), numel,
                            warmup=1, reps=size.slow_reps)
            kth = _measure(KTH_NAME, lambda s=scores: kthvalue_mask(s, k), numel,
                           warmup=size.warmup, reps=reps)
            _rows(config, result, case, {"numel": numel, "shape": list(shape), "k": k}, numel,
                  ours, [sort, kth], [scores], k)
        if size.batched:
            all_scores = [make_scores(shape, seed=i) for i, (_, shape) in enumerate(layers)]
            total = sum(s.numel() for s in all_scores)
            case = f"all {len(layers)} layers"
            log(f"[{FAMILY} cpu] {case}: {total} scores")
            ours = _measure("subkern[cpp] batched", lambda: topk_mask_batched(all_scores, k),
                            total, warmup=size.warmup, reps=reps)
            loop = _measure("subkern[cpp] per layer",
                            lambda: [topk_mask(s, k) for s in all_scores], total,
                            warmup=size.warmup, reps=reps)
            sort = _measure(SORT_NAME, lambda: [getsubnet_sort(s, k) for s in all_scores],
                            total, warmup=1, reps=size.slow_reps)
            kth = _measure(KTH_NAME, lambda: [kthvalue_mask(s, k) for s in all_scores], total,
                           warmup=1, reps=max(size.slow_reps, reps // 2))
            _rows(config, result, case, {"layers": len(layers), "numel": total, "k": k}, total,
                  ours, [sort, kth, loop], all_scores, k)
    return result


__all__ = [
    "DESCRIPTION",
    "FAMILY",
    "ISSUE_TARGETS",
    "OP",
    "SIZES",
    "TopkSize",
    "check_mask",
    "getsubnet_sort",
    "kthvalue_mask",
    "make_scores",
    "resnet50_weight_numels",
    "run",
    "size_for",
]
