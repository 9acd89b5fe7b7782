"""The lesion part of a report, from each run's ``lesions.csv`` (:mod:`biasseg.metrics.lesions`):
per-lesion soft-volume bias against lesion radius, measured per loss with the theory's
per-lesion prediction over it, and lesion detection (F1) by size.

A lesion's radius is that of the sphere of its expected volume (generated data: ``Σ q`` over
its region); its relative bias is ``(Σ p − Σ q) / Σ q`` over the same region. Per loss: the
mean over each run's lesions in a radius bin, then mean ± sd over runs (seeds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from matplotlib.figure import Figure

from biasseg.metrics.lesions import LESION_COLUMNS
from biasseg.reporting.grouping import Group
from biasseg.reporting.markdown import markdown_table, number
from biasseg.reporting.runs import to_float
from biasseg.reporting.statistics import mean_sd
from biasseg.reporting.theory_link import Theory
from biasseg.theory.lesions import equivalent_radius_mm

RADIUS_EDGES_MM = (0.0, 2.0, 3.0, 4.0, 6.0, 8.0, math.inf)  # radius bins of the per-lesion bias


def radius_bin_names() -> list[str]:
    return [f"{lo:g}-{hi:g} mm" if math.isfinite(hi) else f"{lo:g}+ mm" for lo, hi in zip(RADIUS_EDGES_MM, RADIUS_EDGES_MM[1:])]


def reference_points(rows: Iterable[Mapping[str, object]]) -> tuple[np.ndarray, np.ndarray]:
    """``(radius_mm, relative_soft_bias)`` of every reference lesion with a known expected
    volume; ``rows`` are lesions.csv rows (strings) or :func:`theory_rows`."""
    radius, bias = [], []
    for row in rows:
        expected = to_float(str(row["volume_expected_ml"]))
        if row["kind"] == "reference" and expected > 0:
            radius.append(float(equivalent_radius_mm(expected)))
            bias.append((to_float(str(row["volume_pred_soft_ml"])) - expected) / expected)
    return np.asarray(radius), np.asarray(bias)


def theory_rows(rows: np.ndarray) -> list[dict[str, object]]:
    """The theory's :data:`~biasseg.metrics.lesions.LESION_COLUMNS` rows as lesions.csv rows."""
    column = {name: i for i, name in enumerate(LESION_COLUMNS)}
    return [{"kind": "reference" if r[column["reference"]] == 1 else "false_positive",
             "volume_expected_ml": r[column["volume_expected_ml"]],
             "volume_pred_soft_ml": r[column["volume_pred_soft_ml"]]} for r in rows]


