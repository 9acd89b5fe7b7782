"""The expected-loss optimiser that predicts each loss's volume bias."""

import numpy as np
import pytest
import torch

from datamodules.synthetic_volumes import Structure, generate_case
from losses import CrossEntropyLoss, SoftDiceLoss
from theory.expected_loss import implied_relative_volume_bias, optimal_probabilities


def test_cross_entropy_optimum_is_the_label_frequency():
    generator = torch.Generator().manual_seed(0)
    q = torch.rand(6, 5, 4, generator=generator)
    draws = (torch.rand(64, 6, 5, 4, generator=generator) < q).long()
    optimum = optimal_probabilities(CrossEntropyLoss(), draws, 2, steps=600, lr=0.1)
    torch.testing.assert_close(optimum[1], draws.float().mean(0), atol=0.02, rtol=0)


def test_soft_dice_optimum_is_nearly_binary_and_keeps_likely_voxels():
    # deterministic label: the optimum is the label itself
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, 1:3, 1:3, 1:3] = 1
    optimum = optimal_probabilities(SoftDiceLoss(), label, 2, steps=300)
    assert ((optimum[1] > 0.5).long() == label[0]).all()


def small_case(kind: str):
    case = generate_case(np.random.default_rng(0), (24, 24, 16), (1.0, 1.0, 1.5), 1, (4.0, 4.5),
                         sigma_mm=2.5, kind=kind)
    assert isinstance(case.structures[0], Structure)
    return case


@pytest.mark.parametrize("kind, sign", [("voxel", 1), ("boundary", -1)])
def test_soft_dice_bias_direction_depends_on_the_kind_of_uncertainty(kind, sign):
    # Bertels et al.: independent voxel noise -> soft Dice over-segments small structures;
    # a shifted boundary -> it under-segments them. Cross-entropy is unbiased in both.
    case = small_case(kind)
    dice_bias = implied_relative_volume_bias(case, SoftDiceLoss(), num_draws=32, steps=250)[0]
    ce_bias = implied_relative_volume_bias(case, CrossEntropyLoss(), num_draws=32, steps=400)[0]
    assert np.sign(dice_bias) == sign and abs(dice_bias) > 0.05
    assert abs(ce_bias) < abs(dice_bias)
