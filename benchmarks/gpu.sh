#!/usr/bin/env bash
# The one prepared GPU run (issue 22): a real nnU-Net-sized bf16 training of train.py on the
# embedded data, evaluate.py in bf16 and fp32 on its checkpoint, predict.py on two NIfTI files,
# then every benchmark beside its peer (nnU-Net, MONAI, TorchIO). About 8 minutes on one GPU.
#
#   bash benchmarks/gpu.sh          # on a GPU; appends the dated table to benchmarks/RESULTS.md
#   bash benchmarks/gpu.sh --cpu    # rehearsal: the same steps, tiny sizes, on the CPU (~4 min on 2 cores; .ci/run)
#
# Every step runs under `timeout` and logs to $OUT/<step>.log (OUT defaults to a new temporary
# folder); a failing or timed-out step does not stop the others, and the script exits non-zero
# at the end if any failed. The benchmarks' result lines are collected in
# $OUT/bench_results.jsonl and benchmarks/record_gpu.py writes them, with the training and
# evaluation numbers, as $OUT/gpu_results.md. PARTS="train benchmarks" picks what runs.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
PYTHON=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
PARTS=${PARTS:-"train benchmarks"}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
RESULTS="$OUT/bench_results.jsonl"
: >"$RESULTS"
: >"$OUT/steps.tsv"
failed=()

# step NAME TIMEOUT_S COMMAND...: run it, log it; remember a failure and go on.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status=passed
  echo "=== $name (timeout ${limit}s): $*"
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    grep '^{"name"' "$OUT/$name.log" >>"$RESULTS" || true
    tail -n 3 "$OUT/$name.log"
  else
    status=failed
    echo "!!! $name failed or timed out; the end of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log"
    failed+=("$name")
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$OUT/steps.tsv"
}
want() { [[ " $PARTS " == *" $1 "* ]]; }

if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  TRAIN=(trainer=gpu model=nnunet "data.patch_size=[128,128,128]" "data.shape=[160,160,128]" data.num_train=8
         data.num_val=4 data.steps_per_epoch=50 trainer.max_epochs=3 data.num_workers=8)
  EVAL_BF16=(trainer=gpu) EVAL_FP32=(trainer=gpu trainer.precision=32-true)
  BENCH=(--device cuda --precision bf16)
  STEP_REPEATS=() INFERENCE_REPEATS=() OVERHEAD_REPEATS=()
  MEMORY=(--device cuda --precision bf16)
else
  echo "CPU rehearsal: $(nproc) cores" | tee "$OUT/device.txt"
  TRAIN=(trainer=cpu "model.features=[4,8]" "data.patch_size=[16,16,16]" "data.shape=[32,32,16]" data.num_train=4
         data.num_val=2 data.steps_per_epoch=4 trainer.max_epochs=2 trainer.precision=bf16-mixed data.num_workers=0)
  EVAL_BF16=(trainer=cpu trainer.precision=bf16-mixed) EVAL_FP32=(trainer=cpu trainer.precision=32-true)
  BENCH=(--quick)  # the rehearsal's point is that every step runs, so each benchmark repeats little
  STEP_REPEATS=(--warmup 1 --rounds 2 --steps 1) INFERENCE_REPEATS=(--rounds 1)
  OVERHEAD_REPEATS=(--warmup 1 --rounds 1 --steps 1 --windows 1)
  MEMORY=(--quick --volume 96,96,64)
fi
QUIET=(logger=csv trainer.enable_progress_bar=false)

if want train; then
  run="$OUT/train"
  step train 240 "$PYTHON" train.py "${TRAIN[@]}" "${QUIET[@]}" hydra.run.dir="$run"
  ckpt="$run/checkpoints/last.ckpt"
  step evaluate_bf16 120 "$PYTHON" evaluate.py ckpt_path="$ckpt" "${EVAL_BF16[@]}" trainer.enable_progress_bar=false hydra.run.dir="$OUT/evaluate_bf16"
  step evaluate_fp32 120 "$PYTHON" evaluate.py ckpt_path="$ckpt" "${EVAL_FP32[@]}" trainer.enable_progress_bar=false hydra.run.dir="$OUT/evaluate_fp32"
  rm -rf "$OUT/nifti"
  step nifti 60 "$PYTHON" -c "import sys; from pathlib import Path; from biasseg.generated_folders import write_msd; write_msd(Path(sys.argv[1]), num_cases=2, channels=1)" "$OUT/nifti"
  step predict 120 "$PYTHON" predict.py ckpt_path="$ckpt" input="$OUT/nifti/imagesTr" output="$OUT/predictions" hydra.run.dir="$OUT/predict_run"
fi

if want benchmarks; then
  step train_step 150 "$PYTHON" benchmarks/train_step.py "${BENCH[@]}" "${STEP_REPEATS[@]}"
  step inference 150 "$PYTHON" benchmarks/inference.py "${BENCH[@]}" "${INFERENCE_REPEATS[@]}"
  step inference_memory 180 "$PYTHON" benchmarks/inference_memory.py "${MEMORY[@]}"
  step overhead 240 "$PYTHON" benchmarks/overhead.py "${BENCH[@]}" "${OVERHEAD_REPEATS[@]}" --losses ce,softdice,softdice_batch,ce_softdice
  if [[ $MODE == gpu ]]; then
    step training 200 "$PYTHON" benchmarks/training.py --device cuda --precision bf16 --steps 60 --warmup 15 --volumes 6
    step pipeline 150 "$PYTHON" benchmarks/pipeline.py
  else
    step training 200 "$PYTHON" benchmarks/training.py --device cpu --features 4,8 --patch 32 --shape 48 --steps 12 --warmup 4 --volumes 3 --workers 1
    step pipeline 150 "$PYTHON" benchmarks/pipeline.py --shape 48 --patch 32 --volumes 3 --patches 16 --rounds 2 --workers 1
  fi
fi

step record 60 "$PYTHON" benchmarks/record_gpu.py "$OUT" --mode "$MODE"
cat "$OUT/gpu_results.md" 2>/dev/null || true
if [[ $MODE == gpu && -f "$OUT/gpu_results.md" ]]; then
  { echo; cat "$OUT/gpu_results.md"; } >>benchmarks/RESULTS.md
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"  # what comes back from a lent machine is $OUT
fi
if ((${#failed[@]})); then
  echo "failed: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "all steps passed (logs in $OUT)"
