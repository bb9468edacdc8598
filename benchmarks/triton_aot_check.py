"""Compile every Triton kernel of ``subkern.kernels`` for an NVIDIA GPU without one.

The Triton tests run the kernels under the interpreter (``TRITON_INTERPRET=1``) on machines
without a GPU. The interpreter checks what the kernels compute, not that they compile: a kernel
can pass there and fail to lower to PTX (an op without a GPU lowering, a dtype the interpreter
lacks such as bfloat16, a shape or layout rule only the compiler enforces). This script runs
the kernels' own Python wrappers on small CPU tensors with a stand-in Triton driver that
reports an NVIDIA target (``--arch``, e.g. 90 for H100) and never launches: every
``kernel[grid](...)`` goes through Triton's real argument binding and specialization and then
``triton.compile`` down to a cubin with the ptxas that ships with Triton. Autotuned kernels
compile every configuration the autotuner would try (``SUBKERN_TRITON_AUTOTUNE=0``: the one
fixed configuration, which is what ``--quick`` sets). A kernel that needs more shared memory
than the GPU has per block (for an autotuned kernel: every configuration of a launch) is
reported as a failure.

Nothing runs on a device, so the wrappers' outputs are garbage; only compilation is checked.
Run it in its own process (it must import triton without ``TRITON_INTERPRET``):

    python benchmarks/triton_aot_check.py [--arch 90] [--quick]

``tests/test_triton_gpu_compile.py`` runs it (``--quick``) in the CPU suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

ARCHES = (80, 90)
OVERSIZED: list[str] = []


#: shared memory one block may use (bytes): sm_80 (A100) and sm_90 (H100)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _install_fake_driver(arch: int, shared_limit: int | None = None) -> list[str]:
    """Make Triton compile for ``sm_<arch>`` and skip launches; returns the compile log, and
    records in ``OVERSIZED`` every non-autotuned kernel whose shared memory exceeds the arch's
    limit (it would fail to launch; the autotuner skips such configurations itself)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner, driver, jit

    compiled: list[str] = []

    class CompileOnlyDriver:
        """The parts of a Triton driver that binding and compiling use (no CUDA needed)."""

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    real_run = jit.JITFunction.run

    autotuning: list[list[int]] = []    # shared memory of each configuration being compiled
    limit = SHARED_LIMIT[arch] if shared_limit is None else shared_limit

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        shared = kernel.metadata.shared
        compiled.append(f"{self.fn.__name__} ({len(kernel.asm['cubin'])} B cubin, "
                        f"{shared} B shared)")
        if autotuning:
            autotuning[-1].append(shared)
        elif shared > limit:
            OVERSIZED.append(f"{self.fn.__name__}: {shared} B of shared memory > {limit} B")
        return kernel

    def autotune_all(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        autotuning.append([])
        try:
            return self.warmup(*args, **kwargs)
        finally:
            sizes = autotuning.pop()
            # the autotuner skips configurations that do not fit; none fitting is a failure
            if sizes and min(sizes) > limit:
                OVERSIZED.append(f"{self.fn.fn.__name__}: every autotuning configuration needs "
                                 f"more than {limit} B of shared memory (least {min(sizes)} B)")

    jit.JITFunction.run = compile_only
    autotuner.Autotuner.run = autotune_all
    del triton
    return compiled


def _cases() -> list[tuple[str, Callable[[], object]]]:
    """(name, call) for every kernel wrapper, over the dtypes and options that select distinct
    kernel specializations."""
    import torch
    from subkern.kernels import hamming, masked_matmul, soft_threshold, sparse_linear, ternary
    from subkern.kernels import topk_mask as topk

    from subkern.ops.sparse_linear import pack_bitmap

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    cases: list[tuple[str, Callable[[], object]]] = []
    # the gradient subsets select distinct specializations (WITH_GW / WITH_S, EPILOGUE, ...)
    needs3 = ((True, True, True), (True, True, False), (False, True, False), (True, False, True))
    needs2 = ((True, True), (True, False), (False, True))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        name = str(dtype).replace("torch.", "")
        x, w, s, b = t(8, 64, dtype=dtype), t(48, 64, dtype=dtype), t(48, 64, dtype=dtype), \
            t(48, dtype=dtype)
        gy = t(8, 48, dtype=dtype)
        mask = s > 0
        # the fused masked matmul is not launched for float64 on CUDA (subkern/ops/masked.py:
        # Triton has no float64 MMA at these BLOCK_K); the elementwise passes are
        if dtype != torch.float64:
            cases.append((f"masked_linear_forward {name}",
                          lambda x=x, w=w, m=mask, b=b: masked_matmul.masked_linear_forward(
                              x, w, m, b)))
            cases += [(f"masked_linear_backward {name} need={need}",
                       lambda gy=gy, x=x, w=w, s=s, m=mask, need=need:
                       masked_matmul.masked_linear_backward(gy, x, w, s, m, need))
                      for need in needs3]
        cases += [(f"masked_weight_grads {name} need={need}",
                   lambda w=w, s=s, m=mask, need=need: masked_matmul.masked_weight_grads(
                       w, w, s, m, *need))
                  for need in needs2]
        for per_channel in (False, True):
            st = (t(48) - 1) if per_channel else torch.tensor(-1.0)
            st = st.to(dtype) if dtype == torch.float64 else st
            thr = torch.sigmoid(st).reshape(-1)
            tag = f"{name} {'per-channel' if per_channel else 'per-layer'}"
            cases += [
                (f"soft_threshold_forward {tag}",
                 lambda w=w, st=st: soft_threshold.soft_threshold_forward(w, st)),
                (f"soft_threshold_linear_forward {tag}",
                 lambda x=x, w=w, thr=thr, b=b: soft_threshold.soft_threshold_linear_forward(
                     x, w, thr, b)),
            ]
            cases += [(f"soft_threshold_grads {tag} need={need}",
                       lambda w=w, st=st, need=need: soft_threshold.soft_threshold_grads(
                           w, w, st, *need))
                      for need in needs2]
            cases += [(f"soft_threshold_linear_backward {tag} need={need}",
                       lambda gy=gy, x=x, w=w, st=st, need=need:
                       soft_threshold.soft_threshold_linear_backward(gy, x, w, st, need))
                      for need in needs3]
        cases.append((f"topk_mask {name}", lambda s=s: topk.topk_mask(s, 0.3)))
        cases.append((f"topk_mask_batched {name}",
                      lambda s=s, w=w: topk.topk_mask_batched([s, w[:5]], [0.3, 0.5])))

    out_f, in_f = 40, 70
    dense = t(out_f, in_f) * (torch.rand(out_f, in_f) < 0.3)
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int64)
    row_ptr[1:] = (dense != 0).sum(1).cumsum(0)
    cols = dense.nonzero()[:, 1]
    for idx_dtype in (torch.int16, torch.int32):
        for val_dtype in (torch.float32, torch.bfloat16, torch.float16):
            vals = dense[dense != 0].to(val_dtype)
            ci = cols.to(idx_dtype)
            tag = f"{str(idx_dtype)[6:]} {str(val_dtype)[6:]}"
            for batch in (1, 4, 40):
                cases.append((f"csr_linear {tag} batch {batch}",
                              lambda ci=ci, v=vals, n=batch: sparse_linear.csr_linear(
                                  t(n, in_f), row_ptr, ci, v, in_f, t(out_f))))
            cases.append((f"csr_matmul {tag}",
                          lambda ci=ci, v=vals: sparse_linear.csr_matmul(
                              row_ptr, ci, v, t(in_f, 33), in_f)))
    for val_dtype in (torch.float32, torch.bfloat16):
        packed = pack_bitmap(dense, val_dtype)
        cases.append((f"bitmap_linear {str(val_dtype)[6:]}",
                      lambda p=packed: sparse_linear.bitmap_linear(
                          t(3, in_f), p["bitmap"], p["row_ptr"], p["values"], in_f, t(out_f))))
    mask_bits = torch.randint(0, 255, (out_f, 12), dtype=torch.uint8)   # 70 bits in 3 words
    for dtype in (torch.float32, torch.bfloat16):
        cases.append((f"ternary_linear {str(dtype)[6:]}", lambda d=dtype: ternary.ternary_linear(
            t(3, in_f, dtype=d), mask_bits, mask_bits, 0.5, in_f, None)))
    for nbytes in (8, 32):
        q = torch.randint(0, 255, (5, nbytes), dtype=torch.uint8)
        db = torch.randint(0, 255, (300, nbytes), dtype=torch.uint8)
        cases.append((f"hamming_distance {8 * nbytes} bits",
                      lambda q=q, db=db: hamming.hamming_distance(q, db)))
        for k in (1, 10, 100):
            cases.append((f"hamming_topk {8 * nbytes} bits k={k}",
                          lambda q=q, db=db, k=k: hamming.hamming_topk(q, db, k)))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=ARCHES,
                        help="compute capability to compile for (default 90: H100)")
    parser.add_argument("--quick", action="store_true",
                        help="one configuration per autotuned kernel (SUBKERN_TRITON_AUTOTUNE=0)")
    parser.add_argument("--verbose", action="store_true", help="list every compilation")
    parser.add_argument("--shared-limit", type=int, default=None,
                        help="shared memory per block in bytes (default: the arch's)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: this check compiles for a GPU", file=sys.stderr)
        return 2
    if args.quick:
        os.environ["SUBKERN_TRITON_AUTOTUNE"] = "0"
    compiled = _install_fake_driver(args.arch, args.shared_limit)
    failures = []
    start = time.perf_counter()
    for name, call in _cases():
        before = len(compiled)
        try:
            call()
        except Exception as err:  # noqa: BLE001 - every failure is reported, then exit 1
            failures.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            continue
        if len(compiled) == before:
            failures.append(f"{name}: no kernel compiled (the wrapper took another path)")
    failures += OVERSIZED
    print(f"sm_{args.arch}: {len(compiled)} kernel compilations in "
          f"{time.perf_counter() - start:.1f} s; {len(failures)} failures")
    if args.verbose:
        print("\n".join(compiled))
    for line in dict.fromkeys(failures):   # once each, in order
        repeats = failures.count(line)
        print("FAIL", line + (f" (x{repeats})" if repeats > 1 else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
