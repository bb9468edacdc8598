"""Masked-linear benchmark: edge-popup's ``masked_linear`` forward + backward against the sort-based
reference and against a plain dense ``F.linear``.

One timed call is a training step of one layer: forward, then backward of ``y`` with a fixed
``grad_y``. ``x`` and the scores require grad, the weights are frozen (edge-popup trains scores
only); the dense rival trains its weight (``F.linear`` forward + backward with weight grad and
input grad), i.e. the work of an ordinary layer of the same shape.

Implementations:

* ``subkern[<backend>] select+fwd+bwd``: ``masked_linear`` forward + backward, exactly what a
  ``subkern.nn.SubnetLinear`` training step runs (on CPU the fused ``masked_linear_select`` op:
  selection, then mask, ``W * M`` and ``W * sign(S)`` in one pass, then the GEMM; its backward
  ``masked_linear_select_backward`` reuses ``W * M`` and ``W * sign(S)``; on CUDA
  ``select_mask`` + the Triton backend's mask-form op, with its default matmul strategy
  ``materialize``: W * M written by an elementwise pass, cuBLAS GEMMs,
  subkern/ops/matmul_strategy.py); also
  timed with the mask given (``masked_linear_with_mask``, selection excluded) and the selection
  alone (``select_mask``);
* ``subkern[triton, fused]`` (CUDA): the mask-form op on the fused Triton matmul, the mask
  applied to each weight tile as it is loaded (``W * M`` never written);
* ``reference``: ``W * GetSubnet(|S|, k)`` with a full sort per call, ``F.linear``, autograd;
* ``dense F.linear``: the dense layer (cuBLAS / MKL).

Rows: ours (with selection) vs the reference (issue target >= 2x on CPU), and ours vs dense
(target: within 1.3x, i.e. speedup >= 1 / 1.3 on CPU; >= 0.9 of cuBLAS's throughput on GPU, for
the forward matmul and for forward + backward). ``match``: ours' output and gradients equal the
reference's (allclose, fp32 / fp16 tolerances).

Cases: the BERT-size layers 768x3072 and 3072x768 with 128 and 2048 tokens (CPU, float32); GPU:
the same layers with 2048 and 8192 tokens in float16 and bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..ops import masked as mk
from ..ops.matmul_strategy import matmul_strategy, use_matmul_strategy
from . import environment
from .harness import BenchConfig, BenchResult, Measurement, compare, time_fn, time_round_robin

FAMILY = "masked_linear"
DESCRIPTION = ("masked_linear fwd+bwd (edge-popup W*topk(|S|)) vs sort-based reference and dense "
               "F.linear")
OP = "masked_linear_with_mask"
K = 0.5

#: issue targets: speedup over the reference (CPU) and ours/dense throughput ratio floor
TARGET_VS_REFERENCE = 2.0
TARGET_VS_DENSE_CPU = round(1 / 1.3, 3)
TARGET_VS_DENSE_GPU = 0.9


@dataclass(frozen=True)
class MaskedSize:
    layers: tuple[tuple[int, int], ...]     # (out_features, in_features)
    tokens: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    warmup: int
    reps: int
    slow_reps: int


BERT = ((768, 3072), (3072, 768))
SIZES: dict[str, dict[str, MaskedSize]] = {
    "cpu": {
        "tiny": MaskedSize(((96, 64),), (8,), (torch.float32,), 1, 2, 1),
        "quick": MaskedSize(BERT, (128, 2048), (torch.float32,), 1, 9, 3),
        "full": MaskedSize(BERT, (128, 2048), (torch.float32,), 3, 15, 5),
    },
    "cuda": {
        "tiny": MaskedSize(((256, 128),), (64,), (torch.float16,), 2, 3, 2),
        "quick": MaskedSize(BERT, (2048, 8192), (torch.float16, torch.bfloat16), 3, 10, 3),
        "full": MaskedSize(BERT, (2048, 8192), (torch.float16, torch.bfloat16), 5, 30, 5),
    },
}


def size_for(device: str, size: str) -> MaskedSize:
    return SIZES[device][size]


def case_label(out_f: int, in_f: int, tokens: int, dtype: torch.dtype) -> str:
    return f"{out_f}x{in_f} T={tokens} {str(dtype).replace('torch.', '')}"


def make_data(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, device: str
              ) -> dict[str, torch.Tensor]:
    """Weights with kaiming-like scale, standard-normal scores and inputs; fixed seed."""
    gen = torch.Generator().manual_seed(out_f * 7919 + in_f * 31 + tokens)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {"x": randn(tokens, in_f), "weight": randn(out_f, in_f, scale=in_f ** -0.5),
            "scores": randn(out_f, in_f), "bias": randn(out_f), "grad_y": randn(tokens, out_f)}


Step = Callable[[], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def _masked_step(data: dict[str, torch.Tensor], backend: str, mask: torch.Tensor | None,
                 strategy: str = "auto") -> Step:
    """Forward + backward of ``masked_linear`` (selection included unless ``mask`` is given),
    with the Triton backend's matmul ``strategy`` (subkern/ops/matmul_strategy.py)."""
    x = data["x"].clone().requires_grad_()
    s = data["scores"].clone().requires_grad_()

    def step():
        x.grad = s.grad = None
        with _backend.use_backend(backend), use_matmul_strategy(strategy):
            if mask is None:
                y = mk.masked_linear(x, data["weight"], s, K, data["bias"])
            else:
                y = mk.masked_linear_with_mask(x, data["weight"], s, mask, data["bias"])
            y.backward(data["grad_y"])
        return y, x.grad, s.grad

    return step


