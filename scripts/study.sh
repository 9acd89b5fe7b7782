#!/usr/bin/env bash
# The study behind RESULTS.md, from scratch: every training run, then report.py and theory.py.
#
#   bash scripts/study.sh            # full: 3 seeds per task x loss (see RESULTS.md for its CPU time)
#   bash scripts/study.sh quick      # a laptop's hour: 2 seeds, CE and soft Dice, the short schedule, 3 tasks
#   JOBS=2 bash scripts/study.sh     # runs in parallel, one CPU core each
#   bash scripts/study.sh list       # print the runs, do nothing
#
# Runs go to $STUDY_DIR (logs/study) as <task>/<loss>/seed<k>, the cross-entropy ablations to
# $RESIDUAL_DIR (logs/ce_residual) as <setting>/ce/seed<k>; running the script again continues
# every interrupted run from its last.ckpt and leaves finished ones as they are. The reports go to results/study and
# results/ce_residual (quick: $STUDY_DIR/report), the theory curves to results/theory.
# results/study_runs (results/ce_residual_runs: the ablations) keeps the finished runs' records without their checkpoints (config, metrics.json,
# subjects.csv, calibration.csv, csv/metrics.csv): `cp -r results/study_runs/. logs/study/` before this
# script continues a study where those runs are done; `python report.py results/study_runs` reports them.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
study=${STUDY_DIR:-logs/study}
residual=${RESIDUAL_DIR:-logs/ce_residual}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled
common="data.num_workers=0 logger=csv callbacks.validation_figures=null trainer.enable_progress_bar=false trainer.enable_model_summary=false"

runs=()  # "<run dir> <overrides>"
add() {  # add FOLDER "LOSSES" "SEEDS" OVERRIDES...
    local folder=$1 losses=$2 seeds=$3
    shift 3
    for loss in $losses; do
        for seed in $seeds; do
            runs+=("$folder/$loss/seed$seed loss=$loss seed=$seed $*")
        done
    done
}

if [ "$mode" = quick ]; then
    for task in high_uncertainty boundary_uncertainty large_field_of_view; do
        epochs=$([ $task = boundary_uncertainty ] && echo 8 || ([ $task = large_field_of_view ] && echo 30 || echo 60))
        add "$study/$task" "ce softdice" "0 1" experiment=$task trainer.max_epochs=$epochs trainer.check_val_every_n_epoch=2
    done
else
    seeds="0 1 2"
    short="experiment=high_uncertainty trainer.max_epochs=60"
    # in order of importance, so that an interrupted study has its core first
    # 1. the core: CE against soft Dice on the small synthetic tasks
    for task in high_uncertainty boundary_uncertainty medium_uncertainty low_uncertainty; do
        add "$study/$task" "ce softdice" "$seeds" experiment=$task
    done
    # 2. a real field of view, and real anatomy (the longest runs: 4-5 times a small task's)
    for task in large_field_of_view mni152_grey_matter; do
        for seed in $seeds; do  # seed by seed, so that an interrupted study has both losses of the first seeds
            add "$study/$task" "ce softdice" "$seed" experiment=$task
        done
    done
    # 3. cross-entropy's residual: what moves it (RESULTS.md)
    for task in high low medium; do
        add "$residual/${task}_short" ce "$seeds" experiment=${task}_uncertainty trainer.max_epochs=60
    done
    add "$residual/boundary_short" ce "$seeds" experiment=boundary_uncertainty trainer.max_epochs=8
    add "$residual/high_short_no_intensity_augmentation" ce "$seeds" $short data.augmentation.gamma=null data.augmentation.noise=null
    add "$residual/high_short_no_augmentation" ce "$seeds" $short data.augmentation=null
    add "$residual/high_short_no_weight_decay" ce "$seeds" $short model.optimizer.weight_decay=0
    add "$residual/high_short_sgd" ce "$seeds" $short model/optimizer=sgd
    add "$residual/high_short_constant_lr" ce "$seeds" $short model.scheduler=null
    add "$residual/high_two_thirds" ce "$seeds" experiment=high_uncertainty trainer.max_epochs=120
    add "$residual/high_full_no_intensity_augmentation" ce "$seeds" experiment=high_uncertainty \
        data.augmentation.gamma=null data.augmentation.noise=null
    add "$residual/medium_full_no_intensity_augmentation" ce "$seeds" experiment=medium_uncertainty \
        data.augmentation.gamma=null data.augmentation.noise=null
    add "$residual/medium_double" ce "$seeds" experiment=medium_uncertainty trainer.max_epochs=360
    # 4. batch Dice and DC+CE on the small synthetic tasks
    for task in high_uncertainty boundary_uncertainty medium_uncertainty low_uncertainty; do
        add "$study/$task" "softdice_batch ce_softdice" "$seeds" experiment=$task
    done
    # 5. soft targets (the label's probability map) and the losses that claim to calibrate Dice
    add "$study/high_uncertainty_soft_labels" "ce softdice softdice_softlabel" "$seeds" \
        experiment=high_uncertainty data.label_mode=soft task_name=high_uncertainty_soft_labels
    add "$study/high_uncertainty" "dscpp focal unified_focal" "$seeds" experiment=high_uncertainty
    # 6. several raters per image, and the remedies of the paper's citations: Nordström's calibrated Dice
    #    surrogate, Hong's Tversky hypernetwork
    add "$study/multi_rater" "ce softdice" "$seeds" experiment=multi_rater
    for task in high_uncertainty boundary_uncertainty multi_rater; do
        add "$study/$task" calibrated_dice "$seeds" experiment=$task
        for seed in $seeds; do
            runs+=("$study/$task/tversky_hypernet/seed$seed loss=tversky model=tversky_hypernet seed=$seed experiment=$task")
        done
    done
    # 7. Hong et al.'s ensemble: Tversky networks of alpha 0.3, 0.5, 0.7 (false positives; beta = 1 - alpha), averaged
    #    per seed by evaluate.py after training (results/ensembles/<task>/tversky_ensemble/seed<k>)
    for task in high_uncertainty multi_rater; do
        for pair in 0.3:0.7 0.5:0.5 0.7:0.3; do
            for seed in $seeds; do
                runs+=("$study/$task/tversky_a${pair%:*}/seed$seed loss=tversky loss.alpha=${pair%:*} loss.beta=${pair#*:} seed=$seed experiment=$task")
            done
        done
    done
    # 8. lesions (issue 21): per-lesion volume bias against lesion radius, and detection by size
    add "$study/multi_lesion" "ce softdice softdice_batch ce_softdice" "$seeds" experiment=multi_lesion
