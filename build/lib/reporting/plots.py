"""The report's figures (PNG), each with a panel or row of panels per task. Volumes in ml;
the class-mean columns of subjects.csv; every point is one subject of one run (seed).

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
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reporting.grouping import Group  # noqa: E402
from reporting.statistics import mean_sd, pooled_reliability  # noqa: E402
from reporting.table import ALL_CLASSES, measured_relative_bias  # noqa: E402
from reporting.theory_link import Theory  # noqa: E402

PANEL = (4.2, 3.6)  # inches


def by_task(groups: list[Group]) -> dict[str, list[Group]]:
    tasks: dict[str, list[Group]] = {}
    for group in groups:
        tasks.setdefault(group.task, []).append(group)
    return tasks


def loss_colours(groups: list[Group]) -> dict[str, str]:
    """One colour per loss label, the same in every figure."""
    names = list(dict.fromkeys(g.loss for g in groups))
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


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


def bland_altman(groups: list[Group], path: Path) -> None:
    tasks = by_task(groups)
    columns = max(len(members) for members in tasks.values())
    figure, axes = plt.subplots(len(tasks), columns, figsize=(PANEL[0] * columns, PANEL[1] * len(tasks)),
                                squeeze=False)
    for row, (task, members) in zip(axes, tasks.items()):
        for ax, group in zip(row, members):
            reference, hard, soft = volumes(group)
            for values, name, marker, colour in ((hard, "argmax", "o", "C0"), (soft, "soft", "x", "C1")):
                delta, mean = values - reference, (values + reference) / 2
                bias, sd = mean_sd(delta)
                ax.scatter(mean, delta, marker=marker, s=14, color=colour,
                           label=f"{name}: {bias:+.3g} ± {1.96 * sd:.2g} ml")
                ax.axhline(bias, color=colour, linewidth=1)
                if not math.isnan(sd):
                    for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
                        ax.axhline(limit, color=colour, linewidth=0.8, linestyle=":")
            ax.axhline(0, color="gray", linewidth=0.8)
            _title(ax, f"{task}: {group.loss}")
            ax.set(xlabel="mean of predicted and reference (ml)",
                   ylabel="predicted − reference (ml)")
            ax.legend(fontsize=7)
        for ax in row[len(members):]:
            ax.set_axis_off()
    _save(figure, path)


def volume_scatter(groups: list[Group], path: Path) -> None:
    tasks, colours = by_task(groups), loss_colours(groups)
    figure, axes = plt.subplots(len(tasks), 2, figsize=(PANEL[0] * 2, PANEL[1] * len(tasks)), squeeze=False)
    for row, (task, members) in zip(axes, tasks.items()):
        high = 1e-6
        for group in members:
            reference, hard, soft = volumes(group)
            for ax, values in zip(row, (hard, soft)):
                ax.scatter(reference, values, s=14, color=colours[group.loss], label=group.loss)
            high = max(high, float(np.nanmax(np.concatenate([reference, hard, soft, [0.0]]))) * 1.05)
        for ax, kind in zip(row, ("argmax", "soft (Σp)")):
            ax.plot([0, high], [0, high], color="gray", linestyle="--", linewidth=1)
            _title(ax, f"{task}: {kind} volume")
            ax.set(xlabel="reference volume (ml)", ylabel="predicted volume (ml)")
            ax.legend(fontsize=7)
    _save(figure, path)


def dice_vs_volume_bias(groups: list[Group], path: Path) -> None:
    tasks, colours = by_task(groups), loss_colours(groups)
    figure, axes = plt.subplots(1, len(tasks), figsize=(PANEL[0] * len(tasks), PANEL[1]), squeeze=False)
    for ax, (task, members) in zip(axes[0], tasks.items()):
        for group in members:
            points = []
            for run in group.runs:
                reference, hard = run.subjects["volume_ref_ml"], run.subjects["volume_pred_ml"]
                relative = [(hard[s] - v) / v for s, v in reference.items() if v > 0 and s in hard]
                points.append((100 * mean_sd(relative)[0], mean_sd(run.subjects["dice"].values())[0]))
            x, y = np.array(points).T
            ax.scatter(x, y, s=16, color=colours[group.loss], alpha=0.6)
            ax.scatter([np.nanmean(x)], [np.nanmean(y)], s=80, marker="D", color=colours[group.loss],
                       edgecolor="black", label=group.loss)
        ax.axvline(0, color="gray", linewidth=0.8)
        _title(ax, task)
        ax.set(xlabel="argmax volume bias (% of reference)", ylabel="Dice")
        ax.legend(fontsize=7)
    _save(figure, path)


def reliability(groups: list[Group], path: Path) -> bool:
    """Draw the reliability diagrams; False (nothing written) when no run has calibration.csv."""
    tasks, colours = by_task(groups), loss_colours(groups)
    tasks = {t: [g for g in ms if any(r.calibration for r in g.runs)] for t, ms in tasks.items()}
    tasks = {t: ms for t, ms in tasks.items() if ms}
    if not tasks:
        return False
    figure, axes = plt.subplots(1, len(tasks), figsize=(PANEL[0] * len(tasks), PANEL[1] + 0.4), squeeze=False)
    for ax, (task, members) in zip(axes[0], tasks.items()):
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        for group in members:
            bins = pooled_reliability(run.calibration for run in group.runs if run.calibration)
            if bins:
                _, probability, frequency = np.array(bins).T
                ax.plot(probability, frequency, marker="o", markersize=3, color=colours[group.loss], label=group.loss)
        _title(ax, task)
        ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    _save(figure, path)
    return True


def theory_vs_measured(groups: list[Group], rows: list[dict], theory: Theory, path: Path) -> str:
    """Measured against predicted relative volume bias; returns a caption saying what is drawn:
    theory curves against σ (``theory.run_bias_curve``), a measured-vs-predicted scatter, or, with
    no prediction at all, the measured biases alone."""
    tasks, colours = by_task(groups), loss_colours(groups)
    by_key = {(r["task"], r["loss"]): r for r in rows if r["class"] == ALL_CLASSES}
    curves = {id(g): theory.curve(g) for g in groups} if theory.has_curve else {}
    figure, axes = plt.subplots(1, len(tasks), figsize=(PANEL[0] * len(tasks), PANEL[1] + 0.4), squeeze=False)
    kinds = set()
    for ax, (task, members) in zip(axes[0], tasks.items()):
        measured = {g.loss: measured_relative_bias(by_key[(task, g.loss)]) for g in members}
        against = next(iter(measured.values()))[2]
        if any(curves.get(id(g)) for g in members):
            kinds.add("curve")
            _draw_curves(ax, members, curves, measured, colours)
            kind = members[0].runs[0].data.get("uncertainty_kind", "?")
            ax.set(xlabel=f"label uncertainty σ (mm), {kind}")
        elif any(not math.isnan(by_key[(task, g.loss)]["theory_relative_soft_bias"]) for g in members):
            kinds.add("scatter")
            _draw_scatter(ax, members, by_key, measured, colours)
            ax.set(xlabel="predicted relative volume bias (%)")
        else:
            kinds.add("bars")
            _draw_bars(ax, members, measured, colours)
        _title(ax, task)
        ax.set(ylabel=f"relative volume bias vs {against} (%)")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.legend(fontsize=7)
    _save(figure, path)
    captions = {
        "curve": "lines: the theory's bias against σ (soft solid, argmax dashed); points: measured at the task's σ",
        "scatter": "measured against predicted relative bias (o soft, x argmax); dashed: identity",
        "bars": "measured relative bias only (no theory prediction available)",
    }
    return "; ".join(captions[k] for k in ("curve", "scatter", "bars") if k in kinds)


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


def bias_vs_steps(groups: list[Group], path: Path) -> bool:
    """Draw the bias learning curves; False (nothing written) when no run has a csv history."""
    tasks = {t: ms for t, ms in by_task(groups).items() if any(r.history for g in ms for r in g.runs)}
    if not tasks:
        return False
    colours = loss_colours(groups)
    figure, axes = plt.subplots(1, len(tasks), figsize=(PANEL[0] * len(tasks), PANEL[1] + 0.4), squeeze=False)
    for ax, (task, members) in zip(axes[0], tasks.items()):
        for group in members:
            key = next((k for k in ("val/relative_soft_expected_volume_bias", "val/soft_relative_volume_bias")
                        if any(k in r.history for r in group.runs)), None)
            if key is None:
                continue
            curves = [dict(r.history[key]) for r in group.runs if key in r.history]
            for curve in curves:
                ax.plot(list(curve), [100 * v for v in curve.values()], color=colours[group.loss], alpha=0.25, linewidth=0.8)
            steps = sorted(set().union(*curves))
            mean = [100 * float(np.nanmean([c.get(s, math.nan) for c in curves])) for s in steps]
            ax.plot(steps, mean, color=colours[group.loss], label=f"{group.loss} (soft)")
        ax.axhline(0, color="gray", linewidth=0.8)
        _title(ax, task)
        ax.set(xlabel="training step", ylabel="relative soft volume bias (%)", yscale="symlog")
        ax.legend(fontsize=7)
    _save(figure, path)
    return True


def write_figures(groups: list[Group], rows: list[dict], theory: Theory, folder: Path) -> tuple[list, list[str]]:
    """Write every figure into ``folder``: ``[(file name, title, caption)]`` and notes on skipped ones."""
    figures, notes = [], []
    bland_altman(groups, folder / "bland_altman.png")
    figures.append(("bland_altman.png", "Bland–Altman per loss",
                    "o argmax, x soft volume; lines: bias and ±1.96 sd; every subject of every seed"))
    volume_scatter(groups, folder / "volumes.png")
    figures.append(("volumes.png", "Predicted vs reference volume", "dashed: identity"))
    dice_vs_volume_bias(groups, folder / "dice_vs_volume_bias.png")
    figures.append(("dice_vs_volume_bias.png", "Dice vs volume bias", "small: one run (seed); diamond: the mean"))
    if reliability(groups, folder / "reliability.png"):
        figures.append(("reliability.png", "Reliability diagram",
                        "calibration.csv bins pooled over seeds and foreground classes; dashed: perfect calibration"))
    else:
        notes.append("No reliability diagram: no run has a calibration.csv.")
    caption = theory_vs_measured(groups, rows, theory, folder / "theory_vs_measured.png")
    figures.append(("theory_vs_measured.png", "Theory vs measured volume bias", caption))
    if bias_vs_steps(groups, folder / "bias_vs_steps.png"):
        figures.append(("bias_vs_steps.png", "Volume bias during training",
                        "soft volume vs expected (or reference) at every validation; line: mean over seeds, faint: each seed"))
    return figures, notes