def _dense_step(data: dict[str, torch.Tensor]) -> Step:
    x = data["x"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()

    def step():
        x.grad = w.grad = None
        y = F.linear(x, w, data["bias"])
        y.backward(data["grad_y"])
        return y, x.grad, w.grad

    return step


def _dense_forward(data: dict[str, torch.Tensor]) -> Callable[[], Any]:
    return lambda: F.linear(data["x"], data["weight"], data["bias"])


def _masked_forward(data: dict[str, torch.Tensor], mask: torch.Tensor, strategy: str = "auto"
                    ) -> Callable[[], Any]:
    def forward():
        with use_matmul_strategy(strategy):
            return torch.ops.subkern.masked_linear_with_mask(data["x"], data["weight"],
                                                             data["scores"], mask, data["bias"])

    return forward


def check_match(ours: tuple, ref: tuple, dtype: torch.dtype) -> tuple[bool, str]:
    """Output, grad_x and grad_scores of ours against the reference (scaled allclose)."""
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-4)
    problems = []
    for name, a, b in zip(("y", "grad_x", "grad_scores"), ours, ref, strict=True):
        a, b = a.detach().double(), b.detach().double()
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        err = float((a - b).abs().max()) / scale if b.numel() else 0.0
        if not err <= tol:
            problems.append(f"{name}: max scaled error {err:.3g} > {tol}")
    return (not problems, "; ".join(problems) if problems else "ok")


def _measure(name: str, fn: Callable[[], Any], items: int, device: str, warmup: int, reps: int,
             note: str | None = None) -> Measurement:
    return Measurement(name, items, time_fn(fn, device, warmup=warmup, reps=reps), note=note)


