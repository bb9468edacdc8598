"""Op-independent benchmark machinery: timers, memory probes, the GPU roofline, comparison rows,
the printed table and the JSON report.

Timing protocol
---------------
* CPU: ``warmup`` untimed calls, then ``reps`` calls each timed with :func:`time.perf_counter`.
* CUDA: ``warmup`` untimed calls, then ``reps`` calls each timed with CUDA events; before every
  timed call a buffer of at least 64 MiB (and at least twice the L2 size) is overwritten on the
  device, so every repetition starts with a cold L2 cache, as a real query stream would.
* The figure reported is the *best* repetition by default (the least disturbed by other
  processes; ``--stat median`` switches to the median); all repetitions go into the JSON.

Throughput is items per second, ``items / time``; an implementation too slow to run the whole
batch (the torch reference) is timed on a prefix of the items and its time is scaled to the batch
per item, so that ``speedup = rival_time_per_item / our_time_per_item`` stays fair.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

STATS = ("best", "median")
SIZES = ("tiny", "quick", "full")

# ----------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What ``subkern bench`` was asked for (passed to every family's ``run``)."""

    device: str = "cpu"             # "cpu" or "cuda"
    size: str = "quick"             # "tiny" (tests), "quick" or "full"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    stat: str = "best"              # which repetition statistic the table reports
    cpu_isas: tuple[str, ...] = ("auto",)   # ISA levels of the C++ CPU kernels to benchmark
    reps: int | None = None         # override of the family's repetition count
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {self.stat!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class Measurement:
    """Timings of one implementation on one case."""

    impl: str                       # display name, e.g. "subkern[cpp]" or "faiss.IndexBinaryFlat"
    items: int                      # items (queries) processed by each timed call
    times_s: list[float]            # one entry per timed repetition
    peak_extra_bytes: int | None = None
    memory_method: str | None = None
    note: str | None = None

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def seconds(self, stat: str) -> float:
        return self.best_s if stat == "best" else self.median_s

    def per_item_s(self, stat: str) -> float:
        return self.seconds(stat) / max(1, self.items)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["best_s"] = self.best_s
        data["median_s"] = self.median_s
        return data


@dataclass
class Row:
    """One comparison: ours against one rival on one case (one line of the table)."""

    family: str
    device: str
    case: str                       # short label, e.g. "64b k=10"
    params: dict[str, Any]          # the case's parameters (sizes, bits, k, ...)
    ours: str                       # our implementation (with backend)
    rival: str
    items: int                      # batch size the times are given for (queries)
    ours_s: float                   # time of the whole batch (scaled from a prefix if needed)
    rival_s: float
    ours_extrapolated: bool
    rival_extrapolated: bool
    speedup: float                  # rival_s / ours_s
    ours_per_s: float               # throughput, items per second
    rival_per_s: float
    match: bool
    match_detail: str
    target: float | None = None     # speedup the issue asks for
    roofline_s: float | None = None  # lower bound on our time (GPU roofline)
    efficiency: float | None = None  # roofline_s / ours_s
    peak_extra_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def target_met(self) -> bool | None:
        return None if self.target is None else self.speedup >= self.target

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_met"] = self.target_met
        return data


@dataclass
class BenchResult:
    """What one family's ``run`` returns."""

    family: str
    device: str
    size: str
    rows: list[Row] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)  # raw, per case and impl
    skipped: list[dict[str, str]] = field(default_factory=list)       # {"what", "reason"}
    errors: list[dict[str, str]] = field(default_factory=list)        # {"what", "error"}
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(row.match for row in self.rows)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})


def compare(*, family: str, device: str, case: str, params: dict[str, Any], items: int,
            ours: Measurement, rival: Measurement, stat: str, match: bool, match_detail: str,
            target: float | None = None, roofline_s: float | None = None,
            notes: list[str] | None = None) -> Row:
    """Build the :class:`Row` of ``ours`` against ``rival`` for a batch of ``items`` items.

    Both times are per item times the batch size, so an implementation timed on a prefix of the
    batch is scaled linearly (flagged ``*_extrapolated``).
    """
    ours_s = ours.per_item_s(stat) * items
    rival_s = rival.per_item_s(stat) * items
    return Row(
        family=family, device=device, case=case, params=dict(params), ours=ours.impl,
        rival=rival.impl, items=items, ours_s=ours_s, rival_s=rival_s,
        ours_extrapolated=ours.items != items, rival_extrapolated=rival.items != items,
        speedup=rival_s / ours_s if ours_s > 0 else math.inf,
        ours_per_s=items / ours_s if ours_s > 0 else math.inf,
        rival_per_s=items / rival_s if rival_s > 0 else math.inf,
        match=match, match_detail=match_detail, target=target, roofline_s=roofline_s,
        efficiency=(roofline_s / ours_s) if roofline_s is not None and ours_s > 0 else None,
        peak_extra_bytes=ours.peak_extra_bytes, notes=list(notes or []),
    )


