"""The generalised energy distance between a model's segmentations and the references.

For samples ``S₁…S_M`` of a model (an ensemble's members, a hypernetwork's α) and
references ``Y₁…Y_R`` (one label, or each rater's), per foreground class ``c``:

    D²_GED = 2/(M R) Σᵢⱼ d(Sᵢ, Yⱼ) − 1/M² Σᵢᵢ' d(Sᵢ, Sᵢ') − 1/R² Σⱼⱼ' d(Yⱼ, Yⱼ')

with ``d(A, B) = 1 − |A ∩ B| / |A ∪ B|`` on the masks of class ``c`` (``d = 0`` when both are
empty). The sums run over all pairs, the identical ones included (the V-statistic, as in
Kohl et al., "A probabilistic U-Net for segmentation of ambiguous images", NeurIPS 2018,
whose code reports D²_GED). It is 0 when the two sets of segmentations are the same
distribution; with one reference it measures both the samples' distance to it and, by the
negative middle term, rewards their diversity. Reported as D²_GED, NaN with fewer than two
samples.
"""

from __future__ import annotations

import torch


def pairwise_iou_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``1 − IoU`` between every mask of ``first`` ``(A, K, N)`` and of ``second`` ``(B, K, N)``
    (bool, ``K`` classes): ``(A, B, K)`` float64, 0 where both masks are empty."""
    a, b = first.double(), second.double()
    intersection = torch.einsum("akn,bkn->abk", a, b)
    union = a.sum(2)[:, None] + b.sum(2)[None] - intersection
    return torch.where(union > 0, 1 - intersection / union.clamp_min(1), torch.zeros_like(union))


def generalised_energy_distance(samples: torch.Tensor, references: torch.Tensor, num_classes: int) -> torch.Tensor:
    """D²_GED per foreground class ``(C − 1,)`` float64 between ``samples`` ``(M, …)`` and
    ``references`` ``(R, …)``, integer label maps of one shape; NaN where ``M < 2``."""
    classes = torch.arange(1, num_classes, device=samples.device).view(1, -1, 1)
    if samples.shape[0] < 2:
        return torch.full((num_classes - 1,), torch.nan, dtype=torch.float64, device=samples.device)
    s = samples.reshape(samples.shape[0], 1, -1) == classes
    y = references.reshape(references.shape[0], 1, -1).to(samples.device) == classes
    return (2 * pairwise_iou_distance(s, y).mean((0, 1)) - pairwise_iou_distance(s, s).mean((0, 1))
            - pairwise_iou_distance(y, y).mean((0, 1)))
