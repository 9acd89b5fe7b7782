"""Calibration of the predicted probabilities: reliability bins and expected calibration errors.

Two calibration errors, both pooled over all validation voxels (bins add up, so subjects and
DDP processes pool exactly), ``RELIABILITY_BINS`` = 20 equal-width bins of ``[0, 1]``:

* **class-wise** (Kull et al. 2019, NeurIPS, "classwise-ECE"): for each foreground class ``c``
  the one-vs-rest probability ``p_c`` of every voxel is binned; a bin keeps the voxel count,
  ``Σ p_c`` and ``Σ y_c`` (the reference's one-hot), and

      ECE_c = Σ_b (n_b / N) · |Σ_b y / n_b − Σ_b p / n_b| = Σ_b |Σ_b y − Σ_b p| / N;

* **top-label** (Guo et al. 2017, ICML, the ECE that Bertels et al. report, 20 bins): the
  confidence ``max_c p_c`` of every voxel is binned against whether its argmax class is the
  reference class.

Background voxels far from any structure (p ≈ 0, y = 0) count too, as in most segmentation
calibration studies: they dilute both errors equally for every loss, so compare ECEs between
runs on the same data only. A per-subject ECE is also kept (``subjects.csv``), but it is not a
calibration measure of the model on boundary-type uncertainty: there each subject's label is
one coherent draw, so even a perfectly calibrated model is miscalibrated *for that subject*;
the pooled values are the ones to compare.
"""

from __future__ import annotations

import torch

RELIABILITY_BINS = 20


def reliability_bins(
    probability: torch.Tensor, reference: torch.Tensor, count: torch.Tensor | None = None, bins: int = RELIABILITY_BINS
) -> torch.Tensor:
    """Sums ``(K, bins, 3)``: voxel count, ``Σ p`` and ``Σ y`` per class and bin, float64.

    Args:
        probability: ``(K, N)`` one-vs-rest probabilities of ``K`` classes.
        reference: ``(K, N)`` boolean or 0/1 reference of the same classes — or, with
            ``count``, the number of reference voxels behind each entry.
        count: ``(K, N)`` voxels behind each entry (a histogram's bins); 1 each by default.
    """
    classes = probability.shape[0]
    index = (probability.nan_to_num(0.0).clamp(0, 1) * bins).long().clamp_max(bins - 1)  # NaN (a diverged run) in bin 0
    index = index + bins * torch.arange(classes, device=probability.device).view(-1, 1)
    sums = torch.zeros(3, classes * bins, dtype=torch.float64, device=probability.device)
    flat = index.reshape(-1)
    count = torch.ones_like(flat, dtype=torch.float64) if count is None else count.reshape(-1).double()
    sums[0].index_add_(0, flat, count)
    sums[1].index_add_(0, flat, count * probability.reshape(-1).double())
    sums[2].index_add_(0, flat, reference.reshape(-1).double())
    return sums.view(3, classes, bins).permute(1, 2, 0).contiguous()


def expected_calibration_error(sums: torch.Tensor) -> torch.Tensor:
    """ECE from :func:`reliability_bins` sums ``(…, bins, 3)``; shape ``(…)``, NaN without voxels."""
    count = sums[..., 0].sum(-1)
    gap = (sums[..., 2] - sums[..., 1]).abs().sum(-1)
    return torch.where(count > 0, gap / count.clamp_min(1), torch.nan)
