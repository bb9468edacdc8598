"""Soft-threshold benchmark: one STR training step of a layer (forward + backward) with the fused
ops against autograd on STR's formula and against the dense layer.

One timed call is a training step of one layer: forward, then backward of ``y`` with a fixed
``grad_y``, with ``x``, ``W``, ``s`` and the bias all requiring grad (STR trains the weight and
the threshold). The dense rival is ``F.linear`` / ``F.conv2d`` forward + backward of the same
shapes (weight, input and bias gradients), i.e. the work of an ordinary layer.

Implementations:

* ``subkern[<backend>]``: ``soft_threshold_linear`` / ``soft_threshold_conv2d`` (C++ on CPU:
  fused ``W_eff`` build + BLAS, fused gradient epilogue). On CUDA the Triton backend's two
  matmul strategies (subkern/ops/matmul_strategy.py) are both timed: ``materialize`` (the
  default: ``W_eff`` written by an elementwise kernel, cuBLAS GEMMs, one elementwise
  gradient pass) and ``fused`` (the threshold applied to the weight tiles as they load,
  ``W_eff`` never in global memory);
* ``reference``: ``sign(W) * relu(|W| - sigmoid(s))`` in torch ops, ``F.linear``, autograd;
* ``dense``: the dense layer (MKL / oneDNN on CPU, cuBLAS / cuDNN on GPU).

Rows: ours vs the reference, ours vs dense (the GPU target of the issue: the fused
soft-threshold matmul >= 0.85x cuBLAS dense, for the forward matmul and for forward +
backward). ``match``: ours' output and gradients equal the reference's (scaled allclose).

Cases: the BERT-size layers 768x3072 and 3072x768 with 128 and 2048 tokens, and a ResNet-stage
3x3 convolution (CPU float32; GPU: the linear layers with 2048 and 8192 tokens in bfloat16 and
the conv in bfloat16, cuDNN with the Triton threshold passes). ``s`` is per layer with
``sigmoid(s)`` pruning about half of the weights (a mid-training state; the step's cost does
not depend on the sparsity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..ops import soft_threshold as st
from ..ops.matmul_strategy import matmul_strategy, use_matmul_strategy
from . import environment
from .harness import BenchConfig, BenchResult, Measurement, compare, time_fn, time_round_robin

FAMILY = "soft_threshold"
DESCRIPTION = ("STR soft-threshold linear/conv2d training step (fwd+bwd) vs autograd reference "
               "and dense F.linear/F.conv2d")
OP = "soft_threshold_linear"
CONV_OP = "soft_threshold_grads"

#: issue target on GPU: fused soft-threshold matmul >= 0.85x cuBLAS dense
TARGET_VS_DENSE_GPU = 0.85


@dataclass(frozen=True)
class ConvCase:
    batch: int
    channels: int
    size: int          # height = width
    kernel: int


@dataclass(frozen=True)
class STSize:
    layers: tuple[tuple[int, int], ...]     # (out_features, in_features)
    tokens: tuple[int, ...]
    convs: tuple[ConvCase, ...]
    dtypes: tuple[torch.dtype, ...]
    warmup: int
    reps: int
    slow_reps: int


BERT = ((768, 3072), (3072, 768))
SIZES: dict[str, dict[str, STSize]] = {
    "cpu": {
        "tiny": STSize(((96, 64),), (8,), (ConvCase(2, 8, 8, 3),), (torch.float32,), 1, 2, 1),
        "quick": STSize(BERT, (128, 2048), (ConvCase(8, 128, 28, 3),), (torch.float32,),
                        1, 7, 3),
        "full": STSize(BERT, (128, 2048), (ConvCase(8, 128, 28, 3), ConvCase(32, 64, 56, 3)),
                       (torch.float32,), 3, 15, 5),
    },
    "cuda": {
        "tiny": STSize(((256, 128),), (64,), (ConvCase(2, 16, 8, 3),), (torch.bfloat16,),
                       2, 3, 2),
        "quick": STSize(BERT, (2048, 8192), (ConvCase(64, 128, 28, 3),), (torch.bfloat16,),
                        3, 10, 3),
        "full": STSize(BERT, (2048, 8192), (ConvCase(64, 128, 28, 3), ConvCase(128, 64, 56, 3)),
                       (torch.bfloat16, torch.float16), 5, 30, 5),
    },
}


def size_for(device: str, size: str) -> STSize:
    return SIZES[device][size]


def case_label(out_f: int, in_f: int, tokens: int, dtype: torch.dtype) -> str:
    return f"{out_f}x{in_f} T={tokens} {str(dtype).replace('torch.', '')}"


def conv_label(conv: ConvCase, dtype: torch.dtype) -> str:
    return (f"conv{conv.kernel}x{conv.kernel} {conv.channels}ch {conv.size}x{conv.size} "
            f"N={conv.batch} {str(dtype).replace('torch.', '')}")


#: s with sigmoid(s) = 0.675 / sqrt(fan_in): about half of N(0, 1 / fan_in) weights pruned
def _s_for(fan_in: int) -> float:
    g = 0.675 * fan_in ** -0.5
    return float(torch.logit(torch.tensor(g, dtype=torch.float64)))


def make_data(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, device: str
              ) -> dict[str, torch.Tensor]:
    """Linear case: kaiming-scale weights, ``s`` pruning about half, inputs; fixed seed."""
    gen = torch.Generator().manual_seed(out_f * 7919 + in_f * 31 + tokens)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {"x": randn(tokens, in_f), "weight": randn(out_f, in_f, scale=in_f ** -0.5),
            "s": torch.tensor(_s_for(in_f), device=device, dtype=torch.float32),
            "bias": randn(out_f), "grad_y": randn(tokens, out_f)}


def make_conv_data(conv: ConvCase, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Conv case (stride 1, same padding): weights, ``s``, input and ``grad_y``; fixed seed."""
    gen = torch.Generator().manual_seed(conv.batch * 131 + conv.channels * 7 + conv.size)
    fan_in = conv.channels * conv.kernel ** 2

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    c, n, k, hw = conv.channels, conv.batch, conv.kernel, conv.size
    return {"x": randn(n, c, hw, hw), "weight": randn(c, c, k, k, scale=fan_in ** -0.5),
            "s": torch.tensor(_s_for(fan_in), device=device, dtype=torch.float32),
            "bias": randn(c), "grad_y": randn(n, c, hw, hw), "padding": k // 2}


Step = Callable[[], tuple[torch.Tensor, ...]]


def _leaves(data: dict[str, Any]) -> list[torch.Tensor]:
    return [data[k].clone().requires_grad_() for k in ("x", "weight", "s", "bias")]


def _step(data: dict[str, Any], fn: Callable[..., torch.Tensor], backend: str | None,
          strategy: str = "auto") -> Step:
    """Forward + backward of ``fn(x, weight, s, bias)`` (the Triton backend's matmul
    ``strategy``, subkern/ops/matmul_strategy.py); returns y and the four gradients."""
    leaves = _leaves(data)

    def step():
        for t in leaves:
            t.grad = None
        with use_matmul_strategy(strategy):
            if backend is None:
                y = fn(*leaves)
            else:
                with _backend.use_backend(backend):
                    y = fn(*leaves)
            y.backward(data["grad_y"])
        return (y, *(t.grad for t in leaves))

    return step


def _linear_forward(data: dict[str, Any]) -> Callable[[str], Callable[[], Any]]:
    """Ours' forward (the op, no autograd) for a given matmul strategy."""
    def for_strategy(strategy: str) -> Callable[[], Any]:
        def forward():
            with use_matmul_strategy(strategy):
                return torch.ops.subkern.soft_threshold_linear(data["x"], data["weight"],
                                                                data["s"], data["bias"])

        return forward

    return for_strategy


def _linear_fns() -> dict[str, Callable[..., torch.Tensor]]:
    return {"ours": st.soft_threshold_linear, "ref": st.reference_soft_threshold_linear,
            "dense": lambda x, w, s, b: F.linear(x, w, b)}


def _conv_fns(padding: int) -> dict[str, Callable[..., torch.Tensor]]:
    return {"ours": lambda x, w, s, b: st.soft_threshold_conv2d(x, w, s, b, padding=padding),
            "ref": lambda x, w, s, b: st.reference_soft_threshold_conv2d(x, w, s, b,
                                                                         padding=padding),
            "dense": lambda x, w, s, b: F.conv2d(x, w, b, padding=padding)}


def check_match(ours: tuple, ref: tuple, dtype: torch.dtype) -> tuple[bool, str]:
    """y, grad_x, grad_weight, grad_s, grad_bias of ours against the reference (scaled)."""
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-4)
    problems = []
    names = ("y", "grad_x", "grad_weight", "grad_s", "grad_bias")
    for name, a, b in zip(names, ours, ref, strict=True):
        a, b = a.detach().double(), b.detach().double()
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        err = float((a - b).abs().max()) / scale if b.numel() else 0.0
        if not err <= tol:
            problems.append(f"{name}: max scaled error {err:.3g} > {tol}")
    return (not problems, "; ".join(problems) if problems else "ok")


