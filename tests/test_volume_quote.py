"""The volume a user quotes: recalibration fitted on other subjects, conformal intervals, the
verdict, and the stored calibration (bound to its model, read as untrusted input)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from crepes import ConformalRegressor

from biasseg.errors import InputError
from biasseg.metrics.posthoc import log_odds, log_odds_histogram
from biasseg.metrics.volume_quote import (
    PINNED_WITHIN,
    CalibrationMaps,
    VolumeCalibration,
    cross_fit,
    interval,
    interval_scale,
    map_histograms,
    poisson_binomial_sd,
    recalibration_uncertainty,
    soft_volumes,
    uncalibrated_probability,
    verdict,
)
from lightning_modules.calibration_file import (
    FILE_NAME,
    calibration_record,
    read_calibration,
    resolve_calibration,
    weights_digest,
)
from lightning_modules.unet import UNet3D

VOXEL_ML = 0.001


def miscalibrated_subjects(count: int, offset: float, seed: int = 0, voxels: int = 20000):
    """Subjects whose true foreground probability is ``σ(z + offset)`` while the model says
    ``σ(z)``: histograms ``(S, 1, 2, B)`` of labels drawn from the truth, expected volumes."""
    rng = np.random.default_rng(seed)
    histograms, expected = [], []
    for _ in range(count):
        radius = rng.uniform(8, 14)
        distance = rng.uniform(0, 30, voxels)
        z = torch.tensor(0.6 * (radius - distance), dtype=torch.float32)  # the model's log-odds
        truth = torch.sigmoid(z.double() + offset)
        label = torch.from_numpy(rng.random(voxels) < truth.numpy())
        probabilities = torch.stack([1 - torch.sigmoid(z), torch.sigmoid(z)])
        histograms.append(log_odds_histogram(log_odds(probabilities), label[None]))
        expected.append(float(truth.sum()) * VOXEL_ML)
    return torch.stack(histograms), torch.tensor(expected, dtype=torch.float64)


def reference_volumes(histograms: torch.Tensor) -> torch.Tensor:
    return histograms[:, :, 1].sum(-1) * VOXEL_ML


def test_the_split_conformal_scale_equals_crepes_normalised_conformal_regressor():
    """A short implementation, cross-checked against a maintained package: crepes' conformal
    regressor with the volume as the normalising sigma gives the same interval."""
    rng = np.random.default_rng(3)
    # (n with an integer (n + 1)(1 − α), 9 or 19, are left out: there crepes' floating point,
    # int((1 − 0.9)(n + 1)) one below the exact value, takes the next larger score)
    for n in (10, 15, 33, 50, 98):
        predicted = rng.uniform(5, 50, n)
        reference = predicted * (1 + rng.normal(0, 0.1, n))
        scores = torch.tensor(np.abs(reference - predicted) / predicted)[:, None]
        scale, kind = interval_scale(scores, alpha=0.1)
        assert kind == "split conformal"
        crepes = ConformalRegressor().fit(residuals=reference - predicted, sigmas=predicted)
        new = np.array([12.0, 30.0])
        expected = crepes.predict_int(y_hat=new, sigmas=new, confidence=0.9)
        low, high = interval(torch.tensor(new)[:, None], scale)
        np.testing.assert_allclose(np.c_[low[:, 0], high[:, 0]], expected, rtol=1e-12)


def test_too_few_calibration_subjects_for_a_conformal_quantile_fall_back_to_student_t():
    scores = torch.tensor([[0.1], [0.2], [0.05], [0.15]], dtype=torch.float64)  # 4 < 9 = (1 − α)/α
    scale, kind = interval_scale(scores, alpha=0.1)
    rms = math.sqrt((0.1**2 + 0.2**2 + 0.05**2 + 0.15**2) / 4)
    assert kind == "student t"
    assert float(scale) == pytest.approx(2.3533634 * rms * math.sqrt(1 + 1 / 4), rel=1e-6)  # t(3) at 0.95
    assert math.isinf(float(interval_scale(scores[:1], alpha=0.1)[0]))
    low, high = interval(torch.tensor([[0.0], [2.0]]), torch.tensor([math.inf]))
    assert low.tolist() == [[0.0], [0.0]] and high.tolist() == [[math.inf], [math.inf]]


def test_cross_fitted_platt_removes_a_log_odds_offset_held_out_and_the_interval_covers_new_subjects():
    """A model off by +0.8 in log-odds (it under-estimates the volume): Platt scaling fitted on
    other subjects brings the held-out soft volume to the expected one, and the 90 % interval
    fitted on 40 calibration subjects covers at least ~90 % of 300 new ones."""
    histograms, expected = miscalibrated_subjects(40, offset=0.8)
    calibration, rows = cross_fit(histograms, torch.full((40,), VOXEL_ML), reference_volumes(histograms), alpha=0.1)
    raw = soft_volumes(histograms, torch.full((40,), VOXEL_ML), CalibrationMaps.fit(histograms).bin_probability("none"))[:, 0]
    assert float((raw / expected - 1).mean()) < -0.05  # the raw soft volume is biased
    assert float((rows["volume_quote_ml"][:, 0] / expected - 1).mean()) == pytest.approx(0.0, abs=0.02)  # held out
    assert float(calibration.maps.platt_bias[0]) == pytest.approx(0.8, abs=0.1)
    assert calibration.interval_kind == "split conformal"
    new, new_expected = miscalibrated_subjects(300, offset=0.8, seed=1)
    volume, low, high = calibration.quote(new, torch.full((300,), VOXEL_ML))
    covered = ((reference_volumes(new) >= low) & (reference_volumes(new) <= high)).double().mean()
    assert float(covered) >= 0.85
    assert float(((new_expected[:, None] >= low) & (new_expected[:, None] <= high)).double().mean()) >= 0.85
    # each validation subject's own interval came from the other folds only, and covers as often
    inside = (rows["volume_low_ml"] <= reference_volumes(histograms)) & (reference_volumes(histograms) <= rows["volume_high_ml"])
    assert float(inside.double().mean()) >= 0.8


def test_the_poisson_binomial_sd_is_the_maps_own_spread():
    p = torch.tensor([0.1, 0.5, 0.9, 0.99])
    histograms = map_histograms(torch.stack([1 - p, p]))
    assert float(poisson_binomial_sd(histograms, torch.tensor([1.0]))) == pytest.approx(
        float((p * (1 - p)).sum().sqrt()), rel=0.02)


def test_region_maps_are_read_each_against_its_complement():
    p = torch.rand(2, 6, 5, 4)
    volumes = soft_volumes(map_histograms(p, regions=True), torch.tensor([1.0]),
                           CalibrationMaps.fit(map_histograms(p, regions=True)).bin_probability("none"))
    assert volumes[0].tolist() == pytest.approx(p.sum((1, 2, 3)).tolist(), rel=0.01)


def test_the_verdict_says_what_to_do():
    line, calibrated, settled = verdict([1.01], [1.0], [0.02], [0.10, 0.105, 0.11], "platt")
    assert calibrated and settled and "can be quoted as it is" in line
    line, calibrated, settled = verdict([1.02], [1.1], [0.12], [0.10, 0.10, 0.10], "platt")
    assert not calibrated and settled and "NOT CALIBRATED" in line and "|b| 0.120 > 0.05" in line and "stored platt map" in line
    line, calibrated, settled = verdict([1.0], [1.0], [0.0], [0.30, 0.20, 0.22], "platt")
    assert settled is False and "NOT SETTLED: train longer" in line
    assert verdict([1.0], [1.0], [0.0], [0.1], "platt")[2] is None


def test_the_verdict_distrusts_a_recalibration_its_references_cannot_fix():
    """Noisy references (one boundary draw per subject) pin the recalibrated total only
    loosely; label noise per voxel pins it tightly. The verdict tells the two apart."""
    generator = torch.Generator().manual_seed(0)
    soft = torch.full((24, 1), 10.0, dtype=torch.float64)
    tight = soft * (1 + 0.08 * torch.randn(24, 1, generator=generator))
    loose = soft * (1 + 0.65 * torch.randn(24, 1, generator=generator)).clamp_min(0)
    assert float(recalibration_uncertainty(tight, soft)) == pytest.approx(float(tight.std()) * 24 ** 0.5 / 240, rel=1e-9)
    assert float(recalibration_uncertainty(tight, soft)) < PINNED_WITHIN < float(recalibration_uncertainty(loose, soft))
    assert torch.isnan(recalibration_uncertainty(tight[:1], soft[:1])).all()
    noisy = VolumeCalibration(CalibrationMaps.fit(miscalibrated_subjects(24, offset=0.5, seed=0)[0]), {}, 0.1, "split conformal",
                              24, "platt", recalibration_uncertainty(loose, soft))
    line, calibrated, _ = verdict([1.02], [1.1], [0.3], [0.1] * 3, "platt", noisy)
    assert not calibrated and "fix a recalibrated volume only to ±" in line and "quote calibration=none" in line
    noisy.uncertainty = recalibration_uncertainty(tight, soft)
    assert "quote the recalibrated volume" in verdict([1.02], [1.1], [0.3], [0.1] * 3, "platt", noisy)[0]


def test_cross_fitting_stores_how_closely_the_references_fix_the_recalibration():
    histograms, _ = miscalibrated_subjects(30, offset=0.8, seed=3)
    voxel_ml = torch.full((30,), VOXEL_ML)
    calibration, _ = cross_fit(histograms, voxel_ml, reference_volumes(histograms), 0.1)
    soft = soft_volumes(histograms, voxel_ml, uncalibrated_probability(1))
    assert calibration.uncertainty.tolist() == pytest.approx(
        recalibration_uncertainty(reference_volumes(histograms), soft).tolist(), rel=1e-12)


# --- the stored calibration -----------------------------------------------------------------

@pytest.fixture
def stored(tmp_path):
    """A calibration written for a small network: (path, network)."""
    torch.manual_seed(0)
    network = UNet3D(1, 2, (4, 8))
    histograms, _ = miscalibrated_subjects(12, offset=0.3)
    calibration, _ = cross_fit(histograms, torch.full((12,), VOXEL_ML), reference_volumes(histograms), alpha=0.1)
    path = tmp_path / "checkpoints" / FILE_NAME
    path.parent.mkdir()
    path.write_text(json.dumps(calibration_record(calibration, network, ["structure"], [f"s{i}" for i in range(12)], "ok")))
    return path, network, calibration


def test_a_stored_calibration_reads_back_as_written(stored):
    path, network, calibration = stored
    read, record = read_calibration(path, network, ["structure"])
    for method in ("none", "temperature", "platt", "isotonic"):
        assert torch.equal(read.maps.bin_probability(method), calibration.maps.bin_probability(method))
        assert torch.equal(read.scale[method], calibration.scale[method])
    assert record["model_sha256"] == weights_digest(network) and read.subjects == 12
    assert torch.equal(read.uncertainty, calibration.uncertainty)
    del record["recalibration_uncertainty"]  # a calibration written before it was stored
    path.write_text(json.dumps(record))
    assert read_calibration(path, network, ["structure"])[0].uncertainty is None


def test_a_calibration_fitted_for_other_weights_is_refused(stored):
    path, network, _ = stored
    with torch.no_grad():
        next(network.parameters())[0].flatten()[0] += 1e-3
    with pytest.raises(InputError, match=f"{path}: fitted for another model"):
        read_calibration(path, network, ["structure"])
    with pytest.raises(InputError, match="fitted for another model"):  # asked for explicitly: an error
        resolve_calibration("platt", None, [path.parent / "last.ckpt"], network, ["structure"])
    calibration, method, note = resolve_calibration("auto", None, [path.parent / "best.ckpt"], network, ["structure"])
    assert calibration is None and method == "none" and "another checkpoint of this run: not applied" in note


@pytest.mark.parametrize("tamper, problem", [
    (lambda r: r.update(platt_bias=[float("nan")]), "platt_bias must be 1 finite number"),
    (lambda r: r.update(temperature=[1.0, 2.0]), "temperature must be 1 finite number"),
    (lambda r: r.update(temperature=[-1.0]), "temperature must be > 0"),
    (lambda r: r["isotonic"][0].reverse(), "non-decreasing probabilities"),
    (lambda r: r.update(alpha=1.5), "alpha must be a number in"),
    (lambda r: r.update(method="magic"), "method 'magic' is not one of"),
    (lambda r: r.update(format="pickle"), "not a biasseg volume calibration"),
    (lambda r: r["interval_scale"].update(platt=[-0.1]), "interval scales must be >= 0"),
    (lambda r: r.update(class_names=["other"]), "classes \\['other'\\]"),
    (lambda r: r.update(recalibration_uncertainty=[-0.1]), "recalibration_uncertainty must be >= 0"),
    (lambda r: r.update(recalibration_uncertainty="0.1"), "recalibration_uncertainty must be 1 finite number"),
])
def test_a_broken_calibration_file_is_one_line_naming_it(stored, tamper, problem):
    path, network, _ = stored
    record = json.loads(path.read_text())
    tamper(record)
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=problem) as error:
        read_calibration(path, network, ["structure"])
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_file_that_is_not_json_is_refused(stored):
    path, network, _ = stored
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(InputError, match="not a readable calibration file"):
        read_calibration(path, network, ["structure"])


def test_an_ensemble_has_no_stored_calibration(stored):
    path, network, _ = stored
    assert resolve_calibration("auto", None, [path, path], network, ["structure"])[0] is None
    with pytest.raises(InputError, match="a calibration belongs to one model"):
        resolve_calibration("isotonic", None, [path, path], network, ["structure"])
    with pytest.raises(InputError, match="calibration must be one of"):
        resolve_calibration("best", None, [path], network, ["structure"])


def test_calibration_none_keeps_the_interval_fitted_for_the_uncalibrated_volume(stored, tmp_path):
    path, network, calibration = stored
    read, method, _ = resolve_calibration("none", None, [path.parent / "last.ckpt"], network, ["structure"])
    assert method == "none" and torch.equal(read.scale["none"], calibration.scale["none"])
    assert resolve_calibration("none", None, [tmp_path / "elsewhere" / "last.ckpt"], network, ["structure"])[0] is None
    with pytest.raises(InputError, match="no such calibration file"):  # asked for by name: it must exist
        resolve_calibration("auto", str(tmp_path / "missing.json"), [path], network, ["structure"])
