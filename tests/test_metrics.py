"""Per-subject Dice and volumes (ml, anisotropic spacing) against hand-computed values."""

import math

import pytest
import torch

from biasseg.metrics import SubjectSegmentationMetrics, per_subject, summarize


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


# --- calibration and post-hoc remedies -------------------------------------------------
from biasseg.metrics.calibration import expected_calibration_error, reliability_bins  # noqa: E402
from biasseg.metrics.posthoc import fit_temperature, log_odds, log_odds_histogram, posthoc_remedies, rankseg_decoding  # noqa: E402


def test_reliability_bins_and_ece_by_hand():
    probability = torch.tensor([[0.05, 0.05, 0.95, 0.95, 0.5, 0.5]])
    reference = torch.tensor([[0, 0, 1, 0, 1, 1]]).bool()
    sums = reliability_bins(probability, reference, bins=10)
    assert sums[0, 0].tolist() == pytest.approx([2, 0.1, 0])
    assert sums[0, 9].tolist() == pytest.approx([2, 1.9, 1])
    assert sums[0, 5].tolist() == pytest.approx([2, 1.0, 2])
    # ECE = (|0 − 0.1| + |1 − 1.9| + |2 − 1|) / 6
    assert expected_calibration_error(sums).item() == pytest.approx(2.0 / 6)


