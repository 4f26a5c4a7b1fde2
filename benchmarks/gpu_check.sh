#!/usr/bin/env bash
# One prepared command for a lent GPU machine (../shared/BENCHMARKING.md): the decisive numbers first, all
# inside about 9 minutes (GPU_CHECK_SECONDS, default 540), each step under its own `timeout`:
#   1. facts (10 s + 25 s): nvidia-smi (name, driver, clocks, memory, power), then python, torch, CUDA, triton,
#      the device's SMs and L2, pytest-xdist / matplotlib / ncu present or not: into the log;
#   2. decision (240 s; the script stops starting cases at 200 s): benchmarks/gpu_decision.py, the Llama-7B
#      linears (4096x4096, 11008x4096, 4096x11008) x 50 / 70 / 90% (our tiled-bitmap CSR layer) and 2:4 (our
#      Triton 2:4 layer) x 1 and 16 tokens x fp16 and bf16, against cuBLAS dense and torch's anchors (cuSPARSE
#      CSR, to_sparse_semi_structured): kernel-only time with a cold L2 (CUDA graphs rotating over weight copies
#      that exceed twice the L2), eager time (the Python call), GB/s against a measured copy ceiling;
#      decision.{json,csv,png}, rewritten after every case;
#   3. tests (150 s): the CUDA-marked tests, in parallel (pytest-xdist, -n cores) where it is importable,
#      Triton autotuning off (one compiled config per case);
#   4. ncu (60 s): where ncu is on PATH (or in /usr/local/cuda/bin), one tiled-bitmap launch (4096x4096, 90%,
#      1 token, fp16) with the SpeedOfLight, MemoryWorkloadAnalysis and Occupancy sections: ncu.txt; else
#      the log says it was skipped;
#   5. matmul (the time left, if at least 45 s): prune bench matmul --device cuda, fp16 and bf16, Llama-7B
#      first, then Llama-70B and BERT-base, at 1, 16, 128, 2048 tokens and 50 / 70 / 90 / 98% (dense, csr,
#      2:4, auto and the anchors): matmul.{csv,json,png}.
# Results go to $OUT (default benchmarks/results/gpu): gpu_check.log (facts, every step's output, the step
# timings), decision.{json,csv,png}, ncu.txt, matmul.{csv,json,png}: 8 files at most (what the device tool
# brings back).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Nothing is downloaded, installed or built: the project runs from this checkout through PYTHONPATH, and our
# C++ CPU kernels stay off (SPARSE_OPS_NATIVE=0). Without a CUDA GPU it stops before measuring or writing
# anything and exits 3, saying so. A failed step is logged, the others still run, and the exit code is 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_SECONDS:-540}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SPARSE_OPS_NATIVE=0

timeout -k 5 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null
found=$?
if [ "$found" -ne 0 ]; then
    why="torch.cuda.is_available() is False, or torch is missing"
    [ "$found" -eq 124 ] || [ "$found" -eq 137 ] && why="torch did not answer within 60 s"
    echo "gpu_check: no CUDA GPU here ($why); nothing measured" >&2
    exit 3
fi

mkdir -p "$OUT"
export OUT PY
LOG="$OUT/gpu_check.log"
: > "$LOG"
failed=()
timings=()

log() { echo "$*" | tee -a "$LOG"; }

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, output to the terminal and the log
    local name=$1 limit=$2
    shift 2
    log "== $name (limit ${limit}s, at ${SECONDS}s): $(printf '%s ' "$@" | head -n 1 | cut -c 1-400)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "== $name: exit $rc after $((SECONDS - t0))s"
    timings+=("$name ${rc} $((SECONDS - t0))s/${limit}s")
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ': timed out'))")
}

# 1. facts
step facts.gpu 10 nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,memory.total,memory.used,power.limit,temperature.gpu --format=csv
step facts.versions 25 "$PY" -c 'import importlib.util, os, platform, shutil, torch
p = torch.cuda.get_device_properties(0)
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| triton", tv)
print("gpu", p.name, "| cc %d.%d" % (p.major, p.minor), "| SMs", p.multi_processor_count,
      "| memory %.1f GiB" % (p.total_memory / 2**30), "| L2", getattr(p, "L2_cache_size", "unknown"))
print("cpus", os.cpu_count(), "|", platform.processor() or platform.machine(),
      "| pytest-xdist", importlib.util.find_spec("xdist") is not None,
      "| matplotlib", importlib.util.find_spec("matplotlib") is not None,
      "| ncu", shutil.which("ncu") or ("/usr/local/cuda/bin/ncu" if os.access("/usr/local/cuda/bin/ncu", os.X_OK) else None))
'

# 2. the decision micro-benchmark (its files are rewritten after every case: a timeout keeps what it measured)
step decision 240 "$PY" benchmarks/gpu_decision.py --out "$OUT" --max-seconds 200

# 3. the CUDA tests, in parallel where pytest-xdist is importable
parallel=()
if "$PY" -c 'import xdist' 2>/dev/null; then
    parallel=(-n "$(nproc 2>/dev/null || echo 4)")
else
    log "== tests: pytest-xdist is not importable, the CUDA tests run serially"
fi
step tests 150 env SPARSE_OPS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfE \
    --durations=10 ${parallel[@]+"${parallel[@]}"} tests

# 4. one profiled launch of the tiled-bitmap kernel
NCU="$(command -v ncu || true)"
[ -z "$NCU" ] && [ -x /usr/local/cuda/bin/ncu ] && NCU=/usr/local/cuda/bin/ncu
if [ -n "$NCU" ]; then
    export NCU
    step ncu 60 bash -c 'SPARSE_OPS_TRITON_AUTOTUNE=0 "$NCU" --target-processes all --kernel-name regex:_tiled_kernel \
        --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        "$PY" benchmarks/gpu_decision.py --profile-launch > "$OUT/ncu.txt" 2>&1; rc=$?; tail -n 25 "$OUT/ncu.txt"; exit $rc'
else
    log "== ncu: skipped (ncu is not on PATH nor in /usr/local/cuda/bin)"
    timings+=("ncu skipped")
fi

# 5. the sweep, in the time left
left=$((BUDGET - SECONDS))
if [ "$left" -ge 45 ]; then
    step matmul "$left" "$PY" -m prune bench matmul --device cuda --dtype fp16,bf16 --shapes llama-7b,llama-70b,bert-base --tokens 1,16,128,2048 --sparsity 0.5,0.7,0.9,0.98 --formats dense,csr,2:4,auto --repeats 5 --max-seconds $((left - 25)) --out "$OUT"
else
    log "== matmul: skipped (${left}s left of ${BUDGET}s)"
    timings+=("matmul skipped")
fi

log "== step timings (name exit used/limit): ${timings[*]/%/;} total ${SECONDS}s of ${BUDGET}s"
log "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failed[@]} -gt 0 ]; then
    log "gpu_check: failed steps: ${failed[*]}" >&2
    exit 1
fi
log "gpu_check: all steps passed"
