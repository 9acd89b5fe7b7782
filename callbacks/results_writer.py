"""Writes a run's validation results: ``metrics.json``, ``subjects.csv``, ``calibration.csv``
and a closing table."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table

from metrics import PER_SUBJECT_KEYS

log = logging.getLogger(__name__)


def subject_table(rows: dict, subject_names: list[str], class_names: list[str]) -> list[dict[str, object]]:
    """One dict per subject: ``subject`` then each per-subject key (``key/<class>`` per class
    when there are several foreground classes, the class mean under ``key``). The
    ``volume_expected_ml`` and ``ged`` columns appear only where some subject has a value."""
    optional = {key for key in ("volume_expected_ml", "ged") if key in rows and bool(rows[key].isnan().all())}
    keys = [k for k in PER_SUBJECT_KEYS if k not in optional]
    keys += [k for k in rows if k not in PER_SUBJECT_KEYS and k != "subject_index"]  # the raters' columns
    table = []
    for i, index in enumerate(rows["subject_index"].tolist()):
        row: dict[str, object] = {"subject": subject_names[index]}
        for key in keys:
            values = rows[key][i].tolist()
            finite = [v for v in values if not math.isnan(v)]
            row[key] = sum(finite) / len(finite) if finite else math.nan
            if len(class_names) > 1:
                row.update({f"{key}/{name}": v for name, v in zip(class_names, values)})
        table.append(row)
    return table


def calibration_table(reliability, class_names: list[str]) -> list[dict[str, object]]:
    """One dict per class and reliability bin: ``class, bin, lower, upper, count,
    mean_probability, frequency`` (NaN for an empty bin) from ``(C − 1, bins, 3)`` sums."""
    table = []
    for name, sums in zip(class_names, reliability.tolist()):
        for index, (count, probability, positives) in enumerate(sums):
            table.append({
                "class": name,
                "bin": index,
                "lower": index / len(sums),
                "upper": (index + 1) / len(sums),
                "count": int(count),
                "mean_probability": probability / count if count else math.nan,
                "frequency": positives / count if count else math.nan,
            })
    return table


def csv_text(table: list[dict[str, object]]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    return text.getvalue()


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, content: str | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (text, or a function writing to a binary file) to ``path`` through a
    uniquely named temporary file in the same folder, so readers never see half a file and
    concurrent writers (DDP ranks, nodes sharing a cache) never share a temporary. The file
    gets the permissions of a plain ``open``: ``0o666`` less the user's umask (``mkstemp``
    alone would leave ``0o600``, unreadable for collaborators and other users of a cache)."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsWriter(pl.Callback):
    """After every validation epoch (rank zero, not the sanity check) write into ``output_dir``:

    * ``metrics.json``: ``epoch``, ``global_step``, ``num_subjects``, ``calibration_verdict``
      (:func:`metrics.volume_quote.verdict`) and every ``val/…`` key;
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = pl_module.validation_rows
        metrics = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "num_subjects": len(rows["subject_index"]),
            **self.fields,
            "calibration_verdict": pl_module.calibration_verdict,
            **{f"val/{k}": v for k, v in pl_module.validation_summary.items()},
        }
        write_atomically(self.output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True) + "\n")
        names = trainer.datamodule.val_subject_names
        write_atomically(self.output_dir / "subjects.csv", csv_text(subject_table(rows, names, pl_module.class_names)))
        if pl_module.validation_reliability is not None:
            table = calibration_table(pl_module.validation_reliability, pl_module.class_names)
            write_atomically(self.output_dir / "calibration.csv", csv_text(table))

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
            (log.warning if "NOT " in verdict else log.info)(verdict)
        outputs = [p for p in ("metrics.json", "subjects.csv", "calibration.csv", "splits.json", "checkpoints/last.ckpt",
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
                        ("interval_coverage", "interval covers the reference", ".0%"),
                        ("interval_relative_width", "interval width / volume", ".0%")),
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
