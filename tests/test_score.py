"""score.py: any tool's predictions — nnU-Net's probability .npz files or label maps — scored
against a labels folder with training's own measures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT
from omegaconf import OmegaConf

from biasseg.errors import DatasetError
from biasseg.pipelines.score import score

SPACING = np.diag([0.8, 1.0, 1.5, 1.0])  # 1.2 mm³ = 0.0012 ml per voxel
VOXEL_ML = 0.0012


def make_case(index: int, shape=(20, 16, 12)):
    """A label (a box), and probabilities leaking over its edge: (label, probabilities (2, W, H, D))."""
    rng = np.random.default_rng(index)
    label = np.zeros(shape, np.uint8)
    label[5:12 + index, 4:10, 3:8] = 1
    foreground = np.clip(label * 0.9 + rng.uniform(0, 0.2, shape) * (1 - label), 0, 1).astype(np.float32)
    return label, np.stack([1 - foreground, foreground])


@pytest.fixture
def folders(tmp_path):
    labels, npz, masks = tmp_path / "labelsTs", tmp_path / "nnunet", tmp_path / "masks"
    for folder in (labels, npz, masks):
        folder.mkdir()
    truth = {}
    for index in range(3):
        label, probabilities = make_case(index)
        name = f"case_{index:03d}"
        nib.save(nib.Nifti1Image(label, SPACING), labels / f"{name}.nii.gz")
        # nnU-Net writes SimpleITK's axis order: classes, then z, y, x
        np.savez_compressed(npz / f"{name}.npz", probabilities=probabilities.transpose(0, 3, 2, 1))
        (npz / f"{name}.pkl").write_bytes(b"never opened")
        segmentation = probabilities.argmax(0).astype(np.uint8)
        nib.save(nib.Nifti1Image(segmentation, SPACING), masks / f"{name}.nii.gz")
        truth[name] = (label, probabilities, segmentation)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "box": 1}}))
    return labels, npz, masks, truth


def config(tmp_path, predictions, labels, lesions=None):
    return OmegaConf.create({"predictions": str(predictions), "labels": str(labels), "num_classes": None,
                             "soft_volume_margin_mm": 10.0, "paths": {"output_dir": str(tmp_path / "out")}, "lesions": lesions})


def rows(tmp_path):
    with open(tmp_path / "out" / "subjects.csv") as handle:
        return {r["subject"]: r for r in csv.DictReader(handle)}


def test_nnunet_probabilities_are_scored_on_the_labels_grid(folders, tmp_path):
    labels, npz, _, truth = folders
    summary = score(config(tmp_path, npz, labels))
    scored = rows(tmp_path)
    assert sorted(scored) == ["case_000", "case_001", "case_002"]
    for name, (label, probabilities, segmentation) in truth.items():
        reference, predicted = label == 1, segmentation == 1
        dice = 2 * (reference & predicted).sum() / (reference.sum() + predicted.sum())
        assert float(scored[name]["dice"]) == pytest.approx(dice)
        assert float(scored[name]["volume_ref_ml"]) == pytest.approx(reference.sum() * VOXEL_ML)
        assert float(scored[name]["volume_pred_soft_ml"]) == pytest.approx(probabilities[1].sum() * VOXEL_ML, rel=1e-5)
    assert summary["val/soft_volume_bias_ml"] > 0  # the leaking probabilities add volume
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_subjects"] == 3 and (tmp_path / "out" / "figures" / "volumes.png").is_file()


def test_lesions_are_scored_per_case(folders, tmp_path):
    labels, npz, _, truth = folders
    summary = score(config(tmp_path, npz, labels, lesions={"enabled": True, "dilation_voxels": 3}))
    with open(tmp_path / "out" / "lesions.csv") as handle:
        lesions = list(csv.DictReader(handle))
    scored = rows(tmp_path)
    for name in truth:
        own = [r for r in lesions if r["subject"] == name and r["kind"] == "reference"]
        assert own and sum(float(r["volume_ref_ml"]) for r in own) == pytest.approx(float(scored[name]["volume_ref_ml"]))
    assert 0 <= summary["val/lesion_f1"] <= 1 and "val/lesion_volume_bias_ml" in summary


def test_label_maps_are_scored_as_hard_predictions(folders, tmp_path):
    labels, _, masks, truth = folders
    score(config(tmp_path, masks, labels))
    for name, (label, _, segmentation) in truth.items():
        assert float(rows(tmp_path)[name]["volume_pred_soft_ml"]) == pytest.approx((segmentation == 1).sum() * VOXEL_ML)


def test_missing_and_mismatched_predictions_are_named(folders, tmp_path):
    labels, npz, masks, _ = folders
    (npz / "case_001.npz").unlink()
    (npz / "case_001.pkl").unlink()
    np.savez(npz / "case_002.npz", probabilities=np.zeros((2, 5, 5, 5), np.float32))
    with pytest.raises(DatasetError) as caught:
        score(config(tmp_path, npz, labels))
    message = str(caught.value)
    assert "no prediction for case case_001" in message and "case_002.npz: 'probabilities' have the shape (2, 5, 5, 5)" in message
    assert not (tmp_path / "out").exists()


def test_score_cli(folders, tmp_path):
    labels, npz, _, _ = folders
    result = subprocess.run([sys.executable, str(ROOT / "score.py"), f"predictions={npz}", f"labels={labels}",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scored 3 case(s)" in result.stdout
    with open(tmp_path / "run" / "subjects.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_biasseg_probability_maps_are_scored_as_soft_maps(folders, tmp_path):
    labels, _, masks, truth = folders
    soft = tmp_path / "biasseg"
    soft.mkdir()
    for name, (_, probabilities, _) in truth.items():  # predict.py's layout: one channel per class, last
        nib.save(nib.Nifti1Image(np.moveaxis(probabilities, 0, -1), SPACING), soft / f"{name}_probabilities.nii.gz")
        (soft / f"{name}.nii.gz").write_bytes((masks / f"{name}.nii.gz").read_bytes())  # beside its mask, preferred to it
    score(config(tmp_path, soft, labels))
    for name, (_, probabilities, _) in truth.items():
        assert float(rows(tmp_path)[name]["volume_pred_soft_ml"]) == pytest.approx(probabilities[1].sum() * VOXEL_ML, rel=1e-5)
    broken = probabilities.copy()
    broken[1, 0, 0, 0] = 0.7  # background 1 − 0.2… plus 0.7: no longer a probability vector
    nib.save(nib.Nifti1Image(np.moveaxis(broken, 0, -1), SPACING), soft / "case_002_probabilities.nii.gz")
    with pytest.raises(DatasetError, match="case_002_probabilities.nii.gz: the class probabilities do not sum to 1"):
        score(config(tmp_path / "again", soft, labels))


def test_predict_then_score_gives_predicts_soft_volumes_on_the_annotated_grid(thick_slice_run, tmp_path):
    from biasseg.pipelines.predict import predict

    root, run = thick_slice_run
    cfg = OmegaConf.create({"ckpt_path": str(run / "checkpoints" / "last.ckpt"), "input": str(root / "imagesTr"),
                            "output": str(tmp_path / "pred"), "save_probabilities": True, "device": "cpu", "overlap": None,
                            "batch_size": None, "overwrite": False, "alpha": None, "lesions": {"enabled": True}})
    predict(cfg)
    with open(tmp_path / "pred" / "lesions.csv") as handle:  # each predicted lesion, counted in volumes.csv
        found = list(csv.DictReader(handle))
    with open(tmp_path / "pred" / "volumes.csv") as handle:
        for row in csv.DictReader(handle):
            own = [r for r in found if r["subject"] == row["case"] and r["class"] == row["class"]]
            assert int(row["lesion_count"]) == len(own)
            assert sum(float(r["volume_pred_ml"]) for r in own) == pytest.approx(float(row["mask_volume_ml"]))
    score(config(tmp_path, tmp_path / "pred", root / "labelsTr"))
    with open(tmp_path / "pred" / "volumes.csv") as handle:
        predicted = {r["case"]: float(r["soft_volume_ml"]) for r in csv.DictReader(handle)}
    scored = rows(tmp_path)
    assert sorted(scored) == sorted(predicted)
    for name, volume in predicted.items():
        assert float(scored[name]["volume_pred_soft_ml"]) == pytest.approx(volume, rel=1e-4)
    # predict.py's intervals (the run's stored calibration) are scored against the label volumes
    with open(tmp_path / "pred" / "volumes.csv") as handle:
        quoted = {r["case"]: r for r in csv.DictReader(handle)}
    covered = [float(quoted[n]["volume_low_ml"]) <= float(scored[n]["volume_ref_ml"]) <= float(quoted[n]["volume_high_ml"])
               for n in quoted]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["val/interval_coverage"] == pytest.approx(sum(covered) / len(covered))
    assert "val/sd_coverage" not in metrics  # volumes.csv's intervals hold no model SD to compare with
    assert float(scored[next(iter(quoted))]["volume_quote_ml"]) == pytest.approx(float(next(iter(quoted.values()))["volume_ml"]))


def test_the_dataset_json_beside_the_labels_is_read_strictly(folders, tmp_path):
    labels, npz, _, _ = folders
    description = tmp_path / "dataset.json"
    description.write_text('{"labels": {"background": 0, "box": "one"}}')
    with pytest.raises(DatasetError, match=r"dataset.json: 'labels' values must be integers"):
        score(config(tmp_path, npz, labels))
    description.write_text(json.dumps({"labels": {"background": 0, "box": 1, "rim": 2}}))
    with pytest.raises(DatasetError, match=r"case_000.npz: 2 classes, 3 expected \(dataset.json declares them\)"):
        score(config(tmp_path, npz, labels))


def box(mask, corner, size):
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = 1


def test_known_missed_false_split_and_merged_lesions_are_counted_and_measured(tmp_path):
    """score.py on a crafted case: lesion A found (shifted a voxel), B missed, C split in two,
    D and E (apart beyond the dilation) joined by one predicted component, one false positive.
    BraTS 2023's rule: 5 reference lesions, 4 detected, 1 false positive, 5 predicted
    components; each of D and E gets the whole joining component, counted half for each."""
    labels, predictions = tmp_path / "labels", tmp_path / "predictions"
    labels.mkdir(), predictions.mkdir()
    reference, prediction = np.zeros((48, 40, 24), np.uint8), np.zeros((48, 40, 24), np.uint8)
    box(reference, (2, 2, 2), (4, 4, 4)), box(prediction, (2, 2, 3), (4, 4, 4))            # A: 64 voxels, 48 overlap
    box(reference, (2, 30, 2), (3, 3, 3))                                                   # B: missed
    box(reference, (15, 2, 10), (10, 3, 3))                                                 # C: 90 voxels
    box(prediction, (15, 2, 10), (4, 3, 3)), box(prediction, (21, 2, 10), (4, 3, 3))        # ... found as 2 × 36
    box(reference, (30, 20, 5), (3, 3, 3)), box(reference, (30, 32, 5), (3, 3, 3))          # D, E: 9 voxels apart
    box(prediction, (30, 20, 5), (3, 15, 3))                                                # one component over both
    box(prediction, (42, 2, 18), (3, 3, 3))                                                 # false positive
    affine = np.eye(4)  # 1 mm voxels: 0.001 ml
    nib.save(nib.Nifti1Image(reference, affine), labels / "case_000.nii.gz")
    nib.save(nib.Nifti1Image(prediction, affine), predictions / "case_000.nii.gz")
    result = subprocess.run([sys.executable, str(ROOT / "score.py"), f"predictions={predictions}", f"labels={labels}",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "lesions.csv") as handle:
        lesions = list(csv.DictReader(handle))
    assert len(lesions) == 6  # reference lesions in scan order (A, B, C, D, E), then the false positive
    a, b, c, d, e, fp = lesions
    assert [r["kind"] for r in (a, b, c, d, e, fp)] == ["reference"] * 5 + ["false_positive"]
    assert [int(r["detected"]) for r in (a, b, c, d, e)] == [1, 0, 1, 1, 1]
    assert [float(r["components"]) for r in (a, b, c, d, e, fp)] == [1, 0, 2, 0.5, 0.5, 1]
    expected_volumes = {"volume_ref_ml": [64, 27, 90, 27, 27, 0], "volume_pred_ml": [64, 0, 72, 135, 135, 27]}
    for column, voxels in expected_volumes.items():
        assert [float(r[column]) for r in (a, b, c, d, e, fp)] == pytest.approx([v / 1000 for v in voxels])
    assert [float(r["dice"]) for r in (a, b, c, d, e, fp)] == pytest.approx(
        [2 * 48 / 128, 0, 2 * 72 / 162, 2 * 27 / 162, 2 * 27 / 162, 0])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/lesion_sensitivity"] == pytest.approx(4 / 5)
    assert metrics["val/lesion_false_positives_per_scan"] == 1
    assert metrics["val/lesion_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert metrics["val/lesion_count_difference"] == 0  # 5 predicted components, 5 reference lesions
