"""Several raters per image (synthetic data.raters): the label the network trains on, and the
validation measures against each rater, their majority vote and their range."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, TINY_FOLDER, compose_config
from hydra.errors import InstantiationException

from biasseg.errors import DatasetError, InputError
from biasseg.generated_folders import RATER_LAYOUTS, affine_for, folder_digest, write_multi_rater, write_nnunet
from biasseg.metrics import SubjectSegmentationMetrics, per_subject
from biasseg.metrics.posthoc import log_odds, log_odds_histogram
from biasseg.pipelines.train import train
from datamodules import FolderDataModule, SyntheticDataModule
from datamodules.cases import in_memory_case, majority_vote
from datamodules.patch_stream import PatchBatches

RATERS = np.array([  # three raters of a 4 x 1 x 1 volume, classes 0-2
    [[[1]], [[1]], [[0]], [[2]]],
    [[[1]], [[0]], [[0]], [[2]]],
    [[[0]], [[2]], [[1]], [[0]]],
])


def test_majority_vote_rater_mean_and_expected_volume():
    """Voxel 1 is a three-way tie (1, 0, 2): the lower class, background, wins; voxel 3 is 2."""
    assert majority_vote(RATERS, 3)[:, 0, 0].tolist() == [1, 0, 0, 2]
    case = in_memory_case("x", np.zeros((1, 4, 1, 1)), None, np.diag([2.0, 1.0, 1.0, 1.0]), 3, raters=RATERS)
    assert case.label[:, 0, 0].tolist() == [1, 0, 0, 2]
    np.testing.assert_allclose(case.probabilities[:, :, 0, 0], [[1 / 3, 1 / 3, 2 / 3, 1 / 3], [2 / 3, 1 / 3, 1 / 3, 0],
                                                                [0, 1 / 3, 0, 2 / 3]], rtol=1e-6)
    # voxels of 0.002 ml; rater volumes of class 1: 2, 1, 1 voxels; class 2: 1, 1, 1
    assert case.expected_volume_ml == pytest.approx([4 / 3 * 0.002, 0.002])


def test_measures_against_each_rater_by_hand():
    """One class, 4 voxels of 1 ml. Raters {0,1}, {0}, {0,1,2}; majority vote {0,1}. The
    prediction p = (0.9, 0.6, 0.4, 0.1) gives the mask {0,1} (2 ml) and soft volume 2.0 ml."""
    raters = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]).reshape(3, 4, 1, 1)
    foreground = torch.tensor([0.9, 0.6, 0.4, 0.1]).reshape(4, 1, 1)
    probabilities = torch.stack([1 - foreground, foreground])
    metric = SubjectSegmentationMetrics(2, num_raters=3)
    label = torch.tensor(majority_vote(raters.numpy(), 2))
    samples = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).reshape(2, 4, 1, 1)
    metric.update(probabilities, label, (10.0, 10.0, 10.0), 0, [2.0], samples=samples, raters=raters)
    rows, _ = per_subject(metric)
    # Dice with each rater: 2·2/(2+2) = 1, 2·1/(2+1) = 2/3, 2·2/(2+3) = 4/5
    assert [rows[f"dice_rater{k}"].item() for k in (1, 2, 3)] == pytest.approx([1.0, 2 / 3, 0.8])
    assert rows["dice_raters_mean"].item() == pytest.approx((1 + 2 / 3 + 0.8) / 3)
    assert rows["dice"].item() == pytest.approx(1.0)  # against the majority vote
    assert (rows["volume_raters_min_ml"].item(), rows["volume_raters_max_ml"].item()) == (1.0, 3.0)
    assert rows["within_rater_range"].item() == 1.0 and rows["soft_within_rater_range"].item() == 1.0
    # GED against the raters: d(S, Y) for S {0,1}: 0, 1/2, 1/3; for S {0,1,2}: 1/3, 2/3, 0
    # d(S, S'): 1/3 twice of 4 pairs; raters pairwise: {0,1}-{0}: 1/2, {0,1}-{0,1,2}: 1/3, {0}-{0,1,2}: 2/3
    cross = (0 + 1 / 2 + 1 / 3 + 1 / 3 + 2 / 3 + 0) / 6
    within_samples = 2 * (1 / 3) / 4
    within_raters = 2 * (1 / 2 + 1 / 3 + 2 / 3) / 9
    assert rows["ged"].item() == pytest.approx(2 * cross - within_samples - within_raters)
    with pytest.raises(ValueError, match="the label maps of 3 raters"):
        metric.update(probabilities, label, (10.0, 10.0, 10.0), 1, [2.0])
    # the raters' mean: 2 ml; each voxel's count split by the share of raters who marked it (1, 2/3, 1/3, 0)
    assert rows["volume_raters_mean_ml"].item() == pytest.approx(2.0)
    _, fitted = per_subject(metric)
    by_rater = sum(log_odds_histogram(log_odds(probabilities.reshape(2, -1)), (r.reshape(1, -1) == 1)) for r in raters) / 3
    assert torch.allclose(fitted["raters_log_odds"][0], by_rater)
    assert fitted["raters_log_odds"][0, 0, 1].sum().item() == pytest.approx(2.0)


@pytest.mark.slow
def test_the_volume_quote_is_calibrated_to_the_raters_mean(tmp_path):
    """Three raters who disagree on the boundary: their majority vote is smaller than their mean.
    By default (target auto) the quote and its interval aim at the raters' mean volume; with
    target=reference at the vote; the calibration file says which."""
    def run(name: str, *overrides: str) -> tuple[dict, list[dict], dict]:
        folder = tmp_path / name
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "data.raters=3", "data.uncertainty_kind=boundary",
                                 "data.num_val=8", "callbacks.validation_figures=null", "logger=none", *overrides,
                                 f"hydra.run.dir={folder}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(folder / "subjects.csv") as handle:
            rows = list(csv.DictReader(handle))
        return (json.loads((folder / "metrics.json").read_text()), rows,
                json.loads((folder / "checkpoints" / "volume_calibration.json").read_text()))

    metrics, rows, stored = run("auto")
    assert stored["target"] == "raters_mean"
    assert {"val/relative_quote_raters_mean_volume_bias", "val/interval_raters_mean_coverage"} <= set(metrics)
    mean = np.array([float(r["volume_raters_mean_ml"]) for r in rows])
    vote = np.array([float(r["volume_ref_ml"]) for r in rows])
    assert mean.sum() != pytest.approx(vote.sum(), rel=0.02)  # the task makes the two differ
    quote = np.array([float(r["volume_quote_ml"]) for r in rows])
    assert abs(quote.sum() / mean.sum() - 1) < abs(quote.sum() / vote.sum() - 1)
    metrics, rows, stored = run("reference", "volume_quote.target=reference")
    assert stored["target"] == "reference"
    quote = np.array([float(r["volume_quote_ml"]) for r in rows])
    assert abs(quote.sum() / vote.sum() - 1) < abs(quote.sum() / mean.sum() - 1)


def test_the_training_label_is_the_chosen_rater():
    datamodule = SyntheticDataModule(num_train=1, num_val=1, shape=(24, 24, 16), spacing_mm=(1, 1, 1.5), num_structures=1,
                                     radius_mm=(5, 6), uncertainty=1.0, raters=3, num_workers=0, patch_size=(24, 24, 16))
    datamodule.setup()
    case = datamodule.train_cases[0]
    raters = [torch.from_numpy(r) for r in case.raters]
    assert len({int(r.sum()) for r in raters}) == 3  # the three raters differ

    def labels(train_rater):
        stream = PatchBatches([case], (24, 24, 16), batch_size=1, samples_per_volume=30, foreground_probability=0.0,
                              augmentation=[], train_rater=train_rater)
        return [batch["label"]["data"][0, 0] for batch in stream]

    for k in (1, 2, 3):
        assert all(torch.equal(label, raters[k - 1]) for label in labels(k))
    assert all(torch.equal(label, torch.from_numpy(case.label)) for label in labels("majority"))
    drawn = [next(k for k, r in enumerate(raters) if torch.equal(label, r)) for label in labels("random")]
    assert set(drawn) == {0, 1, 2}


@pytest.mark.slow
def test_a_multi_rater_run_reports_every_rater_and_report_py_compares_them(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "data.raters=3", "data.uncertainty_kind=boundary",
                             "callbacks.validation_figures=null", "logger=none", f"hydra.run.dir={run}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "subjects.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        dice = [float(row[f"dice_rater{k}"]) for k in (1, 2, 3)]
        assert float(row["dice_raters_mean"]) == pytest.approx(sum(dice) / 3)
        low, high = float(row["volume_raters_min_ml"]), float(row["volume_raters_max_ml"])
        assert float(row["within_rater_range"]) == float(low <= float(row["volume_pred_ml"]) <= high)
        assert low <= float(row["volume_expected_ml"]) <= high  # the rater mean
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/within_rater_range"] == pytest.approx(np.mean([float(r["within_rater_range"]) for r in rows]))
    assert "val/dice_rater3" in metrics
    report = subprocess.run([sys.executable, str(ROOT / "report.py"), str(run), "--output", str(tmp_path / "report"),
                             "--no-theory"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### Several raters" in text and "soft within the raters' range" in text
    with open(tmp_path / "report" / "results.csv") as handle:
        summary = next(r for r in csv.DictReader(handle) if r["class"] == "all")
    assert float(summary["within_rater_range_mean"]) == pytest.approx(metrics["val/within_rater_range"])


def test_a_rater_the_data_does_not_have_is_refused(tmp_path):
    with pytest.raises(InputError, match="data.train_rater=4, but the subjects have 3 raters"):
        train(compose_config([*TINY, "data.raters=3", "data.train_rater=4"], tmp_path))
    with pytest.raises((InputError, InstantiationException), match="data.train_rater must be random, majority or a rater number"):
        train(compose_config([*TINY, "data.train_rater=first"], tmp_path))


@pytest.mark.parametrize("layout", RATER_LAYOUTS)
def test_each_multi_rater_folder_layout_trains_and_reports_every_rater(layout, tmp_path):
    root = write_multi_rater(tmp_path / "data", layout)
    cfg = compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    summary = train(cfg)
    with open(tmp_path / "run" / "subjects.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for name in ("core", "rim"):  # rater 1 over-segments, rater 2 under-segments: their volumes bound the mean
            low, high = float(row[f"volume_raters_min_ml/{name}"]), float(row[f"volume_raters_max_ml/{name}"])
            assert low < float(row[f"volume_expected_ml/{name}"]) < high
    assert {f"val/dice_rater{k}" for k in (1, 2, 3)} <= set(summary)
    datamodule = FolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, patch_size=(16, 16, 8))
    assert datamodule.num_raters == 3
    datamodule.setup()
    for case in datamodule.val_cases:
        raters = case.rater_maps()
        assert raters.shape[0] == 3 and raters.shape[1:] == case.arrays()[1].shape
        assert np.array_equal(case.arrays()[1], majority_vote(np.asarray(raters), 3))
        assert np.allclose(case.probability_maps().sum(0), 1.0)


def test_soft_targets_of_folder_data_are_the_rater_mean(tmp_path):
    root = write_multi_rater(tmp_path / "data", "nnunet_suffix")
    train(compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.label_mode=soft"],
                         tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.json").is_file()
    single = write_nnunet(tmp_path / "single")
    with pytest.raises(InputError, match="this dataset has one label per case"):
        FolderDataModule(root=str(single), cache_dir=str(tmp_path / "cache"), label_mode="soft")


def broken(tmp_path, layout, damage):
    """Load a damaged dataset: the error, after checking that nothing was written."""
    root = write_multi_rater(tmp_path / "data", layout, num_cases=3)
    damage(root)
    before = folder_digest(root)
    with pytest.raises(DatasetError) as error:
        FolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, patch_size=(16, 16, 8)).prepare_data()
    assert folder_digest(root) == before
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("*.meta.json"))
    return str(error.value)


def test_broken_multi_rater_folders_are_named(tmp_path):
    cases = {
        "missing": ("nnunet_suffix", lambda r: (r / "labelsTr" / "case_001_rater2.nii.gz").unlink(),
                    r"case_001: no label of rater 2 \(.*labelsTr/case_001_rater2.nii.gz is missing\)"),
        "missing_folder_file": ("nnunet_folders", lambda r: (r / "labelsTr_rater3" / "case_002.nii.gz").unlink(),
                                r"case_002: no label of rater 3 \(.*labelsTr_rater3/case_002.nii.gz is missing\)"),
        "mixed": ("nnunet_suffix", lambda r: (r / "labelsTr" / "case_000_rater1.nii.gz").rename(r / "labelsTr" / "case_000.nii.gz"),
                  "mixes label files with a rater suffix"),
        "gap": ("nnunet_suffix", lambda r: [(r / "labelsTr" / f"case_{i:03d}_rater3.nii.gz").rename(
                    r / "labelsTr" / f"case_{i:03d}_rater4.nii.gz") for i in range(3)],
                r"raters are numbered \[1, 2, 4\]; number them 1 … 3"),
        "both": ("nnunet_folders", lambda r: (r / "labelsTr").mkdir(), "holds both labelsTr/ and labelsTr_rater"),
        "shape": ("nnunet_suffix", lambda r: nib.save(nib.Nifti1Image(np.zeros((20, 18, 11), np.uint8), affine_for(1)),
                                                     r / "labelsTr" / "case_001_rater3.nii.gz"),
                  r"case_001_rater3.nii.gz: shape \(20, 18, 11\) differs from rater 1's label .*case_001_rater1.nii.gz"),
        "value": ("msd_list", lambda r: nib.save(nib.Nifti1Image(np.full((20, 18, 12), 7, np.uint8), affine_for(2)),
                                                r / "labelsTr" / "case_002_r2.nii.gz"),
                  r"case_002_r2.nii.gz: label value\(s\) \[7\] not declared"),
        "counts": ("msd_list", lambda r: r.joinpath("dataset.json").write_text(r.joinpath("dataset.json").read_text().replace(
                    '"./labelsTr/case_001_r1.nii.gz", ', "", 1)), "case 'case_001' has 2 label file\\(s\\), case 'case_000' 3"),
    }
    for name, (layout, damage, message) in cases.items():
        assert re.search(message, broken(tmp_path / name, layout, damage)), name