fi

if [ "$mode" = list ]; then
    printf '%s\n' "${runs[@]}"
    exit 0
fi

run_one() {  # run_one RUN_DIR OVERRIDES...: train, or continue an interrupted run (auto_resume); a finished one is left as it is
    local dir=$1
    shift
    if [ -f "$dir/metrics.json" ] && [ ! -d "$dir/checkpoints" ]; then
        return 0  # a finished run's record without its checkpoints (results/study_runs, copied back): nothing to resume
    fi
    mkdir -p "$(dirname "$dir")"
    # shellcheck disable=SC2086
    python train.py "$@" $common hydra.run.dir="$dir" >> "$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)" >&2
}
export -f run_one
export common
started=$(date +%s)
printf '%s\n' "${runs[@]}" | xargs -P "${JOBS:-1}" -L 1 bash -c 'run_one "$@"' _
echo "training: $(( ($(date +%s) - started) / 60 )) min for ${#runs[@]} runs with JOBS=${JOBS:-1}" >&2

if [ "$mode" = quick ]; then
    python report.py "$study" --output "$study/report"
else
    evaluate() {  # evaluate OUTPUT CHECKPOINT_GLOB: one ensemble's whole-volume validation into results/ensembles;
        # skipped where no checkpoint matches (runs restored from results/study_runs keep none)
        local members
        read -ra members <<< "$(compgen -G "$2" | tr '\n' ' ')"
        [ "${#members[@]}" -gt 0 ] || return 0
        python evaluate.py "ckpt_path=$2" hydra.run.dir="$1" trainer.enable_progress_bar=false >&2
    }
    for task in high_uncertainty boundary_uncertainty; do  # deep ensembles: the three seeds of one loss
        for loss in ce softdice; do
            evaluate "results/ensembles/$task/$loss" "$study/$task/$loss/seed*/checkpoints/last.ckpt"
        done
    done
    for task in high_uncertainty multi_rater; do  # Hong et al.'s Tversky ensembles, one per seed
        for seed in $seeds; do
            evaluate "results/ensembles/$task/tversky_ensemble/seed$seed" "$study/$task/tversky_a*/seed$seed/checkpoints/last.ckpt"
        done
    done
    python scripts/summarise_evaluations.py results/ensembles > results/ensembles/summary.md
    bash scripts/keep_study_records.sh "$study" results/study_runs
    bash scripts/keep_study_records.sh "$residual" results/ce_residual_runs
    python report.py "$study" --output results/study
    python report.py "$residual" "$study/high_uncertainty/ce" "$study/boundary_uncertainty/ce" "$study/low_uncertainty/ce" \
        "$study/medium_uncertainty/ce" --output results/ce_residual --no-theory
    python theory.py hydra.run.dir=results/theory
fi
