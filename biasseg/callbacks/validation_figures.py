"""Pictures of the validation a user would rather look at than read.

Every ``every_n_epochs`` validation epochs (rank zero, not the sanity check):

* ``slices``: for the first few validation subjects, an axial and a coronal slice through
  the reference structure with the image, the reference (blue) and the prediction (orange,
  a colour-blind-safe pair) outlined, orientation letters (the arrays are RAS+), and the
  predicted foreground probability;
* ``volumes``: predicted vs reference volume (hard and soft, ml; against the expected volume
  too where it is known) and a Bland–Altman plot (ΔV against the mean volume, with the bias
  and ±1.96 sd limits);
* ``reliability``: the reliability diagram of the foreground probabilities (observed
  frequency against mean predicted probability per bin, with the ECE).

Each figure is written to ``<output_dir>/figures/<name>_epoch<NNN>.png`` and sent to every
logger that takes images (wandb, TensorBoard).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger  # noqa: E402

from biasseg.metrics.calibration import expected_calibration_error  # noqa: E402


def figure_to_array(figure) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 rendering of a matplotlib figure."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


REFERENCE, PREDICTION, SOFT, EXPECTED = "#0072B2", "#E69F00", "#009E73", "#CC79A7"  # Okabe–Ito
ORIENTATION = {"axial": ("L", "R", "P", "A"), "coronal": ("L", "R", "I", "S")}  # left, right, bottom, top of the panel


def slices_figure(previews: list[dict], title: str = "") -> plt.Figure:
    """One row per subject: axial and coronal image with outlines, and probability maps."""
    figure, axes = plt.subplots(len(previews), 4, figsize=(12, 3 * len(previews)), squeeze=False)
    for row, preview in zip(axes, previews):
        for plane, (ax_image, ax_prob) in zip(("axial", "coronal"), (row[:2], row[2:])):
            image, label, prediction, probability = (preview[plane][k] for k in ("image", "label", "prediction", "probability"))
            aspect = preview[plane]["aspect"]
            ax_image.imshow(image.T, cmap="gray", origin="lower", aspect=aspect)
            if label.any():
                ax_image.contour(label.T, levels=[0.5], colors=REFERENCE, linewidths=1.2)
            if prediction.any():
                ax_image.contour(prediction.T, levels=[0.5], colors=PREDICTION, linewidths=1.2, linestyles="--")
            for (x, y, align), letter in zip(((0.02, 0.5, "left"), (0.98, 0.5, "right"), (0.5, 0.02, "center"),
                                              (0.5, 0.98, "center")), ORIENTATION[plane]):
                ax_image.text(x, y, letter, transform=ax_image.transAxes, color="white", fontsize=9, ha=align,
                              va="bottom" if y < 0.5 else "top" if y > 0.5 else "center")
            ax_image.set_title(f"{preview['name']} ({plane})", fontsize=9)
            shown = ax_prob.imshow(probability.T, cmap="magma", vmin=0, vmax=1, origin="lower", aspect=aspect)
            ax_prob.set_title(f"{plane}: foreground probability", fontsize=9)
            figure.colorbar(shown, ax=ax_prob, fraction=0.046)
        for ax in row:
            ax.set_axis_off()
    figure.suptitle(f"{title} — reference outlined blue (solid), prediction orange (dashed)", fontsize=10)
    figure.tight_layout()
    return figure


def volumes_figure(rows: dict, title: str = "") -> plt.Figure:
    """Predicted vs reference (and expected) volume, and Bland–Altman of the hard and soft
    volumes (ml)."""
    reference = rows["volume_ref_ml"].numpy().ravel()
    hard = rows["volume_pred_ml"].numpy().ravel()
    soft = rows["volume_pred_soft_ml"].numpy().ravel()
    expected = rows["volume_expected_ml"].numpy().ravel()
    figure, (scatter, bland) = plt.subplots(1, 2, figsize=(11, 4.8))
    high = float(max(reference.max(), hard.max(), soft.max(), 1e-6)) * 1.05
    scatter.plot([0, high], [0, high], color="gray", linestyle="--", linewidth=1)
    scatter.scatter(reference, hard, label="argmax vs reference", s=18, color=REFERENCE)
    scatter.scatter(reference, soft, label="soft (Σp) vs reference", s=18, marker="x", color=PREDICTION)
    if np.isfinite(expected).any():
        scatter.scatter(expected, soft, label="soft (Σp) vs expected (Σq)", s=18, marker="+", color=EXPECTED)
    scatter.set(xlabel="reference (or expected) volume (ml)", ylabel="predicted volume (ml)", title="Predicted vs reference")
    scatter.legend(fontsize=9)
    for values, name, marker, colour in ((hard, "argmax", "o", REFERENCE), (soft, "soft", "x", PREDICTION)):
        delta, mean = values - reference, (values + reference) / 2
        bias, sd = float(delta.mean()), float(delta.std(ddof=1)) if len(delta) > 1 else 0.0
        bland.scatter(mean, delta, marker=marker, s=18, color=colour, label=f"{name}: bias {bias:+.3f} ml")
        bland.axhline(bias, color=colour, linewidth=1)
        for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
            bland.axhline(limit, color=colour, linewidth=0.8, linestyle=":")
    bland.axhline(0, color="gray", linewidth=0.8)
    bland.set(xlabel="mean of predicted and reference (ml)", ylabel="predicted − reference (ml)", title="Bland–Altman")
    bland.legend(fontsize=9)
    figure.suptitle(f"{title} — volumes in ml (metrics.json's relative biases divide ΔV by the reference)", fontsize=10)
    figure.tight_layout()
    return figure


def reliability_figure(reliability: np.ndarray, class_names: list[str], title: str = "") -> plt.Figure:
    """Observed frequency vs mean probability per bin, one line per class, from the
    ``(C − 1, bins, 3)`` sums of :func:`biasseg.metrics.calibration.reliability_bins`."""
    figure, (diagram, counts) = plt.subplots(1, 2, figsize=(10, 4.2))
    diagram.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    bins = reliability.shape[1]
    centres = (np.arange(bins) + 0.5) / bins
    for name, sums in zip(class_names, reliability):
        used = sums[:, 0] > 0
        ece = float(expected_calibration_error(torch.from_numpy(sums)))
        diagram.plot(sums[used, 1] / sums[used, 0], sums[used, 2] / sums[used, 0], marker="o", label=f"{name}: ECE {ece:.4f}")
        counts.bar(centres, sums[:, 0], width=1 / bins, alpha=0.5, label=name)
    diagram.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    diagram.legend(fontsize=9)
    counts.set(xlabel="predicted probability", ylabel="voxels", yscale="log", title="Voxels per bin")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


class ValidationFigures(pl.Callback):
    """Slice overlays and volume plots every ``every_n_epochs`` validation epochs."""

    def __init__(self, output_dir: str, every_n_epochs: int = 5) -> None:
        self.output_dir = Path(output_dir)
        self.every_n_epochs = max(int(every_n_epochs), 1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.validation_rows is None:
            return
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.current_epoch % self.every_n_epochs and not last_epoch:
            return
        title = f"{self.output_dir.name} · {type(pl_module.loss).__name__} · epoch {trainer.current_epoch}"
        figures = {"volumes": volumes_figure(pl_module.validation_rows, title)}
        if pl_module.validation_reliability is not None:
            figures["reliability"] = reliability_figure(pl_module.validation_reliability.numpy(), pl_module.class_names, title)
        if pl_module.validation_previews:
            figures["slices"] = slices_figure(pl_module.validation_previews, title)
        folder = self.output_dir / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            figure.savefig(folder / f"{name}_epoch{trainer.current_epoch:03d}.png", dpi=80)
            picture = figure_to_array(figure)
            plt.close(figure)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"val/{name}", images=[picture], step=trainer.global_step)
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"val/{name}", picture, trainer.global_step, dataformats="HWC")
