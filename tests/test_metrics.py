"""Per-subject Dice and volumes (ml, anisotropic spacing) against hand-computed values."""

import math

import pytest
import torch

from metrics import SubjectSegmentationMetrics, summarize


def probabilities_from(foreground: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - foreground, foreground])


def test_volumes_and_dice_by_hand_with_anisotropic_spacing():
    spacing = (0.5, 1.0, 3.0)  # voxel volume 1.5 mm³ = 0.0015 ml
    label = torch.zeros(4, 4, 4, dtype=torch.long)
    label[:2] = 1  # 32 reference voxels
    foreground = torch.zeros(4, 4, 4)
    foreground[1:3] = 0.8  # 32 predicted voxels, 16 overlapping
    foreground[3] = 0.25  # below 0.5: not predicted, but counts in the soft volume
    metric = SubjectSegmentationMetrics(num_classes=2)
    metric.update(probabilities_from(foreground), label[None], spacing, subject_index=0, expected_volume_ml=[0.05])
    rows = metric.compute()
    assert rows["dice"].item() == pytest.approx(2 * 16 / 64)
    assert rows["volume_ref_ml"].item() == pytest.approx(32 * 0.0015)
    assert rows["volume_pred_ml"].item() == pytest.approx(32 * 0.0015)
    assert rows["volume_pred_soft_ml"].item() == pytest.approx((32 * 0.8 + 16 * 0.25) * 0.0015)
    assert rows["volume_expected_ml"].item() == pytest.approx(0.05)


def test_summary_biases_over_subjects():
    metric = SubjectSegmentationMetrics(num_classes=2)
    spacing = (1.0, 1.0, 2.0)  # 0.002 ml per voxel
    for index, (n_ref, n_pred) in enumerate([(100, 120), (200, 150)]):
        label = torch.zeros(1000, 1, 1, dtype=torch.long)
        label[:n_ref] = 1
        fg = torch.zeros(1000, 1, 1)
        fg[:n_pred] = 1.0
        metric.update(probabilities_from(fg), label, spacing, index, [n_ref * 0.002 * 1.1])
    summary = summarize(metric.compute(), ["structure1"])
    deltas = [20 * 0.002, -50 * 0.002]
    assert summary["volume_bias_ml"] == pytest.approx(sum(deltas) / 2)
    assert summary["abs_volume_error_ml"] == pytest.approx(sum(abs(d) for d in deltas) / 2)
    assert summary["relative_volume_bias"] == pytest.approx((0.2 - 0.25) / 2)
    assert summary["soft_volume_bias_ml"] == pytest.approx(summary["volume_bias_ml"])
    assert summary["dice"] == pytest.approx((2 * 100 / 220 + 2 * 150 / 350) / 2)
    expected = [100 * 0.0022, 200 * 0.0022]
    assert summary["expected_volume_bias_ml"] == pytest.approx(((0.24 - expected[0]) + (0.3 - expected[1])) / 2)
    assert "dice/structure1" not in summary  # per-class keys only with several foreground classes


def test_multiclass_keys_and_empty_cases():
    metric = SubjectSegmentationMetrics(num_classes=3)
    label = torch.tensor([0, 1, 1, 0]).view(4, 1, 1)  # class 2 absent
    probs = torch.tensor([[0.9, 0.1, 0.1, 0.9], [0.05, 0.8, 0.8, 0.05], [0.05, 0.1, 0.1, 0.05]]).view(3, 4, 1, 1)
    metric.update(probs, label, (1.0, 1.0, 1.0), 0)
    rows = metric.compute()
    assert rows["dice"][0, 0].item() == pytest.approx(1.0)
    assert math.isnan(rows["dice"][0, 1].item())  # nothing predicted, nothing in the reference
    summary = summarize(rows, ["liver", "tumour"])
    assert summary["dice/liver"] == pytest.approx(1.0)
    assert summary["dice"] == pytest.approx(1.0)  # NaN classes are skipped in the mean
    assert math.isnan(summary["relative_volume_bias/tumour"])
    assert "expected_volume_bias_ml" not in summary  # expected volumes unknown


def test_duplicates_count_once_and_rows_are_ordered():
    metric = SubjectSegmentationMetrics(num_classes=2)
    label = torch.ones(2, 2, 2, dtype=torch.long)
    for index in (2, 0, 2, 1):
        metric.update(probabilities_from(torch.full((2, 2, 2), 0.9)), label, (1.0, 1.0, 1.0), index)
    rows = metric.compute()
    assert rows["subject_index"].tolist() == [0, 1, 2]
    assert rows["dice"].shape == (3, 1)


def test_state_resets_between_epochs():
    metric = SubjectSegmentationMetrics(num_classes=2)
    metric.update(probabilities_from(torch.ones(2, 2, 2)), torch.ones(2, 2, 2), (1, 1, 1), 0)
    metric.reset()
    with pytest.raises(RuntimeError, match="no subject"):
        metric.compute()