def _run_case(config: BenchConfig, size: MaskedSize, result: BenchResult, out_f: int, in_f: int,
              tokens: int, dtype: torch.dtype, backend: str,
              both_strategies: bool | None = None) -> None:
    """One case. On CUDA (Triton backend) the default matmul strategy is ``materialize`` (W * M
    once, cuBLAS); ``both_strategies`` (default: on CUDA) also times the ``fused`` Triton
    matmul (mask applied on load) and, on CUDA, both forwards against cuBLAS."""
    device = config.device
    other = (device == "cuda" and backend in ("auto", "triton") if both_strategies is None
             else both_strategies)
    reps = config.reps or size.reps
    case = case_label(out_f, in_f, tokens, dtype)
    params = {"out_features": out_f, "in_features": in_f, "tokens": tokens, "k": K,
              "dtype": str(dtype), "backend": backend}
    config.log(f"[{FAMILY} {device}] {case}")
    data = make_data(out_f, in_f, tokens, dtype, device)
    mask = mk.select_mask(data["scores"], K)
    label = environment.backend_label(OP, backend)
    default = matmul_strategy(torch.device(device))
    alternative = "fused" if default == "materialize" else "materialize"
    ours_name = f"subkern[{label}, {default}]" if other else f"subkern[{label}]"

    ours_total = _masked_step(data, backend, None, default)
    ours_kernel = _masked_step(data, backend, mask, default)
    reference = _masked_step(data, "reference", None)
    dense = _dense_step(data)
    match, detail = check_match(ours_total(), reference(), dtype)

    impls = {
        "total": (f"{ours_name} select+fwd+bwd", ours_total, reps),
        "kernel": (f"{ours_name} fwd+bwd (mask given)", ours_kernel, reps),
        "select": ("select_mask", lambda: mk.select_mask(data["scores"], K), reps),
        "ref": ("reference (sort+mul+F.linear+autograd)", reference, size.slow_reps),
        "dense": ("dense F.linear fwd+bwd", dense, reps),
    }
    if other:
        # the other matmul strategy (on CUDA: the fused Triton matmul, mask applied on load)
        other_step = _masked_step(data, backend, mask, alternative)
        other_match = check_match(other_step(), reference(), dtype)
        impls["other"] = (f"subkern[{label}, {alternative}] fwd+bwd (mask given)", other_step,
                          reps)
    timed = time_round_robin(impls, device, size.warmup)
    measured = {key: Measurement(impls[key][0], tokens, timed[key]) for key in impls}
    m_total, m_kernel, m_select, m_ref, m_dense = (
        measured[key] for key in ("total", "kernel", "select", "ref", "dense"))
    for m in measured.values():
        data_json = m.to_json()
        data_json["case"] = case
        result.measurements.append(data_json)
    dense_target = TARGET_VS_DENSE_GPU if device == "cuda" else TARGET_VS_DENSE_CPU
    select_note = f"selection alone {m_select.seconds(config.stat) * 1e3:.3g} ms"
    common = {"family": FAMILY, "device": device, "case": case, "params": params,
              "items": tokens, "stat": config.stat, "match": match, "match_detail": detail}
    result.rows.append(compare(ours=m_total, rival=m_ref, notes=[select_note],
                               target=TARGET_VS_REFERENCE if device == "cpu" else None, **common))
    result.rows.append(compare(ours=m_total, rival=m_dense, target=dense_target,
                               notes=[select_note], **common))
    result.rows.append(compare(ours=m_kernel, rival=m_dense, target=dense_target,
                               notes=["mask given (selection excluded)"], **common))
    if "other" in measured:
        result.rows.append(compare(ours=measured["other"], rival=m_dense, target=dense_target,
                                   notes=[f"matmul strategy {alternative}"],
                                   **{**common, "match": other_match[0],
                                      "match_detail": other_match[1]}))
    if device == "cuda":
        m_dfwd = _measure("cuBLAS F.linear forward", _dense_forward(data), tokens, device,
                          size.warmup, reps)
        forwards = {ours_name: default}
        if other:
            forwards[f"subkern[{label}, {alternative}]"] = alternative
        for name, strategy in forwards.items():
            m_fwd = _measure(f"{name} forward (mask given)", _masked_forward(data, mask, strategy),
                             tokens, device, size.warmup, reps)
            result.rows.append(compare(ours=m_fwd, rival=m_dfwd, target=TARGET_VS_DENSE_GPU,
                                       notes=["forward only: masked matmul vs cuBLAS"],
                                       **common))


def run(config: BenchConfig) -> BenchResult:
    """Run the masked-linear cases of ``config.size`` on ``config.device``."""
    size = size_for(config.device, config.size)
    result = BenchResult(FAMILY, config.device, config.size)
    result.params = {"op": OP, "k": K, "layers": [list(layer) for layer in size.layers],
                     "tokens": list(size.tokens), "dtypes": [str(d) for d in size.dtypes],
                     "reps": config.reps or size.reps, "slow_reps": size.slow_reps,
                     "targets": {"vs_reference_cpu": TARGET_VS_REFERENCE,
                                 "vs_dense_cpu": TARGET_VS_DENSE_CPU,
                                 "vs_dense_gpu": TARGET_VS_DENSE_GPU}}
    if config.device == "cuda":
        reason = environment.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"--device cuda: {reason}")
        backend = "triton"
    else:
        backend = "cpp"
    why = _backend.unavailable_reason(backend, torch.device(config.device), OP)
    if why is not None:
        result.skip(f"subkern {backend} backend", why)
        result.notes.append(f"{backend} unavailable ({why}); timing the reference kernels")
        backend = "reference"
    for out_f, in_f in size.layers:
        for tokens in size.tokens:
            for dtype in size.dtypes:
                try:
                    _run_case(config, size, result, out_f, in_f, tokens, dtype, backend)
                except Exception as err:  # noqa: BLE001 - reported, the other cases still run
                    result.errors.append({"what": case_label(out_f, in_f, tokens, dtype),
                                          "error": f"{type(err).__name__}: {err}"})
    return result


__all__ = ["DESCRIPTION", "FAMILY", "OP", "SIZES", "MaskedSize", "case_label", "check_match",
           "make_data", "run", "size_for"]
