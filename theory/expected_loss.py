"""Numerical optimum of a loss's *expected* value under label uncertainty.

Given ``M`` draws of the uncertain label for one image, the expected loss of a prediction
``p`` is estimated by the mean loss over the draws. Minimising it over free per-voxel
logits gives the prediction a perfect network trained with that loss would converge to;
its soft volume ``Σ p × voxel volume`` is the volume that loss implies. For cross-entropy
the optimum is the label frequency (a proper scoring rule); for soft Dice it is not
(Bertels et al. 2019, 2021).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def optimal_probabilities(
    loss: LossFn,
    label_samples: torch.Tensor,
    num_classes: int,
    steps: int = 400,
    lr: float = 0.2,
    init_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probabilities ``(C, *spatial)`` minimising ``mean_m loss(logits, label_samples[m])``.

    Args:
        loss: called as ``loss(logits (M, C, *spatial), labels (M, 1, *spatial))``; a
            per-image loss (e.g. ``SoftDiceLoss()``) averaged over the batch of draws is the
            expected per-image loss.
        label_samples: ``(M, *spatial)`` integer draws of the label of one image.
        num_classes: ``C``.
        steps, lr: Adam iterations and step size on the logits.
        init_logits: ``(C, *spatial)`` start; zeros (uniform) by default.
    """
    spatial = label_samples.shape[1:]
    logits = torch.zeros(num_classes, *spatial) if init_logits is None else init_logits.clone().float()
    logits.requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    targets = label_samples.long().unsqueeze(1)
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        value = loss(logits.unsqueeze(0).expand(len(label_samples), *logits.shape), targets)
        value.backward()
        optimiser.step()
    return torch.softmax(logits.detach(), dim=0)
