"""What this machine and this install of subkern are: versions, devices, CPU features, the
compiled extension and the backend each op runs on (``subkern info``, benchmark JSON headers).

Nothing here touches CUDA when torch was built without it, and nothing imports triton or faiss
just to learn their versions (package metadata first).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from .. import _ext
from .. import backend as _backend
from ..ops import matmul_strategy
from ..version import __version__

#: Devices that the op table covers.
DEVICES = ("cpu", "cuda")

# CPU flags (as /proc/cpuinfo spells them) that matter to the Hamming kernels.
_INTERESTING_FLAGS = ("popcnt", "sse4_2", "avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512vl",
                      "avx512_vpopcntdq", "avx512_bitalg", "avx512_vnni", "amx_tile")

# distribution names tried, in order, for each package we report
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "numpy": ("numpy",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "matplotlib": ("matplotlib",),
}


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """Versions of subkern and its companions (None where not installed)."""
    versions: dict[str, str | None] = {"subkern": __version__, "torch": torch.__version__}
    for package in ("triton", "numpy", "faiss", "matplotlib"):
        version = _distribution_version(_DISTRIBUTIONS[package])
        if version is None and package == "faiss":
            # faiss built from source has no distribution metadata
            try:
                version = getattr(importlib.import_module("faiss"), "__version__", "unknown")
            except ImportError:
                version = None
        versions[package] = version
    versions["torch_cuda"] = torch.version.cuda
    return versions


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_warning() -> str | None:
    """A warning when other work keeps the CPUs busy (timings, FAISS's above all, suffer)."""
    load = load_average()
    cores = usable_cores()
    if load is None or load[0] < 0.5 * cores:
        return None
    return (f"the 1-minute load average is {load[0]:.2f} on {cores} usable cores: other processes "
            "are running, CPU timings will be disturbed (OpenMP libraries such as FAISS's slow "
            "down most when a core is taken)")


def cpu_info() -> dict[str, Any]:
    return {
        "model": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device can be used, else why not (no CUDA call without CUDA torch)."""
    if torch.version.cuda is None:
        return "torch was built without CUDA (torch " + torch.__version__ + ")"
    if not torch.cuda.is_available():
        return "torch has CUDA but no CUDA device is visible"
    return None


def cuda_info() -> dict[str, Any]:
    """CUDA runtime and devices; ``devices`` is empty (and no CUDA call is made) without CUDA."""
    reason = cuda_unavailable_reason()
    info: dict[str, Any] = {"torch_cuda": torch.version.cuda, "available": reason is None,
                            "reason": reason, "devices": []}
    if reason is not None:
        return info
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append({
            "index": index,
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
        })
    return info


def _proc_cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in _INTERESTING_FLAGS if flag in flags]
    except OSError:
        pass
    return []


def cpu_features() -> dict[str, Any]:
    """CPU features as ``_C`` detects them (cpuid), else from ``/proc/cpuinfo``; the active ISA."""
    info = _ext.build_info()
    if info:
        return {"features": list(info.get("cpu_features", [])), "source": "subkern._C (cpuid)",
                "active_isa": info.get("active_cpu_isa"),
                "compiled_isas": list(info.get("compiled_cpu_isas", []))}
    return {"features": _proc_cpu_flags(), "source": "/proc/cpuinfo",
            "active_isa": None, "compiled_isas": []}


def build_status() -> dict[str, Any]:
    """Whether ``subkern._C`` is loaded (else why not), with CUDA or not, and its compiler."""
    info = _ext.build_info()
    error = _ext.load_error()
    return {
        "ext_loaded": error is None,
        "ext_error": error,
        "with_cuda": bool(info.get("with_cuda", False)),
        "compiler": info.get("compiler"),
        "built_for_torch": info.get("torch_version"),
    }


def _native_key(backend: str) -> str | None:
    return {"cpp": "CPU", "cuda": "CUDA"}.get(backend)


def native_kernel_missing(op: str, backend: str) -> bool:
    """True when ``backend`` is cpp/cuda, ``_C`` is loaded, but has no kernel for ``op``.

    The dispatcher then runs the op's reference (``CompositeExplicitAutograd``) kernel instead, so
    the backend's name would overstate what runs.
    """
    from ..ops.library import has_kernel

    key = _native_key(backend)
    return key is not None and not has_kernel(op, key)


def auto_backend(op: str, device: str) -> str:
    """The backend that ``auto`` picks now for ``op`` on ``device`` (ignores SUBKERN_BACKEND)."""
    from ..ops import OPS

    with _backend.use_backend("auto"):
        return _backend.resolve(op, torch.device(device), OPS[op])


def backend_label(op: str, backend: str) -> str:
    """``backend``, annotated when its native kernel for ``op`` is missing (reference runs)."""
    if native_kernel_missing(op, backend):
        return f"{backend} (no native kernel: runs reference)"
    return backend


def backend_table() -> list[dict[str, Any]]:
    """One entry per op x device: the ``auto`` choice and every backend's availability."""
    from ..ops import OPS

    cuda_reason = cuda_unavailable_reason()
    table = []
    for op, supported in OPS.items():
        for device in DEVICES:
            entry: dict[str, Any] = {"op": op, "device": device, "backends": {}}
            if device == "cuda" and cuda_reason is not None:
                entry["auto"] = None
                entry["device_reason"] = cuda_reason
                for name in supported:
                    entry["backends"][name] = cuda_reason
                table.append(entry)
                continue
            dev = torch.device(device)
            for name in supported:
                why = _backend.unavailable_reason(name, dev)
                if why is None and native_kernel_missing(op, name):
                    why = (f"subkern._C has no {_native_key(name)} kernel for {op}; the dispatcher "
                           "falls back to the reference")
                entry["backends"][name] = why
            chosen = auto_backend(op, device)
            entry["auto"] = chosen
            entry["auto_label"] = backend_label(op, chosen)
            table.append(entry)
    return table


def _gpu_matmul_strategy() -> str:
    """The Triton backend's training-matmul strategy for CUDA tensors (or why it is invalid)."""
    try:
        requested = matmul_strategy.requested_strategy()
        chosen = matmul_strategy.matmul_strategy(torch.device("cuda"))
    except ValueError as err:
        return f"invalid ({err})"
    return chosen if requested == chosen else f"{requested} (CUDA: {chosen})"


def collect() -> dict[str, Any]:
    """Everything ``subkern info`` reports, as a JSON-serialisable dict."""
    return {
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "cuda": cuda_info(),
        "cpu_features": cpu_features(),
        "build": build_status(),
        "backend_request": _backend.get_backend(),
        "triton_interpret": _backend.triton_interpreted(),
        "gpu_matmul_strategy": _gpu_matmul_strategy(),
        "ops": backend_table(),
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`collect`'s dict."""
    lines: list[str] = []
    add = lines.append
    versions = info["versions"]
    add("subkern " + str(versions["subkern"]))
    add("versions: " + ", ".join(
        f"{name} {version if version is not None else '(not installed)'}"
        for name, version in versions.items() if name not in ("subkern", "torch_cuda")))
    add(f"python {info['python']} on {info['platform']}")
    add("")
    cpu = info["cpu"]
    add("devices:")
    add(f"  cpu:  {cpu['model']} ({cpu['machine']}), {cpu['logical_cores']} logical cores, "
        f"{cpu['usable_cores']} usable, torch threads {cpu['torch_threads']}")
    cuda = info["cuda"]
    if cuda["available"]:
        for dev in cuda["devices"]:
            add(f"  cuda:{dev['index']} {dev['name']} (sm_{dev['capability'].replace('.', '')}, "
                f"{dev['sms']} SMs, {dev['memory_gib']} GiB), CUDA {cuda['torch_cuda']}")
    else:
        add(f"  cuda: none ({cuda['reason']})")
    feats = info["cpu_features"]
    add("")
    add(f"cpu features ({feats['source']}): {' '.join(feats['features']) or '(none detected)'}")
    active = feats["active_isa"] or "n/a (subkern._C not loaded)"
    compiled = ", ".join(feats["compiled_isas"]) or "n/a"
    add(f"active cpu isa: {active} (compiled: {compiled})")
    build = info["build"]
    add("")
    if build["ext_loaded"]:
        add(f"subkern._C: loaded, {'with' if build['with_cuda'] else 'without'} CUDA kernels, "
            f"compiler {build['compiler']}, built for torch {build['built_for_torch']}")
    else:
        add(f"subkern._C: not loaded ({build['ext_error']})")
    add(f"backend requested: {info['backend_request']}  (TRITON_INTERPRET="
        f"{'1' if info['triton_interpret'] else '0'})")
    add(f"gpu training matmul strategy (SUBKERN_GPU_MATMUL): {info['gpu_matmul_strategy']}")
    add("")
    ops = info["ops"]
    width = max(len(entry["op"]) for entry in ops) if ops else 10
    add(f"{'op':<{width}}  {'device':<6}  auto ->")
    for entry in ops:
        auto = entry.get("auto_label") or f"n/a ({entry.get('device_reason')})"
        add(f"{entry['op']:<{width}}  {entry['device']:<6}  {auto}")
    add("")
    add("backends (available, or why not):")
    for entry in ops:
        if entry.get("device_reason"):
            add(f"  {entry['op']} on {entry['device']}: none ({entry['device_reason']})")
            continue
        for name, why in entry["backends"].items():
            status = "available" if why is None else f"unavailable: {why}"
            add(f"  {entry['op']} on {entry['device']}: {name}: {status}")
    return "\n".join(lines)


__all__ = [
    "DEVICES",
    "auto_backend",
    "backend_label",
    "backend_table",
    "build_status",
    "busy_warning",
    "collect",
    "cpu_features",
    "cpu_info",
    "cpu_model",
    "cuda_info",
    "cuda_unavailable_reason",
    "format_info",
    "load_average",
    "native_kernel_missing",
    "package_versions",
    "usable_cores",
]
