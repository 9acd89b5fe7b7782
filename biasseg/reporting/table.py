"""The rows of ``results.csv`` (one per task × loss × class) and ``subjects.csv`` (one per
run × subject × class), from the runs of each group.

Seeds are the unit (see :mod:`biasseg.reporting.statistics`): each measure is averaged over a run's
subjects, then summarised over the group's runs as ``<measure>_mean`` and ``<measure>_sd``
(the sd across training seeds); ``<measure>_subject_sd`` is the spread between subjects after
averaging each subject over the seeds, for context. Every loss is compared with the task's
cross-entropy group by Welch's t-test on the run means (``diff_…_vs_ce``, ``p_…_vs_ce``), and
all p-values of the report are Holm-corrected together (``p_holm_…_vs_ce``). Measured biases
are also given as excess over cross-entropy, beside the theory's excess over cross-entropy's
theoretical optimum. The run-level ratios of sums (``pooled_…``, :func:`biasseg.reporting.measures.pooled_measures`)
are summarised over runs the same way. ``class`` is ``all`` for the class mean (subjects.csv's plain columns:
with several foreground classes, the mean over classes of each volume and Dice), or a class
name.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from biasseg.reporting.grouping import Group, reference_group
from biasseg.reporting.measures import POOLED, pooled_measures, subject_measures
from biasseg.reporting.statistics import holm, mean_sd, nanmean, subject_means, welch_test
from biasseg.reporting.theory_link import Theory

MEASURES = (
    "dice", "volume_bias_ml", "relative_volume_bias", "abs_volume_error_ml",
    "soft_volume_bias_ml", "soft_relative_volume_bias", "near_soft_relative_volume_bias",
    "relative_expected_volume_bias", "relative_soft_expected_volume_bias", "relative_near_soft_expected_volume_bias",
    "ece",
    "calibrated_relative_volume_bias", "calibrated_relative_expected_volume_bias",
    "platt_relative_volume_bias", "platt_relative_expected_volume_bias",
    "isotonic_relative_volume_bias", "isotonic_relative_expected_volume_bias",
    "threshold_dice", "threshold_relative_volume_bias", "threshold_relative_expected_volume_bias",
    "rankseg_dice", "rankseg_relative_volume_bias", "rankseg_relative_expected_volume_bias",
    "quote_relative_volume_bias", "quote_relative_expected_volume_bias",
    "ged", "dice_raters_mean", "within_rater_range", "soft_within_rater_range",
)
# dataset-level values fitted at the final validation (metrics.json), mean and sd over runs
FITTED = {
    "pooled_ece": "val/ece", "ece_top_label": "val/ece_top_label", "ece_calibrated": "val/ece_calibrated",
    "ece_platt": "val/ece_platt", "ece_isotonic": "val/ece_isotonic", "temperature": "val/temperature",
    "platt_slope": "val/platt_slope", "platt_bias": "val/platt_bias", "threshold": "val/threshold",
    "interval_coverage": "val/interval_coverage", "interval_expected_coverage": "val/interval_expected_coverage",
    "interval_relative_width": "val/interval_relative_width", "sd_coverage": "val/sd_coverage",
    "sd_expected_coverage": "val/sd_expected_coverage",
}
TESTED = ("dice", "volume_bias_ml", "soft_volume_bias_ml")  # against cross-entropy, over runs
# measured bias -> the theory column it is compared with (both as excess over cross-entropy)
EXCESS = {"relative_soft_expected_volume_bias": "theory_relative_soft_bias",
          "relative_expected_volume_bias": "theory_relative_hard_bias"}
COLUMNS = (
    "task", "loss", "class", "n_runs", "seeds", "n_subjects",
    *(f"{m}_{s}" for m in MEASURES for s in ("mean", "sd", "subject_sd")),
    *(f"{c}_{s}" for c in FITTED for s in ("mean", "sd")),
    *(f"{c}_{s}" for c in POOLED for s in ("mean", "sd")),
    "n_runs_ce", *(f"{c}_{m}_vs_ce" for m in TESTED for c in ("diff", "p", "p_holm")),
    "theory_relative_soft_bias", "theory_relative_hard_bias",
    *(f"{c}_{m}" for m in EXCESS for c in ("excess_vs_ce", "excess_vs_ce_se", "theory_excess_vs_ce")),
)
SUBJECT_COLUMNS = ("task", "loss", "class", "seed", "run", "subject", *MEASURES)
ALL_CLASSES = "all"


def run_measures(group: Group, suffix: str = "") -> list[dict[str, dict[str, float]]]:
    """Per run of the group: each measure as ``{subject: value}``."""
    return [subject_measures(run.subjects, suffix) for run in group.runs]


def run_means(group: Group, measure: str, suffix: str = "") -> list[float]:
    """Each run's mean of ``measure`` over its subjects (runs without the measure left out)."""
    return [nanmean(m[measure].values()) for m in run_measures(group, suffix) if measure in m]


