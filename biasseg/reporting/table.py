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

The grouping and aggregation are pandas (a long frame of subject measures, then groupby);
hand-written here is only what is specific to the study: which group is a task's
cross-entropy reference, the excess over it, and the tests (:mod:`biasseg.reporting.statistics`).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from biasseg.reporting.grouping import Group, reference_group
from biasseg.reporting.measures import POOLED, pooled_measures, subject_measures
from biasseg.reporting.statistics import holm, welch_test
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


def _classes(group: Group) -> list[str]:
    return [ALL_CLASSES, *sorted(set().union(*(run.class_names() for run in group.runs)))]


def _suffix(name: str) -> str:
    return "" if name == ALL_CLASSES else f"/{name}"


def subject_frame(groups: list[Group]) -> pd.DataFrame:
    """Long form: one row per group × class × run × subject (``group``, ``class``, ``run``: the
    group's and run's index, ``subject``) with every :data:`MEASURES` column (NaN where the run
    lacks the measure)."""
    records = []
    for g, group in enumerate(groups):
        for name in _classes(group):
            for r, run in enumerate(group.runs):
                measures = subject_measures(run.subjects, _suffix(name))
                for subject in sorted(set().union(*(values.keys() for values in measures.values()))):
                    records.append({"group": g, "class": name, "run": r, "subject": subject,
                                    **{m: values.get(subject, math.nan) for m, values in measures.items()}})
    return pd.DataFrame.from_records(records, columns=["group", "class", "run", "subject", *MEASURES]).astype(
        {m: float for m in MEASURES})


def run_frame(groups: list[Group]) -> pd.DataFrame:
    """One row per group × class × run: the run's :data:`FITTED` metrics.json values and
    :data:`POOLED` ratios of sums (NaN where absent)."""
    records = []
    for g, group in enumerate(groups):
        for name in _classes(group):
            for r, run in enumerate(group.runs):
                fitted = {column: run.metrics.get(f"{key}{_suffix(name)}") for column, key in FITTED.items()}
                records.append({"group": g, "class": name, "run": r,
                                **{c: float(v) if isinstance(v, (int, float)) else math.nan for c, v in fitted.items()},
                                **pooled_measures(run.subjects, _suffix(name))})
    return pd.DataFrame.from_records(records, columns=["group", "class", "run", *FITTED, *POOLED]).astype(
        {c: float for c in (*FITTED, *POOLED)})


def result_rows(groups: list[Group], theory: Theory | None = None) -> list[dict[str, object]]:
    """One dict per group and class (the ``all`` row first), keyed by :data:`COLUMNS`.

    pandas does the two-stage aggregation (:mod:`biasseg.reporting.statistics`): each run's
    mean over its subjects, then mean and sd over runs; the subjects' spread after averaging
    each subject over the runs. Means and sds skip NaN; an sd of one value is NaN."""
    keys = ["group", "class"]
    subjects = subject_frame(groups)
    run_means = subjects.groupby([*keys, "run"], sort=False)[list(MEASURES)].mean()
    over_runs = run_means.groupby(level=keys, sort=False).agg(["mean", "std"])
    subject_sd = subjects.groupby([*keys, "subject"], sort=False)[list(MEASURES)].mean().groupby(level=keys).std()
    n_subjects = subjects.groupby(keys)["subject"].nunique()
    runs = run_frame(groups).groupby(keys, sort=False)[[*FITTED, *POOLED]].agg(["mean", "std"])
    rows = []
    for g, group in enumerate(groups):
        reference = reference_group(groups, group.task)
        for name in _classes(group):
            key = (g, name)
            row: dict[str, object] = {column: math.nan for column in COLUMNS}
            row.update(task=group.task, loss=group.loss, **{"class": name}, n_runs=len(group.runs),
                       seeds=" ".join(str(run.seed) for run in group.runs), n_subjects=int(n_subjects.get(key, 0)))
            if key in over_runs.index:
                for measure in MEASURES:
                    row[f"{measure}_mean"] = over_runs.loc[key, (measure, "mean")]
                    row[f"{measure}_sd"] = over_runs.loc[key, (measure, "std")]
                    row[f"{measure}_subject_sd"] = subject_sd.loc[key, measure]
            for column in (*FITTED, *POOLED):
                row[f"{column}_mean"], row[f"{column}_sd"] = runs.loc[key, (column, "mean")], runs.loc[key, (column, "std")]
            if name == ALL_CLASSES and theory is not None:
                prediction = theory.prediction(group)
                if prediction is not None:
                    row["theory_relative_soft_bias"] = prediction["relative_soft"]
                    row["theory_relative_hard_bias"] = prediction["relative_hard"]
            if reference is not None:
                row["n_runs_ce"] = len(reference.runs)
            if reference is not None and reference is not group:
                ce = (groups.index(reference), name)
                for measure in TESTED:
                    ours = run_means.loc[key, measure] if key in over_runs.index else []
                    theirs = run_means.loc[ce, measure] if ce in over_runs.index else []
                    test = welch_test(ours, theirs)
                    row[f"diff_{measure}_vs_ce"], row[f"p_{measure}_vs_ce"] = test.difference, test.p_value
            rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
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
    frame = subject_frame(groups)
    frame.insert(0, "task", [groups[g].task for g in frame["group"]])
    frame.insert(1, "loss", [groups[g].loss for g in frame["group"]])
    frame["seed"] = [groups[g].runs[r].seed for g, r in zip(frame["group"], frame["run"])]
    frame["run"] = [os.path.relpath(groups[g].runs[r].path, folder) for g, r in zip(frame["group"], frame["run"])]
    return frame[list(SUBJECT_COLUMNS)].to_dict("records")


HISTORY_KEYS = ("val/dice", "val/relative_soft_expected_volume_bias", "val/relative_expected_volume_bias",
                "val/soft_relative_volume_bias", "val/relative_volume_bias")
HISTORY_COLUMNS = ("task", "loss", "seed", "run", "step", *HISTORY_KEYS)


def history_rows(groups: list[Group], folder: Path) -> list[dict[str, object]]:
    """Every run's validations during training (``HISTORY_COLUMNS``, from its csv/metrics.csv):
    the numbers behind the bias-vs-steps figures."""
    rows = []
    for group in groups:
        for run in group.runs:
            long = pd.DataFrame([(key, step, value) for key in HISTORY_KEYS for step, value in run.history.get(key, [])],
                                columns=["key", "step", "value"])
            wide = (long.drop_duplicates(["key", "step"], keep="last")  # a step logged twice (a resume): the last value
                    .pivot(index="step", columns="key", values="value").sort_index().reindex(columns=list(HISTORY_KEYS)))
            location = os.path.relpath(run.path, folder)
            rows += [{"task": group.task, "loss": group.loss, "seed": run.seed, "run": location, "step": int(step),
                      **{key: float(value) for key, value in values.items()}} for step, values in wide.iterrows()]
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
