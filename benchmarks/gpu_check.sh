#!/usr/bin/env bash
# One command for a GPU machine (torch with CUDA, nvcc and triton installed; no network needed):
#
#   bash benchmarks/gpu_check.sh
#
# 1. builds subkern._C with the CUDA kernels
#    (SUBKERN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .), for the local GPU's
#    architecture unless TORCH_CUDA_ARCH_LIST is set;
# 1b. runs benchmarks/exception_probe.py (does a C++ error raised inside subkern._C reach Python
#    as RuntimeError, path by path, or crash the process; native backtraces of a crash);
# 2. prints `subkern info`;
# 3. runs the GPU tests and the Triton tests compiled for the GPU in one pytest run
#    (pytest tests/ -k "gpu or triton", in parallel with pytest-xdist;
#    SUBKERN_GPU_CHECK_TRITON_TESTS=0 runs only -m gpu);
# 4. runs `subkern bench --device cuda` (Triton and CUDA kernels vs the torch reference, roofline);
# 5. runs `subkern bench --device cpu` (C++ kernel vs FAISS) when faiss is importable.
#
# Everything goes to benchmarks/results/gpu/ (override: SUBKERN_GPU_RESULTS=DIR): one log per
# step, the bench JSON/PNG, info.txt/info.json and SUMMARY.md. The exit status is non-zero when
# the build, the tests or a benchmark (a mismatch included) failed; what was obtained is written
# all the same.
#
# Knobs: SUBKERN_GPU_CHECK_CPU_BENCH=full|quick|0 (default full: the issue's 1M codes x 1000
# queries), SUBKERN_GPU_CHECK_CUDA_BENCH=full|quick (default full), PYTHON (default python3),
# SUBKERN_GPU_CHECK_TIMEOUT (seconds per step, default 900).

set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${SUBKERN_GPU_RESULTS:-benchmarks/results/gpu}
LIMIT=${SUBKERN_GPU_CHECK_TIMEOUT:-900}
CPU_BENCH=${SUBKERN_GPU_CHECK_CPU_BENCH:-full}
CUDA_BENCH=${SUBKERN_GPU_CHECK_CUDA_BENCH:-full}
mkdir -p "$OUT"
SUMMARY="$OUT/SUMMARY.md"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
T0=$(date +%s)

STATUS=0
STEP_ROWS=()
FAILURES=()

