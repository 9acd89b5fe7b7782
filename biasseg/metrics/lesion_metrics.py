"""Lesion-wise measures over a validation (or evaluation) set, DDP-safe.

:class:`LesionMetrics` collects :func:`biasseg.metrics.lesions.lesion_rows` for every subject and
foreground class (or region) as one float64 tensor state, gathered across processes
(``dist_reduce_fx="cat"``); ``compute`` keeps each subject once (DDP padding repeats subjects).
:func:`lesion_epoch_summary` turns the rows into the logged values (``val/lesion_…``) and
:func:`lesion_table` into ``lesions.csv``'s rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from biasseg.metrics.lesions import LESION_COLUMNS, LesionSettings, lesion_rows, lesion_summary

ROW_COLUMNS = ("subject_index", *LESION_COLUMNS)  # the state's columns


def argmax_masks(probabilities: torch.Tensor) -> torch.Tensor:
    """``(C − 1, W, H, D)`` bool: where each foreground class is the argmax of ``(C, W, H, D)``
    (a tie to the lower class, as ``argmax``). One elementwise pass per class: several times
    faster on the CPU than ``argmax(0)``, which reduces across the strided class axis."""
    best, winner = probabilities[0], torch.zeros(probabilities.shape[1:], dtype=torch.uint8)
    for c in range(1, len(probabilities)):
        better = probabilities[c] > best
        best, winner = torch.where(better, probabilities[c], best), torch.where(better, c, winner)
    return winner[None] == torch.arange(1, len(probabilities), dtype=torch.uint8).view(-1, 1, 1, 1)


def subject_lesion_rows(probabilities: torch.Tensor, label: torch.Tensor | None, spacing_mm: Sequence[float],
                        settings: LesionSettings, regions: Sequence[Sequence[int]] | None = None,
                        expected: torch.Tensor | None = None) -> np.ndarray:
    """One subject's :func:`lesion_rows` over its foreground classes (class ``k`` numbered
    ``k``), or over its ``regions`` (region ``i`` numbered ``i + 1``; their sigmoid maps).

    Args:
        probabilities: ``(C, W, H, D)`` class probabilities (with regions ``(R, W, H, D)``).
        label: ``(W, H, D)`` integer reference, or None (prediction only: every predicted
            lesion is a row with no reference).
        spacing_mm: voxel spacing in mm.
        settings: how lesions are found and matched.
        regions: the label values of each region, or None for exclusive classes.
        expected: ``(C − 1 or R, W, H, D)`` the label distribution where known, else None.
    """
    probabilities = probabilities.detach().float().cpu()
    if regions is not None:
        masks, soft = (probabilities > 0.5).numpy(), probabilities.numpy()
    else:
        masks = argmax_masks(probabilities).numpy()
        soft = probabilities[1:].numpy()
    if label is None:
        references = np.zeros_like(masks)
    else:
        label = label.detach().cpu().reshape(probabilities.shape[1:]).numpy()
        values = regions if regions is not None else [[c] for c in range(1, len(probabilities))]
        references = np.stack([np.isin(label, list(v)) for v in values])
    maps = [None] * len(masks) if expected is None else expected.detach().cpu().numpy()
    rows = [lesion_rows(m, r, p, spacing_mm, settings, q, class_index=k + 1) for k, (m, r, p, q) in enumerate(zip(masks, references, soft, maps))]
    return np.concatenate(rows) if rows else np.zeros((0, len(LESION_COLUMNS)))


class LesionMetrics(Metric):
    """One row per reference lesion and per unmatched predicted lesion of every subject."""

    full_state_update = False

    def __init__(self, settings: LesionSettings, regions: Sequence[Sequence[int]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.regions = regions
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, probabilities: torch.Tensor, label: torch.Tensor, spacing_mm: Sequence[float], subject_index: int,
               expected: torch.Tensor | None = None) -> None:
        """Add one subject (see :func:`subject_lesion_rows` for the arguments)."""
        table = subject_lesion_rows(probabilities, label, [float(s) for s in spacing_mm], self.settings, self.regions, expected)
        table = np.concatenate([np.full((len(table), 1), subject_index, dtype=np.float64), table], axis=1)
        self.rows.append(torch.as_tensor(table, dtype=torch.float64, device=self.device))

    def compute(self) -> torch.Tensor:
        """``(n, len(ROW_COLUMNS))``: the rows ordered by subject, class and lesion, each subject once."""
        rows = self.rows if isinstance(self.rows, torch.Tensor) else (
            torch.cat(self.rows) if self.rows else torch.zeros((0, len(ROW_COLUMNS)), dtype=torch.float64))
        if not len(rows):
            return rows.reshape(0, len(ROW_COLUMNS)).cpu()
        rows = rows.cpu()
        # sorted by (subject, class, lesion), each once: a repeated subject's rows are the same rows
        _, first = np.unique(rows[:, :3].numpy(), axis=0, return_index=True)
        return rows[torch.as_tensor(first)]


def lesion_epoch_summary(rows: torch.Tensor | np.ndarray, settings: LesionSettings, subjects: Sequence[int] = ()) -> dict[str, float]:
    """The logged lesion values: the means over subjects (and classes) of each subject's
    :func:`lesion_summary` (a subject with no lesion on either side has no F1 or Dice), the mean
    soft-volume error over all reference lesions (``lesion_volume_bias_ml``, ml; against the
    expected volume where it is known, ``lesion_expected_volume_bias_ml``) and over those
    of the smallest size bin that holds any (``lesion_volume_bias_ml_smallest``), per size bin
    the sensitivity and soft-volume error (``lesion_sensitivity/<bin>ml``,
    ``lesion_volume_bias_ml/<bin>ml``), and the false positives per scan. ``subjects``: every
    subject validated (those without any lesion row still count as scans)."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(ROW_COLUMNS))
    column = {name: rows[:, i] for i, name in enumerate(ROW_COLUMNS)}
    keys = sorted({(int(s), int(c)) for s, c in zip(column["subject_index"], column["class"])})
    per_subject = [lesion_summary(rows[(column["subject_index"] == s) & (column["class"] == c), 1:]) for s, c in keys]
    scans = max(len(set(int(s) for s in subjects) | {s for s, _ in keys}), 1)

    def mean(key: str) -> float:
        values = [v[key] for v in per_subject if not math.isnan(v[key])]
        return float(np.mean(values)) if values else math.nan

    reference = column["reference"] == 1
    error = column["volume_pred_soft_ml"] - column["volume_ref_ml"]
    summary = {key: mean(key) for key in ("lesion_sensitivity", "lesion_f1", "lesion_dice", "lesion_count_difference")}
    summary["lesion_false_positives_per_scan"] = float((~reference).sum() / scans)
    summary["lesion_volume_bias_ml"] = float(error[reference].mean()) if reference.any() else math.nan
    summary["lesion_hard_volume_bias_ml"] = (float((column["volume_pred_ml"] - column["volume_ref_ml"])[reference].mean())
                                             if reference.any() else math.nan)
    known = reference & np.isfinite(column["volume_expected_ml"])  # generated data: the label distribution is known
    summary["lesion_expected_volume_bias_ml"] = (float((column["volume_pred_soft_ml"] - column["volume_expected_ml"])[known].mean())
                                                 if known.any() else math.nan)
    bins = column["size_bin"][reference]
    smallest = int(bins.min()) if len(bins) else None
    summary["lesion_volume_bias_ml_smallest"] = float(error[reference][bins == smallest].mean()) if smallest is not None else math.nan
    for b, name in enumerate(settings.bin_names()):
        in_bin = reference & (column["size_bin"] == b)
        if in_bin.any():
            summary[f"lesion_sensitivity/{name}ml"] = float(column["detected"][in_bin].mean())
            summary[f"lesion_volume_bias_ml/{name}ml"] = float(error[in_bin].mean())
    return summary


