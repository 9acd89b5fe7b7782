"""The histogram-based calibration fits (they add up exactly across DDP ranks, so they stay
hand-written) against scikit-learn and torchmetrics on the same data: Platt scaling against
an unregularised LogisticRegression, isotonic regression against IsotonicRegression, both with
the histogram's counts as sample weights; the ECE against torchmetrics' binary calibration error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from torchmetrics.functional.classification import binary_calibration_error

from biasseg.metrics.calibration import expected_calibration_error, reliability_bins
from biasseg.metrics.posthoc import bin_centres, fit_isotonic, fit_platt, log_odds_histogram


def miscalibrated_voxels(seed: int, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-odds ``(1, n)`` of an over-confident, shifted map and a reference drawn from the truth."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randn(1, n, generator=generator, dtype=torch.float64) * 2 - 1
    reference = torch.rand(1, n, generator=generator, dtype=torch.float64) < torch.sigmoid(truth)
    return 1.7 * truth + 0.4, reference


def weighted_bins(histogram: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The histogram ``(2, B)`` as sklearn's weighted samples: bin centre, label, count."""
    centres = bin_centres().numpy()
    occupied = [(b, y) for y in (0, 1) for b in np.nonzero(histogram[y].numpy())[0]]
    x = np.array([centres[b] for b, _ in occupied]).reshape(-1, 1)
    return x, np.array([y for _, y in occupied]), np.array([float(histogram[y, b]) for b, y in occupied])


@pytest.mark.parametrize("seed", [0, 1])
def test_platt_equals_an_unregularised_weighted_logistic_regression(seed):
    z, reference = miscalibrated_voxels(seed)
    histogram = log_odds_histogram(z, reference)  # (1, 2, B)
    slope, bias = fit_platt(histogram[None])
    x, y, weight = weighted_bins(histogram[0])
    fitted = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(x, y, sample_weight=weight)
    assert float(slope[0]) == pytest.approx(float(fitted.coef_[0, 0]), rel=1e-4)
    assert float(bias[0]) == pytest.approx(float(fitted.intercept_[0]), abs=1e-4)
    assert float(slope[0]) == pytest.approx(1 / 1.7, rel=0.05)  # and it undoes the over-confidence


@pytest.mark.parametrize("seed", [0, 1])
def test_isotonic_equals_a_weighted_isotonic_regression(seed):
    z, reference = miscalibrated_voxels(seed)
    histogram = log_odds_histogram(z, reference)
    ours = fit_isotonic(histogram[None])[0].numpy()
    counts = histogram[0].sum(0).numpy()
    occupied = np.nonzero(counts)[0]
    frequency = histogram[0, 1].numpy()[occupied] / counts[occupied]
    theirs = IsotonicRegression().fit(bin_centres().numpy()[occupied], frequency, sample_weight=counts[occupied])
    assert np.allclose(ours[occupied], theirs.predict(bin_centres().numpy()[occupied]), atol=1e-9)


@pytest.mark.parametrize("bins", [10, 20])
def test_ece_equals_torchmetrics_binary_calibration_error(bins):
    z, reference = miscalibrated_voxels(3)
    probability = torch.sigmoid(z)
    ours = expected_calibration_error(reliability_bins(probability, reference, bins=bins))
    theirs = binary_calibration_error(probability[0].float(), reference[0].long(), n_bins=bins, norm="l1")
    assert float(ours[0]) == pytest.approx(float(theirs), abs=1e-5)
