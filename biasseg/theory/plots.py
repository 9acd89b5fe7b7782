"""Figures of :func:`biasseg.theory.bias_curve` rows: relative soft-volume bias per loss."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "x", "v", "d")  # per loss: curves that coincide stay visible
LABELS = {"sigma_mm": "uncertainty σ (mm)", "radius_mm": "structure radius (mm)"}


def bias_figure(rows: list[dict], x: str) -> plt.Figure:
    """Relative soft-volume bias (%) against ``x`` (``sigma_mm`` or ``radius_mm``): one panel
    per uncertainty kind, a colour per loss, a line style per value of the other key."""
    other = "radius_mm" if x == "sigma_mm" else "sigma_mm"
    kinds = sorted({r["kind"] for r in rows})
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    others = sorted({r[other] for r in rows})
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for colour, loss in enumerate(losses):
            for style, value in enumerate(others):
                line = sorted((r[x], 100 * r["relative_soft"]) for r in rows
                              if r["kind"] == kind and r["loss"] == loss and r[other] == value)
                ax.plot(*zip(*line), LINE_STYLES[style % len(LINE_STYLES)], color=f"C{colour}",
                        marker=MARKERS[colour % len(MARKERS)], markersize=4, fillstyle="none",
                        label=f"{loss}, {other.split('_')[0]} {value:g} mm")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{kind} uncertainty")
        ax.set_xlabel(LABELS[x])
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("soft volume bias at the optimum (% of expected)")
    figure.tight_layout()
    figure.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure
