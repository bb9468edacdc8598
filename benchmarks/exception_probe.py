"""Where do C++ errors raised inside ``subkern._C`` go? A diagnostic for the GPU check.

On one GPU machine (torch 2.11 + CUDA 13, gcc 13.3, glibc 2.39, Python 3.12) every ``TORCH_CHECK``
raised inside ``subkern._C`` killed the process with SIGSEGV, where torch's own errors were raised
normally; on this project's CI toolchain the same checks raise ``RuntimeError``. This script runs
one error per subprocess, each through a different path, so that a crash names the path that
crashes and leaves a native backtrace (``subkern._C.install_crash_handler``):

* ``torch-own``: an error of torch's own C++ (``aten::mm`` shape mismatch), the control;
* ``pybind-caught``: a ``TORCH_CHECK`` caught inside the extension and rethrown as
  ``std::runtime_error`` through pybind11;
* ``pybind-c10``: a ``c10::Error`` leaving the extension through pybind11 (torch's translator);
* ``op-cpu``: a CPU kernel's check through the dispatcher (``torch.ops.subkern.csr_linear``);
* ``direct-cpu``: the same check through the dispatcher-free binding (``_C.direct_csr_linear``);
* ``op-cuda``: a CUDA kernel's check (``torch.ops.subkern.hamming_topk`` with k too large), when
  the extension has CUDA kernels and a GPU is visible.

It also prints the facts that decide whether exceptions cross libraries cleanly: the compilers of
torch and of the extension, pybind11's version and internals id, the libstdc++ / libgcc_s that
are loaded, and the pybind11 internals present in the interpreter.

    python benchmarks/exception_probe.py [--out FILE]

Exit status 0 when every case raised a Python exception, 1 when one crashed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap

PRELUDE = """
import faulthandler, sys, torch, subkern
from subkern import _ext
faulthandler.enable()
C = _ext.extension()
if C is None:
    print("SKIP: subkern._C not built"); sys.exit(3)
C.install_crash_handler()
"""

CASES = {
    "torch-own": "torch.ops.aten.mm(torch.randn(2, 3), torch.randn(4, 5))",
    "pybind-caught": "C.raise_torch_check(True)",
    "pybind-c10": "C.raise_torch_check(False)",
    "op-cpu": ("torch.ops.subkern.csr_linear(torch.randn(2, 9), torch.tensor([0, 1]), "
               "torch.tensor([0], dtype=torch.int32), torch.ones(1), 10, None)"),
    "direct-cpu": ("C.direct_csr_linear(torch.randn(2, 9), torch.tensor([0, 1]), "
                   "torch.tensor([0], dtype=torch.int32), torch.ones(1), 10, None)"),
    "op-cuda": ("(_ext.has_cuda_kernels() and torch.cuda.is_available()) or "
                "(print('SKIP: no CUDA kernels or no GPU') or sys.exit(3)); "
                "q = torch.zeros(2, 8, dtype=torch.uint8, device='cuda'); "
                "torch.ops.subkern.hamming_topk(q, q, 2049)"),
}

FACTS = """
import builtins, re, torch, subkern, sys
from subkern import _ext
C = _ext.extension()
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda)
cfg = torch.__config__.show()
print("torch built with:", *sorted(set(re.findall(
    r"CXX_COMPILER=[^,]*|_GLIBCXX_USE_CXX11_ABI=\\d|GCC [\\d.]+|clang [\\d.]+", cfg))))
if C is not None:
    info = C.build_info()
    for key in ("compiler", "pybind11_version", "pybind11_internals_id", "glibcxx_cxx11_abi",
                "glibcxx_release", "with_cuda"):
        print("subkern._C", key, "=", info.get(key))
    print("subkern._C file", C.__file__)
print("pybind11 internals in builtins:",
      [k for k in vars(builtins) if k.startswith("__pybind11_internals")])
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if re.search(
    r"libstdc\\+\\+|libgcc_s|libc10\\.so|libtorch_python", l)})
print("loaded:", *libs, sep="\\n  ")
"""


def run(code: str, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        return 124, f"timed out after {timeout}s\n{err.stdout or ''}{err.stderr or ''}"
    return proc.returncode, proc.stdout + proc.stderr


def verdict(rc: int, output: str) -> str:
    if rc == 0:
        return "no error raised (unexpected)"
    if rc == 3 and "SKIP:" in output:
        return "skipped: " + output.split("SKIP:", 1)[1].strip().splitlines()[0]
    if rc < 0:
        return f"CRASHED ({signal.Signals(-rc).name})"
    if rc == 124:
        return "TIMED OUT"
    last = [line for line in output.strip().splitlines() if line.strip()]
    return "raised " + (last[-1][:120] if last else f"(exit {rc})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    lines = ["# subkern exception probe", ""]
    rc, facts = run(FACTS, args.timeout)
    lines += ["## toolchain", "", "```", facts.strip(), "```", "", "## cases", ""]
    crashed = False
    details = []
    for name, call in CASES.items():
        code = PRELUDE + "\n" + call + "\n"
        rc, output = run(code, args.timeout)
        v = verdict(rc, output)
        crashed = crashed or v.startswith(("CRASHED", "TIMED OUT"))
        lines.append(f"- {name}: {v}")
        if v.startswith(("CRASHED", "TIMED OUT", "no error")):
            details += [f"### {name}", "", "```", textwrap.shorten(call, 300), "",
                        "\n".join(output.strip().splitlines()[-60:]), "```", ""]
    report = "\n".join(lines + [""] + details)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
