"""The validation as a wandb dashboard: where the volume bias of each subject can be seen.

Every validation epoch (rank zero, not the sanity check), for each ``WandbLogger`` of the run:

* ``val/subjects``: a ``wandb.Table`` with one row per validation subject (and foreground
  class, with several classes): Dice, the reference, argmax, soft, near-structure soft and
  expected volume (ml), the argmax and soft ΔV against the reference and, where known, the
  soft ΔV against the expected volume, the subject's ECE; sortable and filterable in the UI;
* ``val/lesions``: with lesion measures, a ``wandb.Table`` of ``lesions.csv``'s rows (one per
  reference lesion and per false positive: Dice, volumes, size bin, centre);
* ``val/volume_scatter`` and ``val/bland_altman``: wandb's interactive scatter charts built
  from that table (soft volume against the reference; soft ΔV against the mean volume);
* ``calibration_verdict`` in the run's summary (:func:`biasseg.metrics.volume_quote.verdict`);
* every ``every_n_epochs`` epochs (and the last), ``val/overlays``: the axial and coronal
  slices of the first validation subjects as ``wandb.Image`` with the reference and the
  prediction as two mask layers that can be switched on and off.

The PNG figures of :class:`biasseg.callbacks.ValidationFigures` stay as they are; this adds what only
an interactive dashboard can do.
"""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from biasseg.metrics.lesion_metrics import LESION_TABLE_COLUMNS
from biasseg.run_files import subject_table

COLUMNS = ("subject", "class", "dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml", "volume_pred_soft_near_ml",
           "volume_expected_ml", "delta_v_ml", "soft_delta_v_ml", "soft_delta_v_expected_ml", "mean_volume_ml", "ece")
MASK_LABELS = {1: "structure"}


def subject_rows(rows: dict, subject_names: list[str], class_names: list[str]) -> list[list[object]]:
    """The table's rows (:data:`COLUMNS`), one per subject and foreground class."""
    table = []
    for record in subject_table(rows, subject_names, class_names):
        for name in class_names:
            suffix = "" if len(class_names) == 1 else f"/{name}"

            def value(key: str) -> float:
                return float(record.get(key + suffix, math.nan))

            reference, hard, soft, expected = (value(k) for k in ("volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml",
                                                                   "volume_expected_ml"))
            table.append([
                record["subject"], name, value("dice"), reference, hard, soft, value("volume_pred_soft_near_ml"), expected,
                hard - reference, soft - reference, soft - expected, (soft + reference) / 2, value("ece"),
            ])
    return table


def overlay_images(previews: list[dict], epoch: int):
    """The previews' slices as ``wandb.Image`` with ``reference`` and ``prediction`` mask layers."""
    import wandb

    images = []
    for preview in previews:
        for plane in ("axial", "coronal"):
            view = preview[plane]
            picture = view["image"].T[::-1]  # rows top to bottom, as wandb shows them
            low, high = np.percentile(picture, [1, 99])
            scaled = np.clip((picture - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
            masks = {
                name: {"mask_data": view[key].T[::-1].astype(np.uint8), "class_labels": MASK_LABELS}
                for name, key in (("reference", "label"), ("prediction", "prediction"))
            }
            images.append(wandb.Image(scaled, masks=masks, caption=f"{preview['name']} {plane}, epoch {epoch}"))
    return images


class WandbDashboard(pl.Callback):
    """The subject table, interactive volume charts and mask overlays, sent to wandb."""

    def __init__(self, every_n_epochs: int = 5) -> None:
        self.every_n_epochs = max(int(every_n_epochs), 1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero or pl_module.validation_rows is None:
            return
        import wandb

        names = trainer.datamodule.val_subject_names
        table = wandb.Table(columns=list(COLUMNS), data=subject_rows(pl_module.validation_rows, names, pl_module.class_names))
        logged = {
            "val/subjects": table,
            "val/volume_scatter": wandb.plot.scatter(table, "volume_ref_ml", "volume_pred_soft_ml",
                                                     title="soft (Σp) against reference volume (ml)"),
            "val/bland_altman": wandb.plot.scatter(table, "mean_volume_ml", "soft_delta_v_ml",
                                                   title="Bland–Altman: soft ΔV against mean volume (ml)"),
        }
        lesions = pl_module.lesion_table(names)
        if lesions is not None:  # one row per lesion
            logged["val/lesions"] = wandb.Table(columns=list(LESION_TABLE_COLUMNS),
                                                data=[[row[c] for c in LESION_TABLE_COLUMNS] for row in lesions])
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if pl_module.validation_previews and (trainer.current_epoch % self.every_n_epochs == 0 or last_epoch):
            logged["val/overlays"] = overlay_images(pl_module.validation_previews, trainer.current_epoch)
        for logger in loggers:
            logger.experiment.log({**logged, "trainer/global_step": trainer.global_step})
            if pl_module.calibration_verdict:  # the latest validation's, where a user looks first
                logger.experiment.summary["calibration_verdict"] = pl_module.calibration_verdict
