"""The report's figures (PNG): one file per figure and task (``<figure>_<task>.png``), panels
of one task sharing their axes across losses, fonts of at least 9 pt, legends beside the
data, the Okabe–Ito colour-blind-safe palette. Volumes in ml; the class-mean columns of
subjects.csv; every point is one subject of one run (seed).

* ``bland_altman.png``: per task and loss, ΔV against the mean of predicted and reference
  volume, argmax (o) and soft (x), with the bias and ±1.96 sd lines;
* ``volumes.png``: predicted (argmax, soft) against reference volume, colour per loss;
* ``dice_vs_volume_bias.png``: per run, mean Dice against mean relative volume bias;
* ``reliability.png``: reliability diagrams pooled over seeds and classes (calibration.csv);
* ``theory_vs_measured.png``: measured relative volume bias against the theory;
* ``bias_vs_steps.png``: the relative soft and argmax volume bias at every validation against
  the training step (runs logged with ``logger=csv``), the mean over seeds as a line, each
  seed faint: how far a run is from its converged bias.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from biasseg.reporting.grouping import Group  # noqa: E402
from biasseg.reporting.lesion_report import lesion_bias_figure  # noqa: E402
from biasseg.reporting.statistics import mean_sd, pooled_reliability  # noqa: E402
from biasseg.reporting.table import ALL_CLASSES, measured_relative_bias  # noqa: E402
from biasseg.reporting.theory_link import Theory  # noqa: E402

PANEL = (4.2, 3.6)  # inches
# Okabe & Ito's colour-blind-safe palette (no red/green pair)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 9,
                     "xtick.labelsize": 9, "ytick.labelsize": 9})


def by_task(groups: list[Group]) -> dict[str, list[Group]]:
    tasks: dict[str, list[Group]] = {}
    for group in groups:
        tasks.setdefault(group.task, []).append(group)
    return tasks


def loss_colours(groups: list[Group]) -> dict[str, str]:
    """One colour per loss label, the same in every figure."""
    names = list(dict.fromkeys(g.loss for g in groups))
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def file_name(figure: str, task: str) -> str:
    """``<figure>_<task>.png`` with the task as a safe file name."""
    return f"{figure}_{re.sub(r'[^A-Za-z0-9._-]+', '_', task).strip('_')}.png"


def legend_beside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def volumes(group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference, argmax and soft volume (ml) of every subject of every run of ``group``."""
    reference, hard, soft = [], [], []
    for run in group.runs:
        for subject, value in run.subjects["volume_ref_ml"].items():
            reference.append(value)
            hard.append(run.subjects["volume_pred_ml"].get(subject, math.nan))
            soft.append(run.subjects["volume_pred_soft_ml"].get(subject, math.nan))
    return np.array(reference), np.array(hard), np.array(soft)


def _title(ax, text: str) -> None:
    ax.set_title(textwrap.fill(text, 45), fontsize=9)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _panels(count: int, sharex: bool = True, sharey: bool = True):
    """A row of ``count`` panels (one per loss) sharing their axes, and room for the legend."""
    figure, axes = plt.subplots(1, count, figsize=(PANEL[0] * count + 1.6, PANEL[1]), squeeze=False,
                                sharex=sharex, sharey=sharey)
    return figure, axes[0]


def bland_altman(task: str, members: list[Group]) -> plt.Figure:
    """Per loss, ΔV against the mean of predicted and reference volume: argmax (o) and soft (x)."""
    figure, axes = _panels(len(members))
    for ax, group in zip(axes, members):
        reference, hard, soft = volumes(group)
        for values, name, marker, colour in ((hard, "argmax", "o", PALETTE[0]), (soft, "soft (Σp)", "x", PALETTE[1])):
            delta, mean = values - reference, (values + reference) / 2
            bias, sd = mean_sd(delta)
            ax.scatter(mean, delta, marker=marker, s=14, color=colour, label=f"{name}: {bias:+.3g} ± {1.96 * sd:.2g} ml")
            ax.axhline(bias, color=colour, linewidth=1)
            if not math.isnan(sd):
                for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
                    ax.axhline(limit, color=colour, linewidth=0.8, linestyle=":")
        ax.axhline(0, color="gray", linewidth=0.8)
        _title(ax, f"{task}: {group.loss} ({len(group.runs)} runs)")
        ax.set(xlabel="mean of predicted and reference (ml)")
        ax.legend(loc="upper left", fontsize=9, frameon=False)
    axes[0].set(ylabel="predicted − reference (ml)")
    return figure


