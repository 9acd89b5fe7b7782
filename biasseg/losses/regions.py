"""Any configured loss on nnU-Net's region labels: each region a binary problem of its own.

A region network has one logit ``z_r`` per region and a sigmoid ``p_r = σ(z_r)`` (nnU-Net's
region-based training). The softmax of the pair ``(0, z_r)`` is ``(1 − p_r, p_r)``, so the
configured loss applied to that pair against the region's mask is its binary form: cross-entropy
becomes binary cross-entropy per region, soft Dice (background excluded) the soft Dice of the
region, DC + CE nnU-Net's ``DC_and_BCE_loss``; the loss is the mean over regions (nnU-Net's mean
over channels). ``tests/test_regions.py`` checks the first two against ``binary_cross_entropy_with_logits``
and MONAI's ``DiceLoss(sigmoid=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from biasseg.metrics.region_metrics import region_masks


def region_loss(loss: Callable[..., torch.Tensor], logits: torch.Tensor, target: torch.Tensor,
                regions: Sequence[Sequence[int]], **options) -> torch.Tensor:
    """Mean over regions of ``loss`` on ``(0, z_r)`` against region ``r``'s mask; ``logits``
    ``(B, R, …)``, ``target`` the integer label map ``(B, 1, …)``; ``options`` go to ``loss``."""
    masks = region_masks(target[:, 0], regions)  # (R, B, …)
    total = 0.0
    for r in range(len(regions)):
        z = logits[:, r: r + 1]
        total = total + loss(torch.cat([torch.zeros_like(z), z], dim=1), masks[r][:, None].long(), **options)
    return total / len(regions)
