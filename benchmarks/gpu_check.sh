#!/usr/bin/env bash
# One prepared command for a lent GPU machine (../shared/BENCHMARKING.md), all inside 6 minutes:
#   1. the CUDA-marked tests (pytest -m cuda), Triton autotuning off (one compiled config per case);
#   2. prune bench matmul --device cuda, fp16 and bf16, on the Llama-7B, Llama-70B and BERT-base shapes at
#      1, 16, 128, 2048 tokens and sparsity 0.5 / 0.7 / 0.9 / 0.98 (2:4 at 0.5 and above): dense cuBLAS, our
#      csr layer (the Triton tiled-bitmap kernel), our 2:4 layer (the Triton 2:4 kernel), auto (the plan:
#      cuBLAS / Triton / cuSPARSE per batch), and the anchors torch CSR int64 / int32 (cuSPARSE) and torch's
#      to_sparse_semi_structured (cuSPARSELt / CUTLASS); Llama-7B first, so that it is measured if time runs out;
#   3. prune bench families --device cuda: unstructured sparsity vs MoE (Triton grouped experts) vs head
#      gating at matched active parameters.
# Results and a log go to $OUT (default benchmarks/results/gpu): gpu_check.log, matmul.{csv,json,png},
# families.{csv,json,png} (7 files: the device tool brings back at most 8). The log states the GPU, driver,
# CUDA, torch and triton versions.
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

step gpu 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step versions 30 "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
step tests 80 env SPARSE_OPS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
step matmul 170 "$PY" -m prune bench matmul --device cuda --dtype fp16,bf16 --shapes llama-7b,llama-70b,bert-base --tokens 1,16,128,2048 --sparsity 0.5,0.7,0.9,0.98 --formats dense,csr,2:4,auto --repeats 5 --max-seconds 150 --out "$OUT"
step families 55 "$PY" -m prune bench families --device cuda --tokens 1,16,128,2048 --repeats 7 --max-seconds 40 --out "$OUT"

echo "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed steps: ${failed[*]}" | tee -a "$LOG" >&2
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$LOG"