def volume_scatter(task: str, members: list[Group]) -> plt.Figure:
    """Predicted (argmax, soft) against reference volume, and soft against expected where known."""
    colours = {g.loss: PALETTE[i % len(PALETTE)] for i, g in enumerate(members)}
    with_expected = any("volume_expected_ml" in run.subjects for g in members for run in g.runs)
    figure, axes = _panels(3 if with_expected else 2)
    high = 1e-6
    for group in members:
        reference, hard, soft = volumes(group)
        for ax, values in zip(axes, (hard, soft)):
            ax.scatter(reference, values, s=14, color=colours[group.loss], label=group.loss)
        if with_expected:
            expected = np.array([run.subjects.get("volume_expected_ml", {}).get(s, math.nan)
                                 for run in group.runs for s in run.subjects["volume_ref_ml"]])
            axes[2].scatter(expected, soft, s=14, color=colours[group.loss], label=group.loss)
        high = max(high, float(np.nanmax(np.concatenate([reference, hard, soft, [0.0]]))) * 1.05)
    titles = ("argmax vs reference", "soft (Σp) vs reference", "soft (Σp) vs expected (Σq)")
    for ax, title in zip(axes, titles):
        ax.plot([0, high], [0, high], color="gray", linestyle="--", linewidth=1)
        _title(ax, f"{task}: {title}")
        ax.set(xlabel="expected volume (ml)" if "expected" in title else "reference volume (ml)")
    axes[0].set(ylabel="predicted volume (ml)")
    legend_beside(axes[-1])
    return figure


def dice_vs_volume_bias(task: str, members: list[Group]) -> plt.Figure:
    """Per run, mean Dice against mean relative argmax volume bias; diamonds: the loss's mean."""
    figure, axes = _panels(1)
    ax = axes[0]
    colours = {g.loss: PALETTE[i % len(PALETTE)] for i, g in enumerate(members)}
    for group in members:
        points = []
        for run in group.runs:
            reference, hard = run.subjects["volume_ref_ml"], run.subjects["volume_pred_ml"]
            relative = [(hard[s] - v) / v for s, v in reference.items() if v > 0 and s in hard]
            points.append((100 * mean_sd(relative)[0], mean_sd(run.subjects["dice"].values())[0]))
        x, y = np.array(points).T
        ax.scatter(x, y, s=16, color=colours[group.loss], alpha=0.6)
        ax.scatter([np.nanmean(x)], [np.nanmean(y)], s=80, marker="D", color=colours[group.loss], edgecolor="black",
                   label=group.loss)
    ax.axvline(0, color="gray", linewidth=0.8)
    _title(ax, f"{task}: Dice against argmax volume bias")
    ax.set(xlabel="argmax volume bias (% of reference)", ylabel="Dice")
    legend_beside(ax)
    return figure


def reliability(task: str, members: list[Group]) -> plt.Figure | None:
    """Reliability diagrams pooled over seeds and classes; None without any calibration.csv."""
    members = [g for g in members if any(r.calibration for r in g.runs)]
    if not members:
        return None
    figure, axes = _panels(1)
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    for i, group in enumerate(members):
        bins = pooled_reliability(run.calibration for run in group.runs if run.calibration)
        if bins:
            _, probability, frequency = np.array(bins).T
            ax.plot(probability, frequency, marker="o", markersize=3, color=PALETTE[i % len(PALETTE)], label=group.loss)
    _title(ax, f"{task}: reliability (pooled over seeds)")
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    legend_beside(ax)
    return figure