def _metric_over_runs(group: Group, key: str) -> tuple[float, float]:
    """Mean and sd over runs of a metrics.json value."""
    return mean_sd(float(run.metrics[key]) for run in group.runs if isinstance(run.metrics.get(key), (int, float)))


def _classes(group: Group) -> list[str]:
    return [ALL_CLASSES, *sorted(set().union(*(run.class_names() for run in group.runs)))]


def result_rows(groups: list[Group], theory: Theory | None = None) -> list[dict[str, object]]:
    """One dict per group and class (the ``all`` row first), keyed by :data:`COLUMNS`."""
    rows = []
    for group in groups:
        reference = reference_group(groups, group.task)
        for name in _classes(group):
            suffix = "" if name == ALL_CLASSES else f"/{name}"
            per_run = run_measures(group, suffix)
            row: dict[str, object] = {column: math.nan for column in COLUMNS}
            seed_averaged = {m: subject_means(r[m] for r in per_run if m in r) for m in MEASURES}
            row.update(task=group.task, loss=group.loss, **{"class": name}, n_runs=len(group.runs),
                       seeds=" ".join(str(run.seed) for run in group.runs),
                       n_subjects=len(seed_averaged["dice"]))
            for measure in MEASURES:
                means = [nanmean(r[measure].values()) for r in per_run if measure in r]
                if means:
                    row[f"{measure}_mean"], row[f"{measure}_sd"] = mean_sd(means)
                    row[f"{measure}_subject_sd"] = mean_sd(seed_averaged[measure].values())[1]
            for column, key in FITTED.items():
                row[f"{column}_mean"], row[f"{column}_sd"] = _metric_over_runs(group, f"{key}{suffix}")
            pooled = [pooled_measures(run.subjects, suffix) for run in group.runs]
            for column in POOLED:
                row[f"{column}_mean"], row[f"{column}_sd"] = mean_sd(p[column] for p in pooled if column in p)
            if name == ALL_CLASSES and theory is not None:
                prediction = theory.prediction(group)
                if prediction is not None:
                    row["theory_relative_soft_bias"] = prediction["relative_soft"]
                    row["theory_relative_hard_bias"] = prediction["relative_hard"]
            if reference is not None:
                row["n_runs_ce"] = len(reference.runs)
            if reference is not None and reference is not group:
                for measure in TESTED:
                    test = welch_test(run_means(group, measure, suffix), run_means(reference, measure, suffix))
                    row[f"diff_{measure}_vs_ce"], row[f"p_{measure}_vs_ce"] = test.difference, test.p_value
            rows.append(row)
    _excess_over_cross_entropy(rows, groups)
    tested = [(row, f"{m}_vs_ce") for row in rows for m in TESTED if not math.isnan(row[f"p_{m}_vs_ce"])]
    for (row, key), adjusted in zip(tested, holm([row[f"p_{key}"] for row, key in tested])):
        row[f"p_holm_{key}"] = adjusted
    return rows


