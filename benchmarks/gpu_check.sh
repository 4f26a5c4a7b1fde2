#!/usr/bin/env bash
# One prepared command for a lent GPU machine (../shared/BENCHMARKING.md), all inside 6 minutes:
#   1. the CUDA-marked tests (pytest -m cuda);
#   2. prune bench matmul --device cuda in fp16 and bf16 on the BERT-base and Llama-7B shapes at batches
#      1, 16, 128, 2048: dense cuBLAS vs our csr (cuSPARSE) and 2:4 (cuSPARSELt / CUTLASS) layers, with the
#      anchors torch CSR int64/int32 (cuSPARSE) and torch's to_sparse_semi_structured;
#   3. prune bench families --device cuda.
# Results and a log go to $OUT (default benchmarks/results/gpu): gpu_check.log, matmul.{csv,json,png},
# families.{csv,json,png} (7 files: the device tool brings back at most 8).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Nothing is downloaded or installed: the project runs from this checkout through PYTHONPATH (no build
# isolation). Without a CUDA GPU it stops before measuring or writing anything and exits 3, saying so.
# Each step runs under `timeout`; a failed step is logged, the others still run, and the exit code is 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, or torch is missing); nothing measured" >&2
    exit 3
fi

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
failed=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, output to the terminal and the log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

step gpu 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step versions 30 "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
step tests 75 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
step matmul 200 "$PY" -m prune bench matmul --device cuda --dtype fp16,bf16 --shapes bert-base,llama-7b --tokens 1,16,128,2048 --sparsity 0.5,0.75,0.9,0.98 --formats dense,csr,2:4 --repeats 7 --max-seconds 150 --out "$OUT"
step families 75 "$PY" -m prune bench families --device cuda --tokens 1,16,128,2048 --repeats 11 --max-seconds 45 --out "$OUT"

echo "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed steps: ${failed[*]}" | tee -a "$LOG" >&2
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$LOG"