def overconfident_subjects(sharpening: float, count: int = 4, seed: int = 0):
    """Labels drawn from q; predictions σ(sharpening · logit q): calibrated when sharpening = 1."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        q = torch.rand(16, 16, 16, generator=generator) ** 2
        label = (torch.rand(16, 16, 16, generator=generator) < q).long()
        p = torch.sigmoid(sharpening * (torch.log(q) - torch.log1p(-q)))
        yield q, label, torch.stack([1 - p, p])


def test_temperature_scaling_undoes_overconfidence():
    metric = SubjectSegmentationMetrics(num_classes=2)
    for index, (_, label, probabilities) in enumerate(overconfident_subjects(3.0)):
        metric.update(probabilities, label, (1.0, 1.0, 1.0), index)
    rows, fitted = per_subject(metric)
    assert fitted["temperature"].item() == pytest.approx(3.0, rel=0.08)
    assert fitted["ece"].item() > 0.05 and fitted["ece_calibrated"].item() < 0.02  # 0.02: label-draw noise
    # the calibrated soft volume is close to the reference, the overconfident one is not
    error = (rows["volume_soft_calibrated_ml"] - rows["volume_ref_ml"]).abs().mean()
    assert error < 0.5 * (rows["volume_pred_soft_ml"] - rows["volume_ref_ml"]).abs().mean()
    assert rows["ece"].shape == (4, 1)


def test_threshold_decoding_matches_a_brute_force_search():
    metric = SubjectSegmentationMetrics(num_classes=2)
    subjects = list(overconfident_subjects(1.0, seed=1))
    for index, (_, label, probabilities) in enumerate(subjects):
        metric.update(probabilities, label, (1.0, 1.0, 2.0), index)
    rows, fitted = per_subject(metric)

    def mean_dice(t: float) -> float:
        dice = []
        for _, label, probabilities in subjects:
            pred, ref = probabilities[1] > t, label == 1
            dice.append(2 * (pred & ref).sum().item() / (pred.sum() + ref.sum()).item())
        return sum(dice) / len(dice)

    best = max(mean_dice(t) for t in torch.linspace(0.01, 0.99, 99).tolist())
    assert rows["dice_threshold"].mean().item() == pytest.approx(best, abs=0.01)
    assert mean_dice(fitted["threshold"].item()) == pytest.approx(rows["dice_threshold"].mean().item(), abs=0.01)
    predicted = (subjects[0][2][1] > fitted["threshold"].item()).sum().item() * 0.002
    assert rows["volume_threshold_ml"][0, 0].item() == pytest.approx(predicted, rel=0.03)


def test_rankseg_matches_the_reciprocal_moment_rule_on_voxels():
    _, label, probabilities = next(overconfident_subjects(1.0, count=1, seed=2))
    p = probabilities[1].flatten().double()
    ordered = p.sort(descending=True).values
    tau = torch.arange(1, len(p) + 1, dtype=torch.float64)
    expected_dice = 2 * ordered.cumsum(0) / (p.sum() + tau + 1)
    best_tau = int(expected_dice.argmax()) + 1
    histogram = log_odds_histogram(log_odds(probabilities.flatten(1)), (label == 1).flatten()[None])
    dice, voxels = rankseg_decoding(histogram[None], torch.ones(1, dtype=torch.float64))
    assert voxels.item() == pytest.approx(best_tau, rel=0.03)
    selected = torch.zeros_like(p, dtype=torch.bool)
    selected[p.argsort(descending=True)[:best_tau]] = True
    reference = (label == 1).flatten()
    direct = 2 * (selected & reference).sum().item() / (best_tau + reference.sum().item())
    assert dice.item() == pytest.approx(direct, abs=0.01)


def test_rankseg_leaves_a_class_empty_when_no_voxel_is_likely():
    z = torch.full((1, 1000), math.log(0.3 / 0.7))
    histogram = log_odds_histogram(z, torch.zeros(1, 1000, dtype=torch.bool))
    dice, voxels = rankseg_decoding(histogram[None], torch.ones(1, dtype=torch.float64))
    assert voxels.item() == 0 and math.isnan(dice.item())  # nothing predicted, nothing in the reference


def test_remedies_are_finite_for_three_classes_and_empty_classes():
    metric = SubjectSegmentationMetrics(num_classes=3)
    label = torch.tensor([0, 1, 1, 0]).view(4, 1, 1)
    probs = torch.tensor([[0.9, 0.1, 0.1, 0.9], [0.05, 0.8, 0.8, 0.05], [0.05, 0.1, 0.1, 0.05]]).view(3, 4, 1, 1)
    metric.update(probs, label, (1.0, 1.0, 1.0), 0)
    rows, fitted = per_subject(metric)
    remedies, _ = posthoc_remedies(metric.compute()["log_odds"].reshape(1, 2, 2, -1), torch.ones(1, dtype=torch.float64))
    assert set(remedies) <= set(rows)
    assert rows["volume_soft_calibrated_ml"].shape == (1, 2) and torch.isfinite(rows["volume_soft_calibrated_ml"]).all()
    assert fitted["temperature"].shape == (2,) and torch.isfinite(fitted["ece"]).all()
    summary = summarize(rows, ["liver", "tumour"], fitted)
    assert {"ece/liver", "temperature/tumour", "rankseg_volume_bias_ml", "dice_threshold"} <= set(summary)


def test_temperature_of_a_saturated_map_matches_an_exact_fit():
    """Soft-Dice-like maps put most voxels at |logit| >> 16, where 1 − p rounds to 0 in
    float32: the log-odds come from the other classes' probabilities, so the fit still sees them."""
    generator = torch.Generator().manual_seed(4)
    logit = 3.0 * torch.randn(50_000, generator=generator) * 4  # up to |z| ≈ 50
    label = torch.rand(50_000, generator=generator) < torch.sigmoid(logit / 12.0)  # true temperature 12
    probabilities = torch.softmax(torch.stack([torch.zeros_like(logit), logit]), 0)  # float32, saturated
    histogram = log_odds_histogram(log_odds(probabilities), label[None])
    grid = torch.logspace(-2, 2, 801, dtype=torch.float64)
    z = logit.double()[None] / grid[:, None]
    nll = (torch.nn.functional.softplus(z) * ~label + torch.nn.functional.softplus(-z) * label).sum(1)
    exact = grid[nll.argmin()].item()
    assert fit_temperature(histogram[None]).item() == pytest.approx(exact, rel=0.05)
    assert exact == pytest.approx(12.0, rel=0.1)


def test_non_finite_probabilities_do_not_crash_the_metrics():
    metric = SubjectSegmentationMetrics(num_classes=2)
    foreground = torch.full((4, 4, 4), float("nan"))
    metric.update(probabilities_from(foreground), torch.ones(4, 4, 4, dtype=torch.long), (1.0, 1.0, 1.0), 0)
    rows, fitted = per_subject(metric)
    assert rows["ece"].shape == (1, 1)