def theory_vs_measured(task: str, members: list[Group], by_key: dict, theory: Theory, curves: dict) -> tuple[plt.Figure, str]:
    """Measured against predicted relative volume bias, and what is drawn: theory curves
    against σ (``theory.run_bias_curve``), a measured-vs-predicted scatter, or, with no
    prediction at all, the measured biases alone."""
    colours = {g.loss: PALETTE[i % len(PALETTE)] for i, g in enumerate(members)}
    figure, axes = _panels(1)
    ax = axes[0]
    measured = {g.loss: measured_relative_bias(by_key[(task, g.loss)]) for g in members}
    against = next(iter(measured.values()))[2]
    if any(curves.get(id(g)) for g in members):
        kind = "curve"
        _draw_curves(ax, members, curves, measured, colours)
        ax.set(xlabel=f"label uncertainty σ (mm), {members[0].runs[0].data.get('uncertainty_kind', '?')}")
    elif any(not math.isnan(by_key[(task, g.loss)]["theory_relative_soft_bias"]) for g in members):
        kind = "scatter"
        _draw_scatter(ax, members, by_key, measured, colours)
        ax.set(xlabel="predicted relative volume bias (%)")
    else:
        kind = "bars"
        _draw_bars(ax, members, measured, colours)
    _title(ax, f"{task}: theory and measurement")
    ax.set(ylabel=f"relative volume bias vs {against} (%)")
    ax.axhline(0, color="gray", linewidth=0.8)
    legend_beside(ax)
    return figure, kind


CAPTIONS = {
    "curve": "lines: the theory's bias against σ (soft solid, argmax dashed); points: measured at the task's σ",
    "scatter": "measured against predicted relative bias (o soft, x argmax); dashed: identity",
    "bars": "measured relative bias only (no theory prediction available)",
}


def _draw_curves(ax, members, curves, measured, colours) -> None:
    for group in members:
        colour, curve = colours[group.loss], curves.get(id(group))
        if curve:
            sigma = np.array(curve["sigma"])
            ax.plot(sigma, 100 * np.array(curve.get("relative_soft", [math.nan] * len(sigma))), color=colour)
            ax.plot(sigma, 100 * np.array(curve.get("relative_hard", [math.nan] * len(sigma))), color=colour,
                    linestyle="--")
        sigma_run = float(group.runs[0].data.get("uncertainty") or math.nan)
        soft, hard, _ = measured[group.loss]
        ax.scatter([sigma_run], [100 * soft], marker="o", color=colour, label=f"{group.loss} (soft)")
        ax.scatter([sigma_run], [100 * hard], marker="x", color=colour, label=f"{group.loss} (argmax)")


def _draw_scatter(ax, members, by_key, measured, colours) -> None:
    values = []
    for group in members:
        row, (soft, hard, _) = by_key[(group.task, group.loss)], measured[group.loss]
        predicted = (row["theory_relative_soft_bias"], row["theory_relative_hard_bias"])
        ax.scatter([100 * predicted[0]], [100 * soft], marker="o", color=colours[group.loss], label=f"{group.loss} (soft)")
        ax.scatter([100 * predicted[1]], [100 * hard], marker="x", color=colours[group.loss],
                   label=f"{group.loss} (argmax)")
        values += [100 * v for v in (*predicted, soft, hard) if not math.isnan(v)]
    if values:
        low, high = min(values + [0]), max(values + [0])
        ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1)


def _draw_bars(ax, members, measured, colours) -> None:
    positions = np.arange(len(members))
    for position, group in zip(positions, members):
        soft, hard, _ = measured[group.loss]
        ax.bar(position - 0.2, 100 * soft, width=0.4, color=colours[group.loss], label=f"{group.loss} soft")
        ax.bar(position + 0.2, 100 * hard, width=0.4, color=colours[group.loss], alpha=0.5, hatch="//",
               label=f"{group.loss} argmax")
    ax.set_xticks(positions, [g.loss for g in members])


