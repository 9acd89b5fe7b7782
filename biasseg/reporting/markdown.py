"""``report.md``: the tables, the figures, a paragraph per task and the list of runs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from biasseg.reporting.grouping import Group, reference_group
from biasseg.reporting.runs import Run
from biasseg.reporting.table import ALL_CLASSES, measured_relative_bias

Row = dict[str, object]


def number(value: object, digits: int = 3) -> str:
    return "—" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:.{digits}g}"


def signed(value: float, digits: int = 2, unit: str = "") -> str:
    return "—" if math.isnan(value) else f"{value:+.{digits}f}{unit}"


def percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:+.1f} %"


def p_value(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2g}"


def mean_sd(row: Row, measure: str, digits: int = 3, as_percent: bool = False) -> str:
    mean, sd = row[f"{measure}_mean"], row[f"{measure}_sd"]
    if math.isnan(mean):
        return "—"
    if as_percent:
        return percent(mean) if math.isnan(sd) else f"{100 * mean:+.1f} ± {100 * sd:.1f} %"
    return number(mean, digits) if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


Column = tuple[str, str, Callable[[Row], str]]  # header, the results.csv column telling if it exists, text

MAIN_COLUMNS: list[Column] = [
    ("task", "task", lambda r: str(r["task"])),
    ("loss", "loss", lambda r: str(r["loss"])),
    ("runs", "n_runs", lambda r: str(r["n_runs"])),
    ("subjects", "n_subjects", lambda r: str(r["n_subjects"])),
    ("Dice", "dice_mean", lambda r: mean_sd(r, "dice")),
    ("ΔV / ref", "relative_volume_bias_mean", lambda r: mean_sd(r, "relative_volume_bias", as_percent=True)),
    ("soft ΔV / ref", "soft_relative_volume_bias_mean", lambda r: mean_sd(r, "soft_relative_volume_bias", as_percent=True)),
    ("argmax vs expected", "relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "relative_expected_volume_bias", as_percent=True)),
    ("theory argmax", "theory_relative_hard_bias", lambda r: percent(r["theory_relative_hard_bias"])),
    ("soft vs expected", "relative_soft_expected_volume_bias_mean",
     lambda r: mean_sd(r, "relative_soft_expected_volume_bias", as_percent=True)),
    ("theory soft", "theory_relative_soft_bias", lambda r: percent(r["theory_relative_soft_bias"])),
    ("near soft vs expected", "relative_near_soft_expected_volume_bias_mean",
     lambda r: mean_sd(r, "relative_near_soft_expected_volume_bias", as_percent=True)),
    ("pooled ECE", "pooled_ece_mean", lambda r: mean_sd(r, "pooled_ece", 4)),
    ("top-label ECE", "ece_top_label_mean", lambda r: mean_sd(r, "ece_top_label", 4)),
    ("p Dice vs CE", "task", lambda r: p_value(r["p_holm_dice_vs_ce"])),
    ("p ΔV vs CE", "task", lambda r: p_value(r["p_holm_volume_bias_ml_vs_ce"])),
    ("p soft ΔV vs CE", "task", lambda r: p_value(r["p_holm_soft_volume_bias_ml_vs_ce"])),
]
REMEDY_COLUMNS: list[Column] = [
    ("task", "task", lambda r: str(r["task"])),
    ("loss", "loss", lambda r: str(r["loss"])),
    ("soft vs expected", "relative_soft_expected_volume_bias_mean",
     lambda r: mean_sd(r, "relative_soft_expected_volume_bias", as_percent=True)),
    ("T", "temperature_mean", lambda r: mean_sd(r, "temperature", 2)),
    ("temperature-scaled", "calibrated_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "calibrated_relative_expected_volume_bias", as_percent=True)),
    ("Platt a, b", "platt_slope_mean", lambda r: f"{number(r['platt_slope_mean'], 2)}, {number(r['platt_bias_mean'], 2)}"),
    ("Platt-scaled", "platt_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "platt_relative_expected_volume_bias", as_percent=True)),
    ("isotonic", "isotonic_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "isotonic_relative_expected_volume_bias", as_percent=True)),
    ("ECE: raw / T / Platt / isotonic", "pooled_ece_mean",
     lambda r: " / ".join(number(r[f"{k}_mean"], 2) for k in ("pooled_ece", "ece_calibrated", "ece_platt", "ece_isotonic"))),
    ("threshold Dice", "threshold_dice_mean", lambda r: mean_sd(r, "threshold_dice")),
    ("threshold vs expected", "threshold_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "threshold_relative_expected_volume_bias", as_percent=True)),
    ("RankSEG Dice", "rankseg_dice_mean", lambda r: mean_sd(r, "rankseg_dice")),
    ("RankSEG vs expected", "rankseg_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "rankseg_relative_expected_volume_bias", as_percent=True)),
]

QUOTE_COLUMNS: list[Column] = [
    ("task", "task", lambda r: str(r["task"])),
    ("loss", "loss", lambda r: str(r["loss"])),
    ("soft vs expected", "relative_soft_expected_volume_bias_mean",
     lambda r: mean_sd(r, "relative_soft_expected_volume_bias", as_percent=True)),
    ("quoted (recalibrated, held out) vs expected", "quote_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "quote_relative_expected_volume_bias", as_percent=True)),
    ("quoted vs reference", "quote_relative_volume_bias_mean", lambda r: mean_sd(r, "quote_relative_volume_bias", as_percent=True)),
    ("interval covers reference", "interval_coverage_mean", lambda r: mean_sd(r, "interval_coverage", 2)),
    ("covers expected", "interval_expected_coverage_mean", lambda r: mean_sd(r, "interval_expected_coverage", 2)),
    ("width / volume", "interval_relative_width_mean", lambda r: mean_sd(r, "interval_relative_width", 2)),
    ("Σp ± z·SD covers reference", "sd_coverage_mean", lambda r: mean_sd(r, "sd_coverage", 2)),
]

RATER_COLUMNS: list[Column] = [
    ("task", "task", lambda r: str(r["task"])),
    ("loss", "loss", lambda r: str(r["loss"])),
    ("Dice vs majority vote", "dice_mean", lambda r: mean_sd(r, "dice")),
    ("mean Dice vs each rater", "dice_raters_mean_mean", lambda r: mean_sd(r, "dice_raters_mean")),
    ("argmax within the raters' range", "within_rater_range_mean", lambda r: mean_sd(r, "within_rater_range", 2)),
    ("soft within the raters' range", "soft_within_rater_range_mean", lambda r: mean_sd(r, "soft_within_rater_range", 2)),
    ("argmax vs rater mean", "relative_expected_volume_bias_mean", lambda r: mean_sd(r, "relative_expected_volume_bias", as_percent=True)),
    ("soft vs rater mean", "relative_soft_expected_volume_bias_mean",
     lambda r: mean_sd(r, "relative_soft_expected_volume_bias", as_percent=True)),
    ("argmax vs rater mean, ratio of sums", "pooled_relative_expected_volume_bias_mean",
     lambda r: mean_sd(r, "pooled_relative_expected_volume_bias", as_percent=True)),
    ("soft vs rater mean, ratio of sums", "pooled_relative_soft_expected_volume_bias_mean",
     lambda r: mean_sd(r, "pooled_relative_soft_expected_volume_bias", as_percent=True)),
    ("GED", "ged_mean", lambda r: mean_sd(r, "ged")),
]


def _present(rows: list[Row], column: str) -> bool:
    return any(not (isinstance(r[column], float) and math.isnan(r[column])) for r in rows)


def markdown_table(rows: list[Row], columns: list[Column]) -> str:
    """A markdown table of ``rows`` with the columns whose results.csv column has some value."""
    shown = [c for c in columns if _present(rows, c[1])]
    lines = ["| " + " | ".join(c[0] for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(c[2](r) for c in shown) + " |" for r in rows]
    return "\n".join(lines)


def task_paragraph(task: str, rows: list[Row], groups: list[Group]) -> str:
    """The task's results in words, each loss against cross-entropy (over training runs)."""
    reference = reference_group(groups, task)
    sentences = []
    for row in rows:
        soft, hard, against = measured_relative_bias(row)
        parts = []
        if reference is not None and row["loss"] != reference.loss:
            runs = f"{row['n_runs']} vs {row['n_runs_ce']} runs"
            parts.append(f"Dice {signed(row['diff_dice_vs_ce'], 3)} vs CE (Holm p={p_value(row['p_holm_dice_vs_ce'])}, {runs}), "
                         f"ΔV {signed(row['diff_volume_bias_ml_vs_ce'])} ml vs CE (Holm p={p_value(row['p_holm_volume_bias_ml_vs_ce'])})")
        else:
            parts.append(f"Dice {mean_sd(row, 'dice')} over {row['n_runs']} run(s)")
        parts.append(f"soft volume {percent(soft)} vs {against}{_theory(row['theory_relative_soft_bias'])}")
        parts.append(f"argmax volume {percent(hard)}{_theory(row['theory_relative_hard_bias'])}")
        excess = row["excess_vs_ce_relative_soft_expected_volume_bias"]
        if reference is not None and row["loss"] != reference.loss and not math.isnan(excess):
            se = row["excess_vs_ce_se_relative_soft_expected_volume_bias"]
            spread = "" if math.isnan(se) else f" ± {100 * se:.1f}"
            parts.append(f"soft volume above CE's by {100 * excess:+.1f}{spread} points"
                         f"{_theory(row['theory_excess_vs_ce_relative_soft_expected_volume_bias'], points=True)}")
        if not math.isnan(row["pooled_ece_mean"]):
            parts.append(f"pooled ECE {number(row['pooled_ece_mean'], 2)}")
        sentences.append(f"- **{row['loss']}**{' (reference)' if reference and row['loss'] == reference.loss else ''}: "
                         + ", ".join(parts) + ".")
    if reference is None:
        sentences.append("- No cross-entropy run in this task: no comparison.")
    return "\n".join(sentences)