def _run_case(config: BenchConfig, size: STSize, result: BenchResult, case: str,
              params: dict[str, Any], items: int, data: dict[str, Any],
              fns: dict[str, Callable[..., torch.Tensor]], dtype: torch.dtype, backend: str,
              op: str, dense_name: str,
              forward: tuple[Callable[[str], Callable[[], Any]], Callable[[], Any]] | None,
              both_strategies: bool = False) -> None:
    """One case; ``both_strategies``: the Triton backend's two matmul strategies are timed
    (``forward``: ours' forward for a strategy, and the dense forward)."""
    device = config.device
    reps = config.reps or size.reps
    config.log(f"[{FAMILY} {device}] {case}")
    label = environment.backend_label(op, backend)
    default = matmul_strategy(torch.device(device))
    alternative = "fused" if default == "materialize" else "materialize"
    ours_name = f"subkern[{label}, {default}]" if both_strategies else f"subkern[{label}]"
    ours = _step(data, fns["ours"], backend, default)
    reference = _step(data, fns["ref"], None)
    dense = _step(data, fns["dense"], None)
    match, detail = check_match(ours(), reference(), dtype)
    impls = {
        "ours": (f"{ours_name} fwd+bwd", ours, reps),
        "ref": ("reference (torch ops + autograd) fwd+bwd", reference, size.slow_reps),
        "dense": (f"dense {dense_name} fwd+bwd", dense, reps),
    }
    if both_strategies:
        other_step = _step(data, fns["ours"], backend, alternative)
        other_match = check_match(other_step(), reference(), dtype)
        impls["other"] = (f"subkern[{label}, {alternative}] fwd+bwd", other_step, reps)
    timed = time_round_robin(impls, device, size.warmup)
    measured = {key: Measurement(impls[key][0], items, timed[key]) for key in impls}
    for m in measured.values():
        data_json = m.to_json()
        data_json["case"] = case
        result.measurements.append(data_json)
    common = {"family": FAMILY, "device": device, "case": case, "params": params,
              "items": items, "stat": config.stat, "match": match, "match_detail": detail}
    dense_target = TARGET_VS_DENSE_GPU if device == "cuda" else None
    m_ours, m_dense = measured["ours"], measured["dense"]
    result.rows.append(compare(ours=m_ours, rival=measured["ref"], **common))
    result.rows.append(compare(ours=m_ours, rival=m_dense, target=dense_target, **common))
    if "other" in measured:
        result.rows.append(compare(ours=measured["other"], rival=m_dense, target=dense_target,
                                   notes=[f"matmul strategy {alternative}"],
                                   **{**common, "match": other_match[0],
                                      "match_detail": other_match[1]}))
    if forward is not None:
        ours_fwd, dense_fwd = forward
        m_dfwd = Measurement(f"dense {dense_name} forward", items,
                             time_fn(dense_fwd, device, warmup=size.warmup, reps=reps))
        forwards = {ours_name: default}
        if both_strategies:
            forwards[f"subkern[{label}, {alternative}]"] = alternative
        for name, strategy in forwards.items():
            m_fwd = Measurement(f"{name} forward", items,
                                time_fn(ours_fwd(strategy), device, warmup=size.warmup,
                                        reps=reps))
            result.rows.append(compare(ours=m_fwd, rival=m_dfwd, target=TARGET_VS_DENSE_GPU,
                                       notes=["forward only: soft-threshold matmul vs cuBLAS"],
                                       **common))


