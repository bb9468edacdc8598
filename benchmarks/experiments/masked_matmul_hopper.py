"""GPU experiment: where does edge-popup's fused masked matmul lose against cuBLAS?

    python benchmarks/experiments/masked_matmul_hopper.py      # needs a CUDA GPU

Times (CUDA-graph replay, so host launch cost does not count; ``do_bench`` loop beside it)
``y = x (W * M)^T`` in float16 for BERT-FFN shapes, five ways: cuBLAS ``F.linear`` on the dense
weight (the ceiling), subkern's op (``masked_linear_with_mask``, Triton on CUDA), a plain Triton
tutorial matmul with no mask (what Triton reaches on this GPU), the mask applied to the ``B``
(weight^T) tile in registers (subkern's current kernel), and the transposed formulation
``y^T = (W * M) x^T`` with the mask applied to the ``A`` tile. Results of a run on an H100 are
in ``benchmarks/results/gpu/README.md``. An experiment, not part of the package.
"""
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from subkern.kernels._matmul_common import grouped_tile
from triton.testing import do_bench, do_bench_cudagraph

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "G": 8}, num_stages=s, num_warps=w)
           for bm, bn, bk, s, w in [(128, 128, 64, 3, 8), (128, 256, 64, 3, 8),
                                    (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]]


@triton.autotune(configs=CONFIGS, key=["P", "Q", "R", "MODE"])
@triton.jit
def _kern(a_ptr, b_ptr, m_ptr, c_ptr, P, Q, R, sap, sar, sbr, sbq, scp, scq,
          MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          G: tl.constexpr):
    # C[P,Q] = A[P,R] @ B[R,Q]; MODE 0 dense, 1 mask on B (m has B's strides),
    # 2 mask on A (m has A's strides)
    pid_m, pid_n = grouped_tile(tl.program_id(0), P, Q, BM, BN, G)
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    ok = tl.arange(0, BK)
    a_ptrs = a_ptr + om[:, None] * sap + ok[None, :] * sar
    b_ptrs = b_ptr + ok[:, None] * sbr + on[None, :] * sbq
    if MODE == 1:
        m_ptrs = m_ptr + ok[:, None] * sbr + on[None, :] * sbq
    if MODE == 2:
        m_ptrs = m_ptr + om[:, None] * sap + ok[None, :] * sar
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(R, BK)):
        a = tl.load(a_ptrs, mask=ok[None, :] < R - k * BK, other=0.0)
        b = tl.load(b_ptrs, mask=ok[:, None] < R - k * BK, other=0.0)
        if MODE == 1:
            keep = tl.load(m_ptrs, mask=ok[:, None] < R - k * BK, other=0)
            b = b * keep.to(b.dtype)
            m_ptrs += BK * sbr
        if MODE == 2:
            keep = tl.load(m_ptrs, mask=ok[None, :] < R - k * BK, other=0)
            a = a * keep.to(a.dtype)
            m_ptrs += BK * sar
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * sar
        b_ptrs += BK * sbr
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + om[:, None] * scp + on[None, :] * scq, c,
             mask=(om[:, None] < P) & (on[None, :] < Q))


def run(a, b, m, c, mode):
    P, R = a.shape
    Q = b.shape[1]
    mm = m if m is not None else a
    _kern[lambda meta: (triton.cdiv(P, meta["BM"]) * triton.cdiv(Q, meta["BN"]),)](
        a, b, mm, c, P, Q, R, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), MODE=mode)
    return c


def bench_shape(T: int, N: int, K: int, dt: torch.dtype) -> None:
    x = torch.randn(T, K, device="cuda", dtype=dt)
    w = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
    scores = torch.randn(N, K, device="cuda", dtype=dt)
    mask = torch.rand(N, K, device="cuda") < 0.5
    m8 = mask.view(torch.uint8)
    y = torch.empty(T, N, device="cuda", dtype=dt)
    ref = F.linear(x, w * mask)
    variants = {
        "cuBLAS F.linear": lambda: F.linear(x, w),
        "subkern op masked_linear_with_mask": lambda: torch.ops.subkern.masked_linear_with_mask(
            x, w, scores, mask, None),
        "triton dense (tutorial)": lambda: run(x, w.t(), None, y, 0),
        "triton mask on B (ours now)": lambda: run(x, w.t(), m8.t(), y, 1),
        "triton mask on A (transposed)": lambda: run(w, x.t(), m8, y.t(), 2).t(),
    }
    base = None
    for name, fn in variants.items():
        try:
            out = fn()
            torch.cuda.synchronize()
            if "dense" not in name and "cuBLAS" not in name:  # the masked variants
                err = (out.float() - ref.float()).abs().max().item()
                if err > 0.05:
                    print(f"  !! {name}: max err {err}")
            t_loop = do_bench(fn, warmup=25, rep=100)
            t_graph = do_bench_cudagraph(fn, rep=100)
        except Exception as exc:  # noqa: BLE001
            print(f"T={T} {N}x{K:<12} {name:<34} FAILED {type(exc).__name__}: {exc}"[:300])
            continue
        if base is None:
            base = t_graph
        print(f"T={T} {N}x{K:<12} {name:<34} {t_loop:9.4f} {t_graph:9.4f} "
              f"{base / t_graph:15.2f}x", flush=True)


def main() -> None:
    import subkern  # noqa: F401  (registers the ops)
    torch.manual_seed(0)
    print(f"{'case':<24} {'variant':<34} {'ms(loop)':>9} {'ms(graph)':>9} {'vs cuBLAS(graph)':>16}")
    for T, N, K in [(8192, 768, 3072), (8192, 3072, 768), (8192, 4096, 4096), (2048, 768, 3072)]:
        bench_shape(T, N, K, torch.float16)


if __name__ == "__main__":
    sys.exit(main())