def _theory(value: float, points: bool = False) -> str:
    if math.isnan(value):
        return ""
    return f" (theory {100 * value:+.1f} points)" if points else f" (theory {percent(value)})"


def runs_section(groups: list[Group], excluded: list[Run], folder: Path) -> str:
    lines = ["| run | task | loss | seed | epochs | status |", "|---|---|---|---|---|---|"]
    for group in groups:
        for run in group.runs:
            status = "complete" if run.complete else "incomplete (included)"
            lines.append(f"| {_link(run.path, folder)} | {group.task} | {group.loss} | {run.seed} | "
                         f"{_epochs(run)} | {status} |")
    for run in excluded:
        lines.append(f"| {_link(run.path, folder)} | {run.task_name} | {run.loss_name} | {run.seed} | "
                     f"{_epochs(run)} | excluded: {run.exclusion} |")
    return "\n".join(lines)


def _epochs(run: Run) -> str:
    return "—" if run.epoch is None else f"{run.epoch + 1}/{run.max_epochs if run.max_epochs is not None else '?'}"


def _link(path: Path, folder: Path) -> str:
    relative = os.path.relpath(path, folder)
    return f"[{relative}]({relative})"


def report_markdown(rows: list[Row], groups: list[Group], excluded: list[Run], figures: list,
                    notes: list[str], folder: Path, lesions: list[str] = ()) -> str:
    """The whole report.md text; ``lesions``: the lines of the lesion tables, if any."""
    main = [r for r in rows if r["class"] == ALL_CLASSES]
    text = ["# Loss comparison", ""]
    if excluded:
        text += [f"**{len(excluded)} run(s) left out** (see Runs): "
                 + "; ".join(f"`{_link(r.path, folder)}`: {r.exclusion}" for r in excluded), ""]
    text += ["## Results", "",
             ("Mean ± sd over training runs (seeds); each run is first averaged over its validation subjects. "
             "ΔV = predicted − reference (argmax unless \"soft\": Σp; \"near soft\": Σp within the model's margin "
             "of the predicted structure); relative biases are per subject, then averaged. p: Welch's t-test of the "
             "run means against the task's cross-entropy runs, Holm-corrected over every test of this report "
             "(raw p-values in results.csv). Pooled ECE: class-wise over all validation voxels (Kull et al. 2019); "
             "top-label ECE: 20 bins (Guo et al. 2017). Theory: the expected-loss optimum's bias relative to the "
             "expected volume. All columns, per-class rows and the spread between subjects are in results.csv; "
             "every run's per-subject values in subjects.csv."), "",
             markdown_table(main, MAIN_COLUMNS), ""]
    if any(_present(main, c[1]) for c in REMEDY_COLUMNS[2:]):
        text += ["### Post-hoc remedies", "", markdown_table(main, REMEDY_COLUMNS), ""]
    quoted = [r for r in main if not math.isnan(r.get("interval_coverage_mean", math.nan))]
    if quoted:
        text += ["### The volume to quote", "", ("The recalibrated soft volume (the run's `volume_quote.method`, fitted "
                 "on the other folds of the validation subjects) and its split-conformal interval (nominal 90 %), each "
                 "validation subject's from the other folds' scores; beside it the model's own Poisson-binomial interval "
                 "Σp ± z·√(Σp(1 − p)). Coverage is the share of validation subjects whose volume lies in the interval."), "",
                 markdown_table(quoted, QUOTE_COLUMNS), ""]
    rated = [r for r in main if not math.isnan(r.get("within_rater_range_mean", math.nan))]
    if rated:
        text += ["### Several raters", "", ("Tasks whose subjects several raters annotated: the reference is their "
                 "majority vote, the expected volume their mean volume; \"within the raters' range\": the share of "
                 "subjects whose volume lies between the smallest and the largest rater's. \"vs rater mean\": the mean of "
                 "the per-subject relative biases; \"ratio of sums\": the run's total predicted volume over the raters' "
                 "total mean volume, minus 1: the one to quote, since a noisy rater mean of a small structure inflates "
                 "the mean of per-subject ratios (Jensen's inequality)."), "",
                 markdown_table(rated, RATER_COLUMNS), ""]
    text += list(lesions)
    for task in dict.fromkeys(r["task"] for r in main):
        text += [f"### {task}", "", task_paragraph(task, [r for r in main if r["task"] == task], groups), ""]
    text += ["## Figures", ""]
    for name, title, caption in figures:
        text += [f"### {title}", "", f"![{title}]({name})", "", f"*{caption}*", ""]
    if notes:
        text += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    text += ["## Runs", "", runs_section(groups, excluded, folder), ""]
    return "\n".join(text)