# run_step NAME LOGFILE CMD...: runs CMD under a timeout, output to the console and LOGFILE
# (to LOGFILE only, with its last lines on failure, when QUIET=1); records the exit status and
# duration for SUMMARY.md. Returns CMD's status.
run_step() {
    local name=$1 log=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo
    echo "=== [$name] $*"
    if [ "${QUIET:-0}" = 1 ]; then
        timeout --kill-after=30 "$LIMIT" "$@" > "$log" 2>&1
        rc=$?
        [ "$rc" -ne 0 ] && tail -n 40 "$log"
    else
        timeout --kill-after=30 "$LIMIT" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    local took=$(( $(date +%s) - start ))
    local verdict=ok
    if [ "$rc" -ne 0 ]; then
        verdict="FAILED (exit $rc)"
        [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${LIMIT}s"
    fi
    echo "=== [$name] $verdict in ${took}s"
    STEP_ROWS+=("| $name | $verdict | ${took}s | \`$(basename "$log")\` |")
    return "$rc"
}

fail() {
    STATUS=1
    FAILURES+=("$1")
    echo "!!! $1" >&2
}

write_summary() {
    local total=$(( $(date +%s) - T0 ))
    {
        echo "# subkern GPU check"
        echo
        echo "- started: $STARTED, took ${total}s"
        echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
             "($(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files)"
        echo "- GPU: ${GPU_NAME:-unknown}; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
        echo "- torch: ${TORCH_DESC:-unknown}"
        echo "- result: $([ "$STATUS" -eq 0 ] && echo "**OK**" || echo "**FAILED**")"
        if [ "${#FAILURES[@]}" -gt 0 ]; then
            echo
            echo "## Failures"
            echo
            for item in "${FAILURES[@]}"; do echo "- $item"; done
        fi
        echo
        echo "## Steps"
        echo
        echo "| step | result | time | log |"
        echo "|---|---|---|---|"
        for row in ${STEP_ROWS[@]+"${STEP_ROWS[@]}"}; do echo "$row"; done
        if [ -s "$OUT/info.txt" ]; then
            echo
            echo "## subkern info"
            echo
            echo '```'
            cat "$OUT/info.txt"
            echo '```'
        fi
        if [ -s "$OUT/exception_probe.txt" ]; then
            echo
            echo "## exception probe"
            echo
            grep -E '^- ' "$OUT/exception_probe.txt"
        fi
        for tests in pytest_gpu; do
            if [ -s "$OUT/$tests.txt" ]; then
                echo
                echo "## $tests (failures and result)"
                echo
                echo '```'
                grep -E '^(FAILED|ERROR) ' "$OUT/$tests.txt" | head -n 50
                tail -n 1 "$OUT/$tests.txt"
                echo '```'
            fi
        done
        for bench in bench_cuda bench_cpu; do
            if [ -s "$OUT/$bench.txt" ]; then
                echo
                echo "## $bench"
                echo
                echo '```'
                # the result tables and verdict lines, without the progress lines
                grep -v '^\[hamming ' "$OUT/$bench.txt" | tail -n 60
                echo '```'
            fi
        done
        if [ -s "$OUT/build.txt" ] && [ "${BUILD_OK:-0}" -ne 1 ]; then
            echo
            echo "## Build log (last lines)"
            echo
            echo '```'
            tail -n 40 "$OUT/build.txt"
            echo '```'
        fi
    } > "$SUMMARY"
    echo
    echo "wrote $SUMMARY"
}
trap write_summary EXIT

# --- 0. the machine --------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
if ! ARCH=$("$PY" -c "
import torch
assert torch.version.cuda is not None, 'torch was built without CUDA'
assert torch.cuda.is_available(), 'no CUDA device visible'
major, minor = torch.cuda.get_device_capability()
print(f'{major}.{minor}')
" 2> "$OUT/cuda_probe.txt"); then
    fail "no usable CUDA device: $(tail -n 1 "$OUT/cuda_probe.txt")"
    exit 1
fi
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
TORCH_DESC=$("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)" \
             2>/dev/null || echo unknown)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
echo "GPU: $GPU_NAME (sm $ARCH), torch $TORCH_DESC, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# --- 1. build --------------------------------------------------------------------------------
BUILD_OK=0
if QUIET=1 run_step build "$OUT/build.txt" env SUBKERN_BUILD_CUDA=1 SUBKERN_BUILD_EXT=1 \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    BUILD_OK=1
else
    echo "pip install failed; trying an in-place build (python setup.py build_ext --inplace)"
    if QUIET=1 run_step build-inplace "$OUT/build_inplace.txt" env SUBKERN_BUILD_CUDA=1 \
            SUBKERN_BUILD_EXT=1 "$PY" setup.py build_ext --inplace; then
        BUILD_OK=1
    fi
fi
if [ "$BUILD_OK" -eq 1 ]; then
    if ! "$PY" -c "
import sys, subkern, subkern._ext as ext
ok = ext.has_cuda_kernels()
print('subkern._C with CUDA kernels:', ok, '' if ok else (ext.load_error() or 'built without CUDA'))
sys.exit(0 if ok else 1)
" 2>&1 | tee -a "$OUT/build.txt"; then
        BUILD_OK=0
    fi
fi
[ "$BUILD_OK" -eq 1 ] || fail "build of the CUDA extension failed (see build.txt)"

# --- 1b. exception probe: where a TORCH_CHECK raised inside subkern._C goes (one subprocess per
# path; a crash leaves its native backtrace in exception_probe.txt) ---------------------------
if [ "$BUILD_OK" -eq 1 ]; then
    QUIET=1 run_step exception-probe "$OUT/exception_probe_log.txt" \
        "$PY" benchmarks/exception_probe.py --out "$OUT/exception_probe.txt" \
        || fail "a C++ error crashed the process (see exception_probe.txt)"
fi

# --- 2. info ---------------------------------------------------------------------------------
run_step info "$OUT/info.txt" "$PY" -m subkern.cli info || fail "subkern info failed"
"$PY" -m subkern.cli info --json > "$OUT/info.json" 2>/dev/null || true

# --- 3. GPU tests and the Triton tests compiled for the GPU ----------------------------------
# One pytest run: the tests marked gpu and, unless SUBKERN_GPU_CHECK_TRITON_TESTS=0, every test
# with "triton" in its name (on CPU-only CI those run under the Triton interpreter). tests/conftest.py
# sets SUBKERN_TRITON_AUTOTUNE=0 there: one configuration per autotuned kernel. pytest-xdist (when
# importable) spreads the tests over SUBKERN_GPU_CHECK_JOBS processes sharing the GPU (default:
# nproc, at most 16); pytest-timeout (when importable) bounds each test at
# SUBKERN_GPU_CHECK_TEST_TIMEOUT seconds (default 120). -v names every result as it comes, so a
# step cut short by its timeout still says which tests failed.
if [ "${SUBKERN_GPU_CHECK_TRITON_TESTS:-1}" = 1 ]; then
    SELECT=(-k "gpu or triton")
else
    SELECT=(-m gpu)
fi
PYTEST_ARGS=(-v -p no:cacheprovider --maxfail=50 -rfE --tb=short --durations=15)
NPROC=$(nproc 2>/dev/null || echo 1)
JOBS=${SUBKERN_GPU_CHECK_JOBS:-$(( NPROC < 16 ? NPROC : 16 ))}
if [ "$JOBS" -gt 1 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    PYTEST_ARGS+=(-n "$JOBS")
fi
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST_ARGS+=(--timeout "${SUBKERN_GPU_CHECK_TEST_TIMEOUT:-120}")
fi
run_step "pytest gpu+triton" "$OUT/pytest_gpu.txt" "$PY" -m pytest tests/ "${SELECT[@]}" \
    "${PYTEST_ARGS[@]}"
rc=$?
if [ "$rc" -eq 5 ]; then
    fail "pytest collected no GPU tests"
elif [ "$rc" -ne 0 ]; then
    fail "GPU tests failed (exit $rc, see pytest_gpu.txt)"
fi

# --- 4. CUDA benchmark -----------------------------------------------------------------------
CUDA_FLAGS=()
[ "$CUDA_BENCH" = quick ] && CUDA_FLAGS=(--quick)
# op families with GPU cases, the least measured first (override with SUBKERN_GPU_CHECK_OPS=...)
GPU_OPS="${SUBKERN_GPU_CHECK_OPS:-sparse_linear,masked_linear,soft_threshold,ternary,hamming}"
run_step "bench cuda" "$OUT/bench_cuda.txt" "$PY" -m subkern.cli bench --device cuda \
    --ops "$GPU_OPS" --out "$OUT" ${CUDA_FLAGS[@]+"${CUDA_FLAGS[@]}"} || fail "subkern bench --device cuda failed or mismatched"

# --- 5. CPU vs FAISS benchmark ---------------------------------------------------------------
if [ "$CPU_BENCH" = 0 ]; then
    echo "CPU benchmark skipped (SUBKERN_GPU_CHECK_CPU_BENCH=0)"
elif "$PY" -c "import faiss" >/dev/null 2>&1; then
    CPU_FLAGS=()
    [ "$CPU_BENCH" = quick ] && CPU_FLAGS=(--quick)
    run_step "bench cpu" "$OUT/bench_cpu.txt" "$PY" -m subkern.cli bench --device cpu \
        --out "$OUT" ${CPU_FLAGS[@]+"${CPU_FLAGS[@]}"} || fail "subkern bench --device cpu failed or mismatched"
else
    echo "faiss is not importable: CPU-vs-FAISS benchmark skipped"
    STEP_ROWS+=("| bench cpu | skipped (faiss not importable) | 0s | |")
fi

exit "$STATUS"