# ----------------------------------------------------------------------------------------------
# timers
# ----------------------------------------------------------------------------------------------


def time_cpu(fn: Callable[[], Any], *, warmup: int, reps: int) -> list[float]:
    """Wall times (s) of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


_flush_buffers: dict[int, torch.Tensor] = {}


def l2_flush_bytes(device_index: int) -> int:
    """Size of the L2-flush buffer: at least 64 MiB and twice the device's L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0) or 0
    return max(64 << 20, 2 * int(l2))


def flush_l2(device_index: int | None = None) -> None:
    """Evict the GPU's L2 cache by overwriting a buffer larger than it (device-side work)."""
    index = torch.cuda.current_device() if device_index is None else device_index
    buf = _flush_buffers.get(index)
    if buf is None:
        buf = _flush_buffers[index] = torch.empty(
            l2_flush_bytes(index) // 4, dtype=torch.int32, device=f"cuda:{index}")
    buf.fill_(index + 1)


def time_cuda(fn: Callable[[], Any], *, warmup: int, reps: int, flush: bool = True
              ) -> list[float]:
    """Device times (s) of ``reps`` calls of ``fn`` measured with CUDA events.

    The L2 flush runs before the start event of every repetition, so it is not timed.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, reps)):
        if flush:
            flush_l2()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def time_fn(fn: Callable[[], Any], device: str, *, warmup: int, reps: int) -> list[float]:
    """:func:`time_cuda` for ``device == "cuda"``, else :func:`time_cpu`."""
    if device == "cuda":
        return time_cuda(fn, warmup=warmup, reps=reps)
    return time_cpu(fn, warmup=warmup, reps=reps)


def time_round_robin(impls: dict[str, tuple[str, Callable[[], Any], int]], device: str,
                     warmup: int) -> dict[str, list[float]]:
    """Times of every implementation (``key -> (label, fn, reps)``); on CPU interleaved
    round-robin (one call of each per round), so that load from other processes, which comes and
    goes, hits every implementation alike; on CUDA :func:`time_fn` one after the other."""
    if device == "cuda":
        return {key: time_fn(fn, device, warmup=warmup, reps=n)
                for key, (_, fn, n) in impls.items()}
    for _, fn, _ in impls.values():
        for _ in range(max(1, warmup)):
            fn()
    times: dict[str, list[float]] = {key: [] for key in impls}
    for rnd in range(max(n for _, _, n in impls.values())):
        for key, (_, fn, n) in impls.items():
            if rnd < n:
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return times


def time_with_result(name: str, fn: Callable[[], Any], device: str, warmup: int, reps: int,
                     items: int) -> tuple[Measurement, Any]:
    """:func:`time_fn` of ``fn`` as a :class:`Measurement` named ``name``, with the result of
    its last call (for the correctness check)."""
    box: list[Any] = []

    def call() -> None:
        box[:] = [fn()]

    times = time_fn(call, device, warmup=warmup, reps=reps)
    return Measurement(name, items, times), box[0]


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------

_RSS_RE = re.compile(r"^(VmHWM|VmRSS):\s+(\d+)\s+kB", re.MULTILINE)


def _rss_kib() -> dict[str, int] | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            found = dict(_RSS_RE.findall(fh.read()))
    except OSError:
        return None
    if "VmHWM" not in found or "VmRSS" not in found:
        return None
    return {key: int(value) for key, value in found.items()}


def _malloc_trim() -> None:
    # glibc: hand free heap memory back to the OS, so that memory the call would otherwise reuse
    # from malloc's free lists is faulted in again (and counted) instead of being invisible.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_extra_memory(fn: Callable[[], Any], device: str) -> tuple[int | None, str | None]:
    """Peak memory ``fn`` needs beyond what is resident before it: ``(bytes, method)``.

    CPU (Linux only): free heap memory is returned to the OS (glibc ``malloc_trim``), the process's
    peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs``, ``fn`` runs once, and
    ``VmHWM - VmRSS(before)`` is the answer: every page the call touched (outputs and scratch,
    torch's allocator and plain ``malloc`` alike), at 4 KiB granularity; memory that some allocator
    keeps cached without returning it to the OS (and reuses) is not seen. CUDA:
    ``torch.cuda.max_memory_allocated`` after :func:`torch.cuda.reset_peak_memory_stats`, minus
    the allocation before the call (torch's caching allocator only). ``(None, reason)`` where
    neither works.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (max(0, torch.cuda.max_memory_allocated() - before),
                "torch.cuda.max_memory_allocated delta")
    _malloc_trim()
    before = _rss_kib()
    if before is None or not _reset_peak_rss():
        return None, "not measured (needs Linux /proc/self/status and clear_refs)"
    before = _rss_kib()
    fn()
    after = _rss_kib()
    if before is None or after is None:
        return None, "not measured"
    peak = max(0, after["VmHWM"] - before["VmRSS"]) * 1024
    return peak, "peak RSS delta (malloc_trim, VmHWM reset)"


# ----------------------------------------------------------------------------------------------
# GPU roofline
# ----------------------------------------------------------------------------------------------

#: ``__popc`` (32-bit population count) results per clock per SM. The CUDA C++ Programming Guide's
#: arithmetic-instruction throughput table gives 16 for compute capabilities 7.x, 8.x and 9.0
#: (Volta to Hopper); 64-bit ``__popcll`` issues two of them.
POPC_PER_CLOCK_PER_SM = 16

# name fragment (upper case) -> (peak DRAM bandwidth B/s, max SM clock Hz), most specific first.
# Used when the driver does not expose memory clock / bus width / SM clock.
GPU_TABLE: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("H200",), 4.8e12, 1.980e9),
    (("H100", "PCIE"), 2.0e12, 1.755e9),
    (("H100", "NVL"), 3.9e12, 1.785e9),
    (("H100",), 3.35e12, 1.980e9),             # SXM5 (reported as "H100 80GB HBM3")
    (("A100", "80GB", "PCIE"), 1.935e12, 1.410e9),
    (("A100", "80GB"), 2.039e12, 1.410e9),
    (("A100",), 1.555e12, 1.410e9),
)


def _table_entry(name: str) -> tuple[float, float] | None:
    upper = name.upper().replace("-", " ")
    for fragments, bandwidth, clock in GPU_TABLE:
        if all(fragment in upper for fragment in fragments):
            return bandwidth, clock
    return None


def gpu_peaks(props: Any) -> dict[str, Any]:
    """Peak DRAM bandwidth and popcount rate of a GPU from its ``torch.cuda`` properties.

    * bandwidth = 2 (double data rate) * memory clock * bus width / 8 bytes, from the properties'
      ``memory_clock_rate`` (kHz) and ``memory_bus_width`` (bits) when exposed, else the GPU table;
    * popcount rate = SMs * :data:`POPC_PER_CLOCK_PER_SM` * SM clock (``clock_rate``, kHz, the
      maximum boost clock), else the table's clock.

    ``props`` needs ``name`` and ``multi_processor_count``; the other fields are optional.
    """
    name = str(getattr(props, "name", "unknown"))
    sms = int(getattr(props, "multi_processor_count", 0) or 0)
    table = _table_entry(name)
    mem_khz = int(getattr(props, "memory_clock_rate", 0) or 0)
    bus_bits = int(getattr(props, "memory_bus_width", 0) or 0)
    if mem_khz > 0 and bus_bits > 0:
        bandwidth = 2.0 * mem_khz * 1e3 * bus_bits / 8
        bandwidth_source = (f"2 x memory clock {mem_khz / 1e3:.0f} MHz x {bus_bits}-bit bus / 8")
    elif table is not None:
        bandwidth, bandwidth_source = table[0], f"table entry for {name}"
    else:
        bandwidth, bandwidth_source = None, "unknown (no memory clock/bus width, not in table)"
    clock_khz = int(getattr(props, "clock_rate", 0) or 0)
    if clock_khz > 0:
        clock, clock_source = clock_khz * 1e3, "torch.cuda device properties clock_rate"
    elif table is not None:
        clock, clock_source = table[1], f"table entry for {name}"
    else:
        clock, clock_source = None, "unknown"
    popc_rate = sms * POPC_PER_CLOCK_PER_SM * clock if clock and sms else None
    return {
        "name": name,
        "sms": sms,
        "bandwidth_Bps": bandwidth,
        "bandwidth_source": bandwidth_source,
        "sm_clock_hz": clock,
        "clock_source": clock_source,
        "popc_per_clock_per_sm": POPC_PER_CLOCK_PER_SM,
        "popc_per_s": popc_rate,
    }


def roofline_seconds(compulsory_bytes: float, popc_ops: float, peaks: dict[str, Any]
                     ) -> float | None:
    """``t_min = max(compulsory bytes / peak bandwidth, popcount ops / peak popcount rate)``.

    A lower bound: XORs, additions and the top-k selection are not counted, and the bytes are
    only those that must cross DRAM once (inputs read once, outputs written once).
    """
    bounds = []
    if peaks.get("bandwidth_Bps"):
        bounds.append(compulsory_bytes / peaks["bandwidth_Bps"])
    if peaks.get("popc_per_s"):
        bounds.append(popc_ops / peaks["popc_per_s"])
    return max(bounds) if bounds else None


# ----------------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------------


def set_threads(n: int) -> dict[str, Any]:
    """Give torch (and faiss, when importable) ``n`` threads; returns what was set and before."""
    state: dict[str, Any] = {"torch_before": torch.get_num_threads()}
    torch.set_num_threads(n)
    state["torch"] = torch.get_num_threads()
    try:
        import faiss
    except ImportError:
        state["faiss"] = None
    else:
        state["faiss_before"] = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(n)
        state["faiss"] = faiss.omp_get_max_threads()
    return state


def restore_threads(state: dict[str, Any]) -> None:
    torch.set_num_threads(state["torch_before"])
    if state.get("faiss_before") is not None:
        import faiss

        faiss.omp_set_num_threads(state["faiss_before"])


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def _fmt_time(seconds: float, extrapolated: bool) -> str:
    text = f"{seconds * 1e3:.3g}" if seconds * 1e3 < 1000 else f"{seconds * 1e3:.0f}"
    return ("~" if extrapolated else "") + text


def _fmt_rate(rate: float) -> str:
    if not math.isfinite(rate):
        return "inf"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.3g}{suffix}"
    return f"{rate:.3g}"