LESION_TABLE_COLUMNS = ("subject", "class", "lesion", "kind", "detected", "components", "dice", "volume_ref_ml",
                        "volume_pred_ml", "volume_pred_soft_ml", "volume_expected_ml", "size_bin_ml",
                        "centre_x", "centre_y", "centre_z")


def _count(value: float) -> int | float:
    """A lesion's component count as written: whole, or a share (a component joining n lesions is 1/n of each)."""
    return int(value) if float(value).is_integer() else round(value, 4)


def lesion_table(rows: torch.Tensor | np.ndarray, subject_names: Sequence[str], class_names: Sequence[str],
                 settings: LesionSettings) -> list[dict]:
    """``lesions.csv``'s rows: subject and class by name, ``kind`` (``reference``, or
    ``false_positive``: a predicted lesion matched to none), the size bin by name, centres in
    voxels of the grid measured on."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(ROW_COLUMNS))
    bins = settings.bin_names()
    table = []
    for row in rows:
        value = dict(zip(ROW_COLUMNS, row.tolist()))
        table.append({
            "subject": subject_names[int(value["subject_index"])], "class": class_names[int(value["class"]) - 1],
            "lesion": int(value["lesion"]), "kind": "reference" if value["reference"] else "false_positive",
            "detected": int(value["detected"]), "components": _count(value["components"]),
            **{key: value[key] for key in ("dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml", "volume_expected_ml")},
            "size_bin_ml": bins[int(value["size_bin"])],
            **{key: round(value[key], 2) for key in ("centre_x", "centre_y", "centre_z")},
        })
    return table