def binned_means(radius: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of ``values`` per :data:`RADIUS_EDGES_MM` bin of ``radius`` (NaN where empty)."""
    index = np.digitize(radius, RADIUS_EDGES_MM[1:-1])
    return np.array([values[index == b].mean() if (index == b).any() else math.nan for b in range(len(RADIUS_EDGES_MM) - 1)])


def f1_by_size(rows: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Lesion F1 ``2 TP / (2 TP + FN + FP)`` per size bin of lesions.csv (a reference lesion by
    its reference volume, a false positive by its own)."""
    counts: dict[str, list[int]] = {}
    for row in rows:
        tp_fn_fp = counts.setdefault(str(row["size_bin_ml"]), [0, 0, 0])
        if row["kind"] != "reference":
            tp_fn_fp[2] += 1
        else:
            tp_fn_fp[0 if to_float(str(row["detected"])) == 1 else 1] += 1
    return {name: 2 * tp / (2 * tp + fn + fp) if tp + fn + fp else math.nan for name, (tp, fn, fp) in counts.items()}


def _runs_with_lesions(group: Group) -> list:
    return [run for run in group.runs if run.lesions]


def _formatted(values: list[float], as_percent: bool) -> str:
    """``"mean ± sd"`` over runs of the finite ``values`` (sd left out for one run; empty for
    none): in percent with a sign, or as a number of 3 significant digits."""
    mean, sd = mean_sd(values)
    if math.isnan(mean):
        return ""
    if as_percent:
        return f"{mean * 100:+.1f}" + ("" if math.isnan(sd) else f" ± {sd * 100:.1f}")
    return number(mean) + ("" if math.isnan(sd) else f" ± {number(sd)}")


def _theory_bins(theory: Theory, group: Group) -> np.ndarray | None:
    rows = theory.lesions(group)
    if rows is None:
        return None
    radius, bias = reference_points(theory_rows(rows))
    return binned_means(radius, bias)


def lesion_bias_figure(task: str, members: list[Group], theory: Theory, colours: dict[str, str]) -> Figure | None:
    """Per-lesion relative soft-volume bias (%) against radius (mm): each loss's lesions (faint),
    its bin means (mean ± sd over seeds) and the theory's bin means (dashed); None without
    lesions.csv."""
    members = [g for g in members if _runs_with_lesions(g)]
    if not members:
        return None
    figure = Figure(figsize=(7.5, 4.5))  # no pyplot: the report's backend is plots.py's
    ax = figure.subplots()
    centres = [(lo + min(hi, 12.0)) / 2 for lo, hi in zip(RADIUS_EDGES_MM, RADIUS_EDGES_MM[1:])]
    for group in members:
        colour = colours.get(group.loss)
        per_run = []
        for run in _runs_with_lesions(group):
            radius, bias = reference_points(run.lesions)
            ax.scatter(radius, bias * 100, s=4, alpha=0.15, color=colour)
            per_run.append(binned_means(radius, bias))
        mean, sd = np.array([mean_sd(values) for values in zip(*per_run)]).T
        ax.errorbar(centres, mean * 100, yerr=np.nan_to_num(sd) * 100, marker="o", capsize=3, color=colour,
                    label=f"{group.loss} ({len(per_run)} runs)")
        predicted = _theory_bins(theory, group)
        if predicted is not None:
            ax.plot(centres, predicted * 100, linestyle="--", color=colour, label=f"{group.loss}: theory")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("lesion radius (mm, of the sphere of its expected volume)")
    ax.set_ylabel("soft volume vs expected, per lesion (%)")
    ax.set_title(task)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return figure


def lesion_section(groups: list[Group], theory: Theory) -> list[str]:
    """Markdown lines of the report's lesion tables (empty without lesions.csv)."""
    members = [g for g in groups if _runs_with_lesions(g)]
    if not members:
        return []
    size_bins = list(dict.fromkeys(str(row["size_bin_ml"]) for g in members for run in _runs_with_lesions(g)
                                   for row in run.lesions))
    size_bins.sort(key=lambda name: to_float(name.split("-")[0].rstrip("+")))
    detection, bias = [], []
    for group in members:
        runs = _runs_with_lesions(group)
        f1 = [f1_by_size(run.lesions) for run in runs]
        detection.append({"task": group.task, "loss": group.loss, "runs": len(runs),
                          **{name: _formatted([f.get(name, math.nan) for f in f1], as_percent=False) for name in size_bins}})
        per_run = [binned_means(*reference_points(run.lesions)) for run in runs]
        predicted = _theory_bins(theory, group)
        row = {"task": group.task, "loss": group.loss, "runs": len(runs)}
        for b, name in enumerate(radius_bin_names()):
            measured = _formatted([values[b] for values in per_run], as_percent=True)
            row[name] = f"{measured} ({predicted[b] * 100:+.1f})" if measured and predicted is not None else measured
        bias.append(row)
    key_columns = [_column("Task", "task"), _column("Loss", "loss"), _column("Runs", "runs")]
    return ["### Lesions", "",
            ("Lesion F1 `2 TP / (2 TP + FN + FP)` per size bin (ml; a reference lesion by its reference volume, a false "
             "positive by its own), mean ± sd over runs:"), "",
            markdown_table(detection, [*key_columns, *(_column(f"{name} ml", name) for name in size_bins)]), "",
            ("Per-lesion soft volume vs expected (%, `(Σp − Σq) / Σq` over each reference lesion's region) by radius of "
             "the sphere of its expected volume: mean over a run's lesions, then mean ± sd over runs; in brackets the "
             "theory's (the loss's expected-loss optimum on the same validation cases, measured the same way):"), "",
            markdown_table(bias, [*key_columns, *(_column(name, name) for name in radius_bin_names())]), ""]


def _column(header: str, key: str) -> tuple:
    return header, key, lambda row: str(row[key])
