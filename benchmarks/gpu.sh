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
want() { [[ " $PARTS " == *" $1 "* ]]; }
want train_step && bench train_step 150 "${COMMON[@]}"
want inference && bench inference 150 "${COMMON[@]}"
want overhead && bench overhead "${OVERHEAD_TIMEOUT:-240}" "${COMMON[@]}" --losses "${OVERHEAD_LOSSES:-ce,softdice,softdice_batch,ce_softdice}"
# training: real pl.Trainer fits, our data pipeline vs one in-memory batch (data-loading cost,
# waiting fraction, peak memory); 8 generated 192^3 .nii.gz volumes, cache built first.
want training && bench training 200 "${COMMON[@]}" --steps 60 --warmup 15 --volumes 6
# issue 5: a short 1-GPU `trainer=gpu` run (bf16-mixed) of train.py itself
if want train_bf16; then
  echo "=== train.py trainer=gpu (bf16-mixed)"
  if timeout 150 "$PYTHON" train.py trainer=gpu trainer.max_epochs=3 trainer.enable_progress_bar=false \
      data.num_workers=8 paths.log_dir="$OUT/train_logs" 2>&1 | tee "$OUT/bench_train_bf16.log"; then
    cp "$OUT"/train_logs/train/runs/*/metrics.json "$OUT/train_bf16_metrics.json" || true
  else
    failed+=("train_bf16")
  fi
fi

# PARTS picks what runs (default: everything, about 8 minutes).
PARTS=${PARTS:-"train_step inference overhead training train_bf16"}

echo "=== results ($RESULTS)"
cat "$RESULTS"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