def test_calibration_summaries_do_not_depend_on_the_chunking(monkeypatch):
    import biasseg.metrics.subject_metrics as module

    _, label, probabilities = next(overconfident_subjects(2.0, count=1, seed=5))
    states = []
    for chunk in (module.CALIBRATION_CHUNK, 1000):
        monkeypatch.setattr(module, "CALIBRATION_CHUNK", chunk)
        metric = SubjectSegmentationMetrics(num_classes=2)
        metric.update(probabilities, label, (1.0, 1.0, 1.0), 0)
        states.append((metric.reliability[0], metric.log_odds[0]))
    torch.testing.assert_close(states[0][0], states[1][0])
    torch.testing.assert_close(states[0][1], states[1][1])


def test_a_class_absent_from_every_subject_is_decoded_as_nothing():
    """Regression: "predict nothing" scored NaN → −1, so the threshold that predicts every
    voxel won (sigmoid(−40), the whole image, Dice 0)."""
    from biasseg.metrics.posthoc import threshold_decoding

    generator = torch.Generator().manual_seed(3)
    histograms = []
    for _ in range(3):
        z = torch.randn(1, 2000, generator=generator) * 3 - 4  # some voxels fairly likely, none in the reference
        histograms.append(log_odds_histogram(z, torch.zeros(1, 2000, dtype=torch.bool)))
    threshold, dice, voxels = threshold_decoding(torch.stack(histograms))
    assert (voxels == 0).all() and torch.isnan(dice).all()
    assert threshold.item() > 0.99


def test_rankseg_equals_the_reference_package_on_random_maps():
    """Our histogram RankSEG against rankseg.rankseg_rma (RMA, metric=dice, smooth=0,
    pruning_prob=0.5) on voxel maps whose probabilities sit on the histogram's bin centres,
    so both see the same numbers; ties inside a bin never split an optimum (the objective
    is monotone along a run of equal probabilities)."""
    rankseg = pytest.importorskip("rankseg")
    from biasseg.metrics.posthoc import bin_centres

    generator = torch.Generator().manual_seed(7)
    centres = bin_centres()
    for trial in range(12):
        size = int(torch.randint(50, 3000, (1,), generator=generator))
        spread = float(torch.rand(1, generator=generator)) * 6
        shift = float(torch.randn(1, generator=generator)) * 3
        wanted = torch.randn(size, generator=generator, dtype=torch.float64) * spread + shift
        z = centres[torch.bucketize(wanted.clamp(-39.9, 39.9), centres).clamp(0, len(centres) - 1)]
        p = torch.sigmoid(z)
        label = torch.rand(size, generator=generator, dtype=torch.float64) < p
        histogram = log_odds_histogram(z[None], label[None])
        dice, voxels = rankseg_decoding(histogram[None], torch.ones(1, dtype=torch.float64))
        masks = rankseg.rankseg_rma(torch.stack([1 - p, p])[None], metric="dice", smooth=0.0,
                                    output_mode="multilabel", pruning_prob=0.5)
        reference_voxels = int(masks[0, 1].sum())
        assert voxels.item() == reference_voxels, trial
        if reference_voxels:
            tp = int((masks[0, 1] & label).sum())
            assert dice.item() == pytest.approx(2 * tp / (reference_voxels + int(label.sum())))


def test_platt_scaling_recovers_a_known_slope_and_bias():
    from biasseg.metrics.posthoc import fit_platt

    generator = torch.Generator().manual_seed(11)
    z = torch.randn(1, 200_000, generator=generator, dtype=torch.float64) * 4
    label = torch.rand(1, 200_000, generator=generator, dtype=torch.float64) < torch.sigmoid(0.5 * z - 1.5)
    slope, bias = fit_platt(log_odds_histogram(z, label)[None])
    assert slope.item() == pytest.approx(0.5, abs=0.02) and bias.item() == pytest.approx(-1.5, abs=0.05)


