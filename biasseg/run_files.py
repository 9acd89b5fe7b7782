"""A run's result files, written one way by training (:class:`~biasseg.callbacks.ResultsWriter`),
evaluate.py and score.py: ``metrics.json``, ``subjects.csv`` and ``calibration.csv``; and the
atomic write every file of the project goes through (results, cache, plans, calibrations).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from biasseg.metrics import PER_SUBJECT_KEYS
from biasseg.metrics.lesion_metrics import LESION_TABLE_COLUMNS


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


def csv_text(table: list[dict[str, object]], columns: Sequence[str] | None = None) -> str:
    """``table`` as CSV text; ``columns``: the header (default: the first row's keys)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns if columns is not None else table[0]))
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


def write_results(output_dir: Path, metrics: dict, rows: dict[str, torch.Tensor], subject_names: list[str],
                  class_names: list[str], reliability: torch.Tensor | None = None, lesions: list[dict] | None = None) -> None:
    """Write ``metrics.json`` (``metrics`` as given), ``subjects.csv`` (:func:`subject_table` of
    ``rows``, subjects named by their ``subject_index``), with ``reliability`` ``(C − 1, bins,
    3)`` ``calibration.csv`` (:func:`calibration_table`) and with ``lesions`` (rows of
    :func:`biasseg.metrics.lesion_metrics.lesion_table`) ``lesions.csv`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    write_atomically(output_dir / "subjects.csv", csv_text(subject_table(rows, subject_names, class_names)))
    if reliability is not None:
        write_atomically(output_dir / "calibration.csv", csv_text(calibration_table(reliability, class_names)))
    if lesions is not None:
        write_atomically(output_dir / "lesions.csv", csv_text(lesions, LESION_TABLE_COLUMNS))