def bias_vs_steps(task: str, members: list[Group]) -> plt.Figure | None:
    """The soft-volume bias at every validation against the training step; None without a
    csv history."""
    keyed = []
    for group in members:
        key = next((k for k in ("val/relative_soft_expected_volume_bias", "val/soft_relative_volume_bias")
                    if any(k in r.history for r in group.runs)), None)
        if key is not None:
            keyed.append((group, key))
    if not keyed:
        return None
    figure, axes = _panels(1)
    ax = axes[0]
    for i, (group, key) in enumerate(keyed):
        colour = PALETTE[i % len(PALETTE)]
        curves = [dict(r.history[key]) for r in group.runs if key in r.history]
        for curve in curves:
            ax.plot(list(curve), [100 * v for v in curve.values()], color=colour, alpha=0.25, linewidth=0.8)
        steps = sorted(set().union(*curves))
        mean = [100 * float(np.nanmean([c.get(s, math.nan) for c in curves])) for s in steps]
        ax.plot(steps, mean, color=colour, label=group.loss)
    ax.axhline(0, color="gray", linewidth=0.8)
    _title(ax, f"{task}: soft-volume bias during training")
    ax.set(xlabel="training step", ylabel="relative soft volume bias (%)", yscale="symlog")
    legend_beside(ax)
    return figure


def write_figures(groups: list[Group], rows: list[dict], theory: Theory, folder: Path) -> tuple[list, list[str]]:
    """Write every figure of every task into ``folder``: ``[(file name, title, caption)]`` and
    notes on the figures left out."""
    figures, notes = [], []
    by_key = {(r["task"], r["loss"]): r for r in rows if r["class"] == ALL_CLASSES}
    curves = {id(g): theory.curve(g) for g in groups} if theory.has_curve else {}
    for task, members in by_task(groups).items():
        drawn = [
            ("bland_altman", "Bland–Altman per loss",
             "o argmax, x soft volume (ml); lines: bias and ±1.96 sd; every subject of every seed", bland_altman(task, members)),
            ("volumes", "Predicted vs reference (and expected) volume", "ml; dashed: identity", volume_scatter(task, members)),
            ("dice_vs_volume_bias", "Dice vs volume bias",
             "the same runs as the volume plots, as relative bias (%): small, one run (seed); diamond, the mean",
             dice_vs_volume_bias(task, members)),
            ("reliability", "Reliability diagram",
             "calibration.csv bins pooled over seeds and foreground classes; dashed: perfect calibration", reliability(task, members)),
        ]
        theory_figure, kind = theory_vs_measured(task, members, by_key, theory, curves)
        drawn.append(("theory_vs_measured", "Theory vs measured volume bias", CAPTIONS[kind], theory_figure))
        drawn.append(("bias_vs_steps", "Volume bias during training",
                      "soft volume vs expected (or reference) at every validation; line: mean over seeds, faint: each seed",
                      bias_vs_steps(task, members)))
        lesion_figure = lesion_bias_figure(task, members, theory, loss_colours(groups))
        if lesion_figure is not None:
            drawn.append(("lesion_bias_vs_radius", "Per-lesion volume bias vs lesion radius",
                          "soft volume vs expected per reference lesion (faint: each lesion of each seed); markers: bin "
                          "means, mean ± sd over seeds; dashed: the theory's bin means on the same validation cases",
                          lesion_figure))
        for name, title, caption, figure in drawn:
            if figure is None:
                notes.append(f"{task}: no {title.lower()} (the runs lack the files it needs)")
                continue
            path = folder / file_name(name, task)
            _save(figure, path)
            figures.append((path.name, f"{task}: {title}", caption))
    return figures, notes