def run(config: BenchConfig) -> BenchResult:
    """Run the soft-threshold cases of ``config.size`` on ``config.device``."""
    size = size_for(config.device, config.size)
    result = BenchResult(FAMILY, config.device, config.size)
    result.params = {"ops": [OP, "soft_threshold_conv2d"],
                     "layers": [list(layer) for layer in size.layers],
                     "tokens": list(size.tokens),
                     "convs": [conv_label(c, torch.float32) for c in size.convs],
                     "dtypes": [str(d) for d in size.dtypes],
                     "reps": config.reps or size.reps, "slow_reps": size.slow_reps,
                     "targets": {"vs_dense_gpu": TARGET_VS_DENSE_GPU}}
    if config.device == "cuda":
        reason = environment.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"--device cuda: {reason}")
        backend = conv_backend = "triton"   # conv: cuDNN + the Triton threshold passes
    else:
        backend = conv_backend = "cpp"
    why = _backend.unavailable_reason(backend, torch.device(config.device), OP)
    if why is not None:
        result.skip(f"subkern {backend} backend", why)
        result.notes.append(f"{backend} unavailable ({why}); timing the reference kernels")
        backend = conv_backend = "reference"
    for dtype in size.dtypes:
        for out_f, in_f in size.layers:
            for tokens in size.tokens:
                case = case_label(out_f, in_f, tokens, dtype)
                try:
                    data = make_data(out_f, in_f, tokens, dtype, config.device)
                    forward = None
                    if config.device == "cuda":
                        forward = (_linear_forward(data),
                                   lambda d=data: F.linear(d["x"], d["weight"], d["bias"]))
                    params = {"out_features": out_f, "in_features": in_f, "tokens": tokens,
                              "dtype": str(dtype), "backend": backend}
                    _run_case(config, size, result, case, params, tokens, data, _linear_fns(),
                              dtype, backend, OP, "F.linear", forward,
                              both_strategies=backend == "triton")
                except Exception as err:  # noqa: BLE001 - reported, the other cases still run
                    result.errors.append({"what": case, "error": f"{type(err).__name__}: {err}"})
        for conv in size.convs:
            case = conv_label(conv, dtype)
            try:
                data = make_conv_data(conv, dtype, config.device)
                params = {"batch": conv.batch, "channels": conv.channels, "size": conv.size,
                          "kernel": conv.kernel, "dtype": str(dtype), "backend": conv_backend}
                _run_case(config, size, result, case, params, conv.batch, data,
                          _conv_fns(data["padding"]), dtype, conv_backend, CONV_OP,
                          "F.conv2d", None)
            except Exception as err:  # noqa: BLE001 - reported, the other cases still run
                result.errors.append({"what": case, "error": f"{type(err).__name__}: {err}"})
    return result


__all__ = ["DESCRIPTION", "FAMILY", "OP", "SIZES", "ConvCase", "STSize", "case_label",
           "check_match", "conv_label", "make_conv_data", "make_data", "run", "size_for"]