def _excess_over_cross_entropy(rows: list[dict[str, object]], groups: list[Group]) -> None:
    """Fill the ``excess_vs_ce`` columns: a loss's mean bias minus cross-entropy's (with the
    standard error of that difference over seeds), and the theory's difference."""
    by_key = {(row["task"], row["loss"], row["class"]): row for row in rows}
    for row in rows:
        reference = reference_group(groups, str(row["task"]))
        ce = by_key.get((row["task"], reference.loss, row["class"])) if reference is not None else None
        if ce is None:
            continue
        for measure, theory in EXCESS.items():
            mean, ce_mean = row[f"{measure}_mean"], ce[f"{measure}_mean"]
            row[f"excess_vs_ce_{measure}"] = mean - ce_mean
            sd, ce_sd = row[f"{measure}_sd"], ce[f"{measure}_sd"]
            row[f"excess_vs_ce_se_{measure}"] = math.sqrt(sd**2 / row["n_runs"] + ce_sd**2 / ce["n_runs"])
            ce_theory = ce[theory]
            row[f"theory_excess_vs_ce_{measure}"] = row[theory] - ce_theory


def subject_rows(groups: list[Group], folder: Path) -> list[dict[str, object]]:
    """Every run's per-subject measures (``SUBJECT_COLUMNS``), the rows behind results.csv."""
    rows = []
    for group in groups:
        for name in _classes(group):
            suffix = "" if name == ALL_CLASSES else f"/{name}"
            for run, measures in zip(group.runs, run_measures(group, suffix)):
                subjects = sorted(set().union(*(values.keys() for values in measures.values())))
                location = os.path.relpath(run.path, folder)
                for subject in subjects:
                    row: dict[str, object] = {"task": group.task, "loss": group.loss, "class": name, "seed": run.seed,
                                              "run": location, "subject": subject}
                    row.update({m: measures[m].get(subject, math.nan) if m in measures else math.nan for m in MEASURES})
                    rows.append(row)
    return rows


HISTORY_KEYS = ("val/dice", "val/relative_soft_expected_volume_bias", "val/relative_expected_volume_bias",
                "val/soft_relative_volume_bias", "val/relative_volume_bias")
HISTORY_COLUMNS = ("task", "loss", "seed", "run", "step", *HISTORY_KEYS)


def history_rows(groups: list[Group], folder: Path) -> list[dict[str, object]]:
    """Every run's validations during training (``HISTORY_COLUMNS``, from its csv/metrics.csv):
    the numbers behind the bias-vs-steps figures."""
    rows = []
    for group in groups:
        for run in group.runs:
            by_step: dict[int, dict[str, float]] = {}
            for key in HISTORY_KEYS:
                for step, value in run.history.get(key, []):
                    by_step.setdefault(step, {})[key] = value
            location = os.path.relpath(run.path, folder)
            for step in sorted(by_step):
                rows.append({"task": group.task, "loss": group.loss, "seed": run.seed, "run": location, "step": step,
                             **{key: by_step[step].get(key, math.nan) for key in HISTORY_KEYS}})
    return rows


def measured_relative_bias(row: dict[str, object]) -> tuple[float, float, str]:
    """The row's measured relative soft and argmax volume bias to compare with the theory:
    against the expected volume where known, else against the reference; and which."""
    soft, hard = row["relative_soft_expected_volume_bias_mean"], row["relative_expected_volume_bias_mean"]
    if not (math.isnan(soft) and math.isnan(hard)):
        return soft, hard, "expected"
    return row["soft_relative_volume_bias_mean"], row["relative_volume_bias_mean"], "reference"


def write_csv(rows: list[dict[str, object]], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """``rows`` as CSV with ``columns`` (NaN written as ``nan``)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
