#!/usr/bin/env bash
# Copy every finished study run's record, without its checkpoints, into results/study_runs/:
# .hydra/ (the config), metrics.json, subjects.csv, calibration.csv, lesions.csv (where written) and
# csv/metrics.csv (the history), enough for report.py to report the run again and small enough to commit.
#
#   bash scripts/keep_study_records.sh [STUDY_DIR (logs/study)] [RECORDS_DIR (results/study_runs)]
#
# A run counts as finished when its metrics.json holds the validation of its last epoch
# (trainer.max_epochs - 1 in .hydra/config.yaml); interrupted runs are left out (they continue
# from their checkpoints when scripts/study.sh runs again).
set -euo pipefail
cd "$(dirname "$0")/.."
study=${1:-logs/study}
records=${2:-results/study_runs}
kept=0
while IFS= read -r metrics; do
    run=$(dirname "$metrics")
    target="$records/${run#"$study"/}"
    mkdir -p "$target/csv"
    cp -r "$run/.hydra" "$target/"
    cp "$run/metrics.json" "$run/subjects.csv" "$run/calibration.csv" "$target/"
    cp "$run/csv/metrics.csv" "$target/csv/"
    if [ -f "$run/lesions.csv" ]; then cp "$run/lesions.csv" "$target/"; fi
    kept=$((kept + 1))
done < <(python - "$study" <<'PY'
import json, pathlib, sys
import yaml
for metrics in sorted(pathlib.Path(sys.argv[1]).glob("*/*/seed*/metrics.json")):
    try:
        epochs = yaml.safe_load((metrics.parent / ".hydra" / "config.yaml").read_text())["trainer"]["max_epochs"]
        if json.loads(metrics.read_text())["epoch"] == epochs - 1:
            print(metrics)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        continue
PY
)
echo "kept the records of $kept finished run(s) in $records" >&2
