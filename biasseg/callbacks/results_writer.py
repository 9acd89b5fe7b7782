"""Writes a run's validation results after every validation (:func:`biasseg.run_files.write_results`)
and its closing table."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table

from biasseg.run_files import write_results

log = logging.getLogger(__name__)


class ResultsWriter(pl.Callback):
    """After every validation epoch (rank zero, not the sanity check) write into ``output_dir``:

    * ``metrics.json``: ``epoch``, ``global_step``, ``num_subjects``, ``calibration_verdict``
      (:func:`biasseg.metrics.volume_quote.verdict`) and every ``val/…`` key;
    * ``subjects.csv``: one row per validation subject (see :func:`subject_table`);
    * ``calibration.csv``: the reliability bins pooled over the validation subjects (see
      :func:`calibration_table`).

    The files always hold the latest epoch, so the final ones are the final validation.
    At the end of training a table of the main metrics is printed.
    """

    def __init__(self, output_dir: str, print_table: bool = True, fields: dict | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.print_table = print_table
        self.fields = dict(fields or {})  # written into metrics.json in place of the trainer's (evaluate.py)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.validation_rows is None:
            return
        rows = pl_module.validation_rows
        metrics = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "num_subjects": len(rows["subject_index"]),
            **self.fields,
            "calibration_verdict": pl_module.calibration_verdict,
            **{f"val/{k}": v for k, v in pl_module.validation_summary.items()},
        }
        names = trainer.datamodule.val_subject_names
        write_results(self.output_dir, metrics, rows, names, pl_module.class_names, pl_module.validation_reliability,
                      pl_module.lesion_table(names))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print_summary(trainer, pl_module)

    def print_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the headline table (console and train.log) and where every output is."""
        summary = pl_module.validation_summary
        if not self.print_table or not trainer.is_global_zero or summary is None:
            return
        log.info("\n" + headline_table(summary, trainer.current_epoch, len(pl_module.class_names)))
        verdict = pl_module.calibration_verdict
        if verdict:  # one line; a warning when the soft volume should not be quoted as it is
            quotable = summary.get("calibrated") == 1.0 and summary.get("volume_settled") != 0.0
            (log.info if quotable else log.warning)(verdict)
        outputs = [p for p in ("metrics.json", "subjects.csv", "lesions.csv", "calibration.csv", "splits.json", "checkpoints/last.ckpt",
                               "figures", "csv/metrics.csv", "wandb") if (self.output_dir / p).exists()]
        log.info(f"outputs in {self.output_dir}: {', '.join(outputs)}")


# The closing table: a few values per group that a person reads in seconds; the rest are in
# metrics.json (every val/… key, per class too) and subjects.csv (per subject).
HEADLINE = {
    "overlap": (("dice", "Dice (argmax)", ".3f"), ("dice_threshold", "Dice at the Dice-optimal threshold", ".3f")),
    "volume vs reference": (("relative_volume_bias", "argmax ΔV", "+.1%"), ("soft_relative_volume_bias", "soft (Σp) ΔV", "+.1%"),
                            ("near_soft_relative_volume_bias", "soft ΔV near the structure", "+.1%")),
    "volume vs expected": (("relative_expected_volume_bias", "argmax", "+.1%"), ("relative_soft_expected_volume_bias", "soft (Σp)", "+.1%"),
                           ("relative_near_soft_expected_volume_bias", "soft near the structure", "+.1%")),
    "calibration": (("ece", "ECE, class-wise (pooled)", ".4f"), ("ece_top_label", "ECE, top-label", ".4f"),
                    ("temperature", "fitted temperature (1 = calibrated)", ".2f"),
                    ("platt_bias", "Platt bias b (0 = calibrated)", "+.3f")),
    "volume to quote": (("quote_relative_volume_bias", "recalibrated, held out: ΔV vs reference", "+.1%"),
                        ("relative_quote_expected_volume_bias", "recalibrated, held out: vs expected", "+.1%"),
                        ("relative_quote_raters_mean_volume_bias", "recalibrated, held out: vs the raters' mean", "+.1%"),
                        ("interval_coverage", "interval covers the reference", ".0%"),
                        ("interval_raters_mean_coverage", "interval covers the raters' mean", ".0%"),
                        ("interval_relative_width", "interval width / volume", ".0%"),
                        ("recalibration_uncertainty", "recalibrated total fixed to ± (its references' noise)", ".1%")),
    "lesions": (("lesion_f1", "lesion F1 (detection)", ".3f"), ("lesion_dice", "lesion-wise Dice (BraTS 2023)", ".3f"),
                ("lesion_false_positives_per_scan", "false positive lesions per scan", ".2f"),
                ("lesion_volume_bias_ml", "soft ΔV per lesion, ml", "+.3f"),
                ("lesion_volume_bias_ml_smallest", "soft ΔV per lesion, smallest size bin, ml", "+.3f")),
}


def headline_table(summary: dict[str, float], epoch: int, classes: int) -> str:
    """The closing table as text: the :data:`HEADLINE` values the run has, grouped."""
    table = Table(title=f"Validation after epoch {epoch}" + (f" (mean of {classes} classes)" if classes > 1 else ""),
                  show_header=False, title_justify="left")
    table.add_column("group", style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for group, rows in HEADLINE.items():
        shown = [(label, f"{summary[key]:{spec}}") for key, label, spec in rows if key in summary and not math.isnan(summary[key])]
        for i, (label, value) in enumerate(shown):
            table.add_row(group if i == 0 else "", label, value)
    table.caption = f"{len(summary)} values in metrics.json, per subject in subjects.csv"
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(table)
    return console.export_text()