def format_table(rows: list[Row]) -> str:
    """The comparison table: one line per row, times in ms for the whole batch."""
    headers = ["device", "case", "ours", "rival", "ours ms", "rival ms", "speedup", "target",
               "ours q/s", "rival q/s", "eff", "mem MiB", "match"]
    body = []
    for row in rows:
        target = "" if row.target is None else (
            f"{row.target:g}x " + ("ok" if row.target_met else "MISS"))
        body.append([
            row.device, row.case, row.ours, row.rival,
            _fmt_time(row.ours_s, row.ours_extrapolated),
            _fmt_time(row.rival_s, row.rival_extrapolated),
            f"{row.speedup:.2f}x", target,
            _fmt_rate(row.ours_per_s), _fmt_rate(row.rival_per_s),
            "" if row.efficiency is None else f"{100 * row.efficiency:.0f}%",
            "" if row.peak_extra_bytes is None else f"{row.peak_extra_bytes / 2**20:.1f}",
            "yes" if row.match else "NO",
        ])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    right = {4, 5, 6, 8, 9, 10, 11}
    lines = []
    for cells in [headers, *body]:
        padded = (cell.rjust(w) if i in right else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(cells, widths, strict=True)))
        lines.append("  ".join(padded).rstrip())
        if cells is headers:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


