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

import numpy as np
import torch

from datamodules.synthetic_volumes import SyntheticCase

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


def implied_relative_volume_bias(
    case: SyntheticCase,
    loss: LossFn,
    num_draws: int = 32,
    seed: int = 0,
    steps: int = 400,
) -> np.ndarray:
    """Relative bias ``(Σ p* − Σ q) / Σ q`` per foreground class of the expected-loss optimum.

    ``p*`` minimises the loss averaged over ``num_draws`` label draws of ``case`` (the same
    geometry and uncertainty model); ``Σ q`` is the case's expected volume. Shape ``(C − 1,)``.
    """
    draws = torch.from_numpy(case.draw_labels(np.random.default_rng(seed), num_draws))
    num_classes = case.probabilities.shape[0]
    optimum = optimal_probabilities(loss, draws, num_classes, steps=steps)
    soft = optimum[1:].reshape(num_classes - 1, -1).sum(1).double().numpy() * case.voxel_volume_ml
    expected = case.expected_volume_ml()
    return (soft - expected) / expected
