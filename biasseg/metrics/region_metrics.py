"""Per-region measures for nnU-Net's region labels (overlapping classes, one sigmoid each).

A region (BraTS' whole tumour ⊃ tumour core ⊃ enhancing tumour) is a binary problem of its
own: its foreground probability ``p_r`` (the network's sigmoid) against the voxels whose label
value it covers. Every measure of :mod:`biasseg.metrics.subject_metrics` — Dice, reference, argmax
(``p_r > 0.5``), soft and near soft volume, calibration and the post-hoc remedies — is computed
per region by one two-class :class:`SubjectSegmentationMetrics` (probabilities ``(1 − p_r, p_r)``),
and the results are laid side by side as classes, so every table, key and file reads as with
exclusive classes (``val/dice/<region>``, ``val/volume_bias_ml/<region>``). The top-label ECE
of regions, which have no single top label, is the mean of the regions' own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from biasseg.metrics.subject_metrics import SubjectSegmentationMetrics, per_subject


def region_masks(label: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(R, …)`` booleans: voxel of ``label`` (integer values, any shape) inside each region."""
    return torch.stack([torch.isin(label, torch.as_tensor(list(values), device=label.device)) for values in regions])


class RegionMetrics(nn.Module):
    """One row per subject and region; :func:`per_region_subject` reads them like
    :func:`~biasseg.metrics.subject_metrics.per_subject` reads exclusive classes."""

    num_raters = 0  # several raters and regions are not combined (refused by the datamodule)

    def __init__(self, regions: Sequence[Sequence[int]], soft_volume_margin_mm: float = 10.0) -> None:
        super().__init__()
        self.regions = [list(r) for r in regions]
        self.per_region = nn.ModuleList(SubjectSegmentationMetrics(2, soft_volume_margin_mm) for _ in self.regions)

    def update(self, probabilities: torch.Tensor, label: torch.Tensor, spacing_mm: Sequence[float], subject_index: int,
               expected_volume_ml: Sequence[float] | torch.Tensor | None = None, samples: torch.Tensor | None = None,
               raters: torch.Tensor | None = None) -> None:
        """Add one subject: ``probabilities`` ``(R, W, H, D)`` (each region's foreground), ``label``
        the integer label map, ``samples`` ``(M, R, W, H, D)`` region masks of an ensemble's members."""
        label = label.reshape(probabilities.shape[1:]).to(probabilities.device)
        masks = region_masks(label, self.regions)
        expected = None if expected_volume_ml is None else torch.as_tensor(expected_volume_ml, dtype=torch.float64).reshape(-1)
        for r, metric in enumerate(self.per_region):
            p = probabilities[r]
            metric.update(torch.stack([1 - p, p]), masks[r], spacing_mm, subject_index,
                          None if expected is None else expected[r: r + 1],
                          None if samples is None else samples[:, r].to(torch.uint8))

    def reset(self) -> None:
        for metric in self.per_region:
            metric.reset()


def per_region_subject(metric: RegionMetrics) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`~biasseg.metrics.subject_metrics.per_subject` of every region, regions as classes."""
    results = [per_subject(m) for m in metric.per_region]
    rows = {key: (value if key == "subject_index" else torch.cat([r[0][key] for r in results], dim=1))
            for key, value in results[0][0].items()}
    fitted = {"log_odds": torch.cat([r[1]["log_odds"] for r in results], dim=1), "voxel_ml": results[0][1]["voxel_ml"]}
    for key, value in results[0][1].items():
        if key not in fitted:
            values = [r[1][key] for r in results]
            fitted[key] = torch.stack(values).mean() if value.ndim == 0 else torch.cat(values, dim=0)
    return rows, fitted