TABLE_LEGEND = (
    "times: whole batch, ms ('~' = timed on a prefix of the queries and scaled per query); "
    "speedup = rival time / ours; q/s = queries per second; eff = roofline time / ours (GPU); "
    "mem = peak extra memory of ours")


def output_stem(family: str, device: str, size: str) -> str:
    """File name stem: ``hamming_cpu`` (full), ``hamming_cpu_quick``, ``hamming_cpu_tiny``."""
    return f"{family}_{device}" + ("" if size == "full" else f"_{size}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def report_payload(result: BenchResult, config: BenchConfig, machine: dict[str, Any],
                   wall_s: float, threads: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of one family's run: rows, raw timings, machine, versions, threads."""
    return _jsonable({
        "family": result.family,
        "device": result.device,
        "size": result.size,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stat": config.stat,
        "threads": threads,
        "wall_s": wall_s,
        "ok": result.ok,
        "params": result.params,
        "rows": [row.to_json() for row in result.rows],
        "measurements": result.measurements,
        "skipped": result.skipped,
        "errors": result.errors,
        "notes": result.notes,
        "machine": machine,
    })


def write_json(path: str, payload: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path


__all__ = [
    "BenchConfig",
    "BenchResult",
    "GPU_TABLE",
    "Measurement",
    "POPC_PER_CLOCK_PER_SM",
    "Row",
    "SIZES",
    "STATS",
    "TABLE_LEGEND",
    "compare",
    "flush_l2",
    "format_table",
    "gpu_peaks",
    "output_stem",
    "peak_extra_memory",
    "report_payload",
    "restore_threads",
    "roofline_seconds",
    "set_threads",
    "time_cpu",
    "time_cuda",
    "time_fn",
    "time_round_robin",
    "time_with_result",
    "write_json",
]
