"""The rows of ``results.csv``: one per task × loss × class, from the runs of each group.

Seeds: every measure is first averaged per subject over the group's runs (seeds), then
summarised over subjects as mean and sample sd (``<measure>_mean``, ``<measure>_sd``), so the
sd is the spread between subjects. Tests against cross-entropy pair those seed-averaged
subjects with the same subjects of the task's CE group (see :func:`paired_wilcoxon`).
``class`` is ``all`` for the class mean (subjects.csv's plain columns: with several
foreground classes, the mean over classes of each volume and Dice), or a class name.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from reporting.grouping import Group, reference_group
from reporting.measures import subject_measures
from reporting.statistics import mean_sd, paired_wilcoxon, subject_means
from reporting.theory_link import Theory

MEASURES = (
    "dice", "volume_bias_ml", "relative_volume_bias", "abs_volume_error_ml",
    "soft_volume_bias_ml", "soft_relative_volume_bias",
    "relative_expected_volume_bias", "relative_soft_expected_volume_bias", "ece",
    "calibrated_relative_volume_bias", "calibrated_relative_expected_volume_bias",
    "threshold_dice", "threshold_relative_volume_bias", "threshold_relative_expected_volume_bias",
    "rankseg_dice", "rankseg_relative_volume_bias", "rankseg_relative_expected_volume_bias",
)
# dataset-level values fitted at the final validation (metrics.json), mean and sd over runs
FITTED = {"pooled_ece": "val/ece", "ece_calibrated": "val/ece_calibrated", "temperature": "val/temperature",
          "threshold": "val/threshold"}
TESTED = ("dice", "volume_bias_ml", "soft_volume_bias_ml")  # paired with cross-entropy
COLUMNS = (
    "task", "loss", "class", "n_runs", "seeds", "n_subjects",
    *(f"{m}_{s}" for m in (*MEASURES, *FITTED) for s in ("mean", "sd")),
    "n_pairs_vs_ce", *(f"{c}_{m}_vs_ce" for m in TESTED for c in ("diff", "p")),
    "theory_relative_soft_bias", "theory_relative_hard_bias",
)
ALL_CLASSES = "all"


def group_measures(group: Group, suffix: str = "") -> dict[str, dict[str, float]]:
    """Each measure's per-subject values averaged over the group's runs (seeds)."""
    per_run = [subject_measures(run.subjects, suffix) for run in group.runs]
    names = sorted(set().union(*per_run))
    return {name: subject_means(measures[name] for measures in per_run if name in measures) for name in names}


def _metric_over_runs(group: Group, key: str) -> tuple[float, float]:
    """Mean and sd over runs of a metrics.json value."""
    return mean_sd(float(run.metrics[key]) for run in group.runs if isinstance(run.metrics.get(key), (int, float)))


def result_rows(groups: list[Group], theory: Theory | None = None) -> list[dict[str, object]]:
    """One dict per group and class (the ``all`` row first), keyed by :data:`COLUMNS`."""
    rows = []
    for group in groups:
        reference = reference_group(groups, group.task)
        classes = sorted(set().union(*(run.class_names() for run in group.runs)))
        for name in (ALL_CLASSES, *classes):
            suffix = "" if name == ALL_CLASSES else f"/{name}"
            measures = group_measures(group, suffix)
            row: dict[str, object] = {column: math.nan for column in COLUMNS}
            row.update(task=group.task, loss=group.loss, **{"class": name}, n_runs=len(group.runs),
                       seeds=" ".join(str(run.seed) for run in group.runs),
                       n_subjects=len(measures.get("dice", {})))
            for measure in MEASURES:
                if measure in measures:
                    row[f"{measure}_mean"], row[f"{measure}_sd"] = mean_sd(measures[measure].values())
            for column, key in FITTED.items():
                row[f"{column}_mean"], row[f"{column}_sd"] = _metric_over_runs(group, f"{key}{suffix}")
            if reference is not None and reference is not group:
                reference_measures = group_measures(reference, suffix)
                tests = {m: paired_wilcoxon(measures[m], reference_measures[m])
                         for m in TESTED if m in measures and m in reference_measures}
                for measure, test in tests.items():
                    row[f"diff_{measure}_vs_ce"], row[f"p_{measure}_vs_ce"] = test.mean_difference, test.p_value
                row["n_pairs_vs_ce"] = max((test.pairs for test in tests.values()), default=0)
            if name == ALL_CLASSES and theory is not None:
                prediction = theory.prediction(group)
                if prediction is not None:
                    row["theory_relative_soft_bias"] = prediction["relative_soft"]
                    row["theory_relative_hard_bias"] = prediction["relative_hard"]
            rows.append(row)
    return rows


def measured_relative_bias(row: dict[str, object]) -> tuple[float, float, str]:
    """The row's measured relative soft and argmax volume bias to compare with the theory:
    against the expected volume where known, else against the reference; and which."""
    soft, hard = row["relative_soft_expected_volume_bias_mean"], row["relative_expected_volume_bias_mean"]
    if not (math.isnan(soft) and math.isnan(hard)):
        return soft, hard, "expected"
    return row["soft_relative_volume_bias_mean"], row["relative_volume_bias_mean"], "reference"


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """``rows`` as CSV with :data:`COLUMNS` (NaN written as ``nan``)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