def test_isotonic_regression_is_monotone_and_matches_pool_adjacent_violators_by_hand():
    from biasseg.metrics.posthoc import bin_centres, fit_isotonic

    centres = bin_centres()
    histogram = torch.zeros(1, 1, 2, len(centres), dtype=torch.float64)
    # three occupied bins (low to high log-odds) with frequencies 0.5, 0.25, 0.9: the first
    # two violate monotonicity and pool to (2 + 1) / (4 + 4) = 0.375
    for b, (negative, positive) in zip((100, 600, 1100), ((2, 2), (3, 1), (1, 9))):
        histogram[0, 0, 0, b], histogram[0, 0, 1, b] = negative, positive
    fitted = fit_isotonic(histogram)[0]
    assert fitted[100].item() == pytest.approx(0.375) and fitted[600].item() == pytest.approx(0.375)
    assert fitted[1100].item() == pytest.approx(0.9)
    assert (fitted[1:] >= fitted[:-1]).all()  # empty bins take their neighbours' value


def test_recalibrated_soft_volumes_fix_a_biased_map():
    """A map whose every probability is pushed up (a bias, not a temperature): Platt and
    isotonic bring the soft volume back to the reference; temperature scaling cannot."""
    metric = SubjectSegmentationMetrics(num_classes=2)
    generator = torch.Generator().manual_seed(5)
    for index in range(4):
        q = torch.rand(20, 20, 20, generator=generator) ** 3
        label = (torch.rand(20, 20, 20, generator=generator) < q).long()
        p = torch.sigmoid(torch.log(q) - torch.log1p(-q) + 1.0)
        metric.update(torch.stack([1 - p, p]), label, (1.0, 1.0, 1.0), index)
    rows, fitted = per_subject(metric)
    reference = rows["volume_ref_ml"].sum()
    for name in ("platt", "isotonic"):
        assert abs(rows[f"volume_soft_{name}_ml"].sum() / reference - 1) < 0.03, name
        assert fitted[f"ece_{name}"].item() < 0.01
    assert abs(rows["volume_pred_soft_ml"].sum() / reference - 1) > 0.2
    assert fitted["platt_bias"].item() == pytest.approx(-1.0, abs=0.1)


def test_top_label_ece_by_hand():
    metric = SubjectSegmentationMetrics(num_classes=2)
    foreground = torch.tensor([0.9, 0.9, 0.2, 0.2, 0.6]).view(5, 1, 1)
    label = torch.tensor([1, 0, 0, 0, 1]).view(5, 1, 1)
    metric.update(probabilities_from(foreground), label, (1.0, 1.0, 1.0), 0)
    _, fitted = per_subject(metric)
    # confidences 0.9 (right), 0.9 (wrong), 0.8, 0.8 (both right), 0.6 (right): bins 0.9, 0.8, 0.6
    expected = (abs(1 - 1.8) + abs(2 - 1.6) + abs(1 - 0.6)) / 5
    assert fitted["ece_top_label"].item() == pytest.approx(expected)


def test_the_near_soft_volume_ignores_far_background():
    spacing = (1.0, 1.0, 2.0)
    foreground = torch.full((40, 40, 20), 0.01)  # a faint haze everywhere
    foreground[18:22, 18:22, 9:11] = 0.9  # the structure: 4 × 4 × 2 voxels
    label = (foreground > 0.5).long()
    metric = SubjectSegmentationMetrics(num_classes=2, soft_volume_margin_mm=4.0)
    metric.update(probabilities_from(foreground), label, spacing, 0)
    rows = metric.compute()
    # near: the box grown by 4 voxels in x, y and 2 voxels (4 mm) in z: 12 × 12 × 6 voxels
    near_voxels = 12 * 12 * 6
    expected_near = (32 * 0.9 + (near_voxels - 32) * 0.01) * 0.002
    assert rows["volume_pred_soft_near_ml"].item() == pytest.approx(expected_near, rel=1e-5)
    assert rows["volume_pred_soft_ml"].item() == pytest.approx((32 * 0.9 + (32000 - 32) * 0.01) * 0.002, rel=1e-5)
