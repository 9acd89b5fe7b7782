#!/usr/bin/env bash
# GPU benchmark run at nnU-Net size (bf16). Each benchmark runs under `timeout`, its output
# goes to ${OUT:-/tmp}/bench_<name>.log, and every result line ({"name": ...}) is collected in
# ${OUT:-/tmp}/bench_results.jsonl. A failing or timed-out benchmark does not stop the others;
# the script exits non-zero at the end if any failed. Budget: about 4 minutes of GPU time.
#
#   bash benchmarks/gpu.sh
#   PYTHON=python3 BENCH_SITE=/path/to/extra/site-packages bash benchmarks/gpu.sh
#
# BENCH_SITE (optional) is prepended to PYTHONPATH, for machines whose Python lacks the
# project's dependencies (monai, torchio, hydra-core, dynamic-network-architectures, ...).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -n "${BENCH_SITE:-}" ]]; then
  export PYTHONPATH="${BENCH_SITE}${PYTHONPATH:+:$PYTHONPATH}"
fi
RESULTS="$OUT/bench_results.jsonl"
: >"$RESULTS"
failed=()

nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/bench_gpu.log"

# bench NAME TIMEOUT_S ARGS...: run benchmarks/NAME.py, log, collect its result lines.
bench() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/bench_${name}.log"
  echo "=== $name (timeout ${limit}s): $*"
  if timeout "$limit" "$PYTHON" "benchmarks/${name}.py" "$@" 2>&1 | tee "$log"; then
    grep '^{"name"' "$log" >>"$RESULTS" || true
  else
    echo "!!! $name failed or timed out (exit ${PIPESTATUS[0]})"
    failed+=("$name")
  fi
}

COMMON=(--device cuda --precision bf16)

# --- model, inference, overhead (nnU-Net size: features 32..320, patch 128^3, batch 2) ---
# train_step: ~70 steps per model; inference: 256^3 volume, 27 patches, 8 volumes per method;
# overhead: 4 losses x (bare steps + a short pl.Trainer run with sync counting).
bench train_step 150 "${COMMON[@]}"
bench inference 150 "${COMMON[@]}"
bench overhead 240 "${COMMON[@]}"

# pipeline + training throughput: added separately

echo "=== results ($RESULTS)"
cat "$RESULTS"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
