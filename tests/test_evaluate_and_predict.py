"""evaluate.py reproduces training's validation; predict.py writes in the input's geometry."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from helpers import ROOT, TINY_FOLDER, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from biasseg.errors import InputError
from biasseg.generated_folders import folder_digest, write_nnunet
from biasseg.pipelines.evaluate import evaluate, summary_line
from biasseg.pipelines.predict import predict, predict_case
from biasseg.pipelines.train import train
from datamodules import DatasetError


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch on a tiny nnU-Net-layout dataset: (dataset root, run dir, cache dir)."""
    tmp = tmp_path_factory.mktemp("trained")
    root = write_nnunet(tmp / "data")
    cfg = compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp / 'cache'}"], tmp / "run")
    train(cfg)
    return root, tmp / "run", tmp / "cache"


def test_evaluate_writes_what_training_validation_wrote(trained_run, tmp_path):
    root, run, cache = trained_run
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("evaluate", overrides=[f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.accelerator=cpu",
                                             "trainer.enable_progress_bar=false"])
    cfg.paths.output_dir = str(tmp_path)
    summary = evaluate(cfg)
    # every measure as in training, but the volume to quote: training cross-fits it over the
    # validation subjects, evaluate.py applies the calibration stored with the checkpoint
    evaluated, validated = read_rows(tmp_path / "subjects.csv"), read_rows(run / "subjects.csv")
    assert [{k: v for k, v in row.items() if k.split("/")[0] not in QUOTE_COLUMNS} for row in evaluated] == \
        [{k: v for k, v in row.items() if k.split("/")[0] not in QUOTE_COLUMNS} for row in validated]
    # the stored Platt map was fitted on these very subjects: applied to them it gives training's in-sample Platt volumes
    assert [float(r["volume_quote_ml"]) for r in evaluated] == pytest.approx([float(r["volume_soft_platt_ml"]) for r in validated])
    stored = json.loads((run / "checkpoints" / "volume_calibration.json").read_text())
    assert stored["method"] == "platt" and stored["calibration_subjects"] == [r["subject"] for r in validated]
    for name, scale in zip(stored["class_names"], stored["interval_scale"]["platt"]):
        for row in evaluated:  # the interval: the quoted volume × (1 ± the stored scale)
            quote = float(row[f"volume_quote_ml/{name}"])
            expected = (0.0, math.inf) if scale is None else (max(quote * (1 - scale), 0.0), quote * (1 + scale))  # None: unbounded
            assert (float(row[f"volume_low_ml/{name}"]), float(row[f"volume_high_ml/{name}"])) == pytest.approx(expected)
    trained_metrics = json.loads((run / "metrics.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["volume_calibration"]["stored"] is True
    assert {k: v for k, v in metrics.items() if k.startswith("val/") and not quote_key(k)} == pytest.approx(
        {k: v for k, v in trained_metrics.items() if k.startswith("val/") and not quote_key(k)}, nan_ok=True)
    assert metrics["global_step"] == trained_metrics["global_step"]
    assert "val/lesion_f1" in metrics and (tmp_path / "lesions.csv").read_text() == (run / "lesions.csv").read_text()
    assert json.loads((tmp_path / "splits.json").read_text()) == json.loads((run / "splits.json").read_text())
    assert summary["val/dice"] == pytest.approx(trained_metrics["val/dice"])
    line = summary_line(summary)  # what evaluate.py prints instead of Lightning's table of every value
    assert line.startswith(f"Dice {trained_metrics['val/dice']:.3f} · argmax ΔV/ref ")
    assert f"pooled ECE {trained_metrics['val/ece']:.4f}" in line and "GED" not in line  # one network: no samples


@pytest.mark.parametrize("method, column", [("isotonic", "volume_soft_isotonic_ml"), ("temperature", "volume_soft_calibrated_ml")])
def test_evaluate_applies_the_chosen_stored_recalibration(trained_run, tmp_path, method, column):
    _, run, _ = trained_run
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("evaluate", overrides=[f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.accelerator=cpu",
                                             "trainer.enable_progress_bar=false", f"calibration={method}"])
    cfg.paths.output_dir = str(tmp_path)
    evaluate(cfg)
    # fitted on these subjects in training: applied to them, the stored map gives training's in-sample volumes
    assert [float(r["volume_quote_ml"]) for r in read_rows(tmp_path / "subjects.csv")] == pytest.approx(
        [float(r[column]) for r in read_rows(run / "subjects.csv")])
    assert json.loads((tmp_path / "metrics.json").read_text())["volume_calibration"]["method"] == method


def test_without_a_stored_calibration_evaluate_cross_fits_with_the_runs_own_settings(trained_run, tmp_path):
    """A checkpoint alone (no volume_calibration.json beside it): the quote is cross-fitted on
    the evaluated cases with the run's volume_quote settings, not the defaults; settings that
    are not valid are refused in one line naming the checkpoint."""
    _, run, _ = trained_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    def evaluate_with(settings: dict, name: str) -> dict:
        checkpoint["run_config"]["volume_quote"] = settings
        path = tmp_path / name / "last.ckpt"
        path.parent.mkdir()
        torch.save(checkpoint, path)
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            cfg = compose("evaluate", overrides=[f"ckpt_path={path}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
        cfg.paths.output_dir = str(tmp_path / name / "out")
        evaluate(cfg)
        return json.loads((tmp_path / name / "out" / "metrics.json").read_text())

    metrics = evaluate_with({"method": "isotonic", "alpha": 0.2, "folds": 2, "target": "reference"}, "isotonic")
    assert (metrics["volume_calibration"]["method"], metrics["volume_calibration"]["stored"]) == ("isotonic", False)
    assert "cross-fitted on the evaluated cases (isotonic)" in metrics["volume_calibration"]["note"]
    with pytest.raises(InputError, match=r"last\.ckpt: volume_quote\.method must be one of") as error:
        evaluate_with({"method": "magic"}, "broken")
    assert "\n" not in str(error.value)


QUOTE_COLUMNS = ("volume_quote_ml", "volume_low_ml", "volume_high_ml")


def quote_key(key: str) -> bool:
    return "quote" in key or key.startswith("val/interval_")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def reoriented_copy(root: Path, target: Path) -> Path:
    """case_000 with its axes permuted and flipped, at another spacing (same anatomy)."""
    target.mkdir()
    for c in range(2):
        image = nib.load(root / "imagesTr" / f"case_000_{c:04d}.nii.gz")
        data = np.flip(np.transpose(np.asarray(image.dataobj), (2, 0, 1)), 0)
        affine = image.affine[:, [2, 0, 1, 3]].copy()
        affine[:3, 0] *= -1
        affine[:3, 3] -= affine[:3, 0] * (data.shape[0] - 1)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), target / f"turned_{c:04d}.nii.gz")
    return target


def test_predictions_have_the_inputs_shape_and_affine(trained_run, tmp_path):
    root, run, _ = trained_run
    inputs = reoriented_copy(root, tmp_path / "in")
    before = folder_digest(inputs)
    cfg = OmegaConf.create({"ckpt_path": str(run / "checkpoints" / "last.ckpt"), "input": str(inputs), "output": str(tmp_path / "out"),
                            "save_probabilities": True, "device": "cpu", "overlap": None, "batch_size": None})
    volumes = predict(cfg)
    source = nib.load(inputs / "turned_0000.nii.gz")
    segmentation = nib.load(tmp_path / "out" / "turned.nii.gz")
    assert segmentation.shape == source.shape
    assert np.array_equal(segmentation.affine, source.affine)
    probabilities = nib.load(tmp_path / "out" / "turned_probabilities.nii.gz").get_fdata()
    assert probabilities.shape == (*source.shape, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)
    rows = list(csv.DictReader(volumes.open()))
    assert [(r["case"], r["class"]) for r in rows] == [("turned", "core"), ("turned", "rim")]
    voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000
    assert float(rows[1]["mask_volume_ml"]) == pytest.approx((segmentation.get_fdata() == 2).sum() * voxel_ml)
    assert float(rows[1]["soft_volume_ml"]) == pytest.approx(probabilities[..., 2].sum() * voxel_ml, rel=1e-5)
    # the volume to quote: the stored Platt map applied to the map on the input's grid (bins 1/16 log-odds wide)
    stored = json.loads((run / "checkpoints" / "volume_calibration.json").read_text())
    for c, row in enumerate(rows, start=1):
        p = np.clip(probabilities[..., c], 1e-12, 1 - 1e-12)
        z = np.log(p) - np.log1p(-p)
        recalibrated = 1 / (1 + np.exp(-(stored["platt_slope"][c - 1] * z + stored["platt_bias"][c - 1])))
        assert float(row["volume_ml"]) == pytest.approx(recalibrated.sum() * voxel_ml, rel=0.01)
        assert float(row["volume_low_ml"]) <= float(row["volume_ml"]) <= float(row["volume_high_ml"])
        assert float(row["volume_sd_ml"]) == pytest.approx(np.sqrt((p * (1 - p)).sum()) * voxel_ml, rel=0.01)
    assert folder_digest(inputs) == before


def test_geometry_round_trip_recovers_the_label(trained_run, tmp_path):
    """A predictor that reads the label off the (preprocessed) image must give back the
    input's own label on the input grid, whatever the input's orientation and spacing."""
    root, _, _ = trained_run
    inputs = reoriented_copy(root, tmp_path / "in")
    label = nib.load(root / "labelsTr" / "case_000.nii.gz")
    turned = np.flip(np.transpose(np.asarray(label.dataobj), (2, 0, 1)), 0)

    # channel 0 is 100 + 40 × label + noise (std 5): rounding (x − 100) / 40 reads the label back
    trained = SimpleNamespace(
        inference_settings={"target_spacing": [0.7, 0.9, 1.3], "crop_nonzero": True, "normalization": "none"},
        module=SimpleNamespace(regions=None),
        predictor=SimpleNamespace(predict_probabilities=lambda x: torch.nn.functional.one_hot(
            torch.clamp(torch.round((x[0] - 100) / 40), 0, 2).long(), 3).permute(3, 0, 1, 2).float()),
    )
    probabilities = predict_case(trained, tio.ScalarImage(inputs / "turned_0000.nii.gz"))
    prediction = probabilities.argmax(0)
    assert prediction.shape == turned.shape
    foreground = (prediction > 0), (turned > 0)
    dice = 2 * (foreground[0] & foreground[1]).sum() / (foreground[0].sum() + foreground[1].sum())
    assert dice > 0.9


def test_predict_refuses_bad_inputs_with_the_file_named(trained_run, tmp_path):
    root, run, _ = trained_run
    single = tmp_path / "in"
    single.mkdir()
    (single / "lonely_0000.nii.gz").write_bytes((root / "imagesTr" / "case_001_0000.nii.gz").read_bytes())
    base = {"ckpt_path": str(run / "checkpoints" / "last.ckpt"), "save_probabilities": False, "device": "cpu",
            "overlap": None, "batch_size": None}
    with pytest.raises(DatasetError, match="lonely_0000.nii.gz: 1 channel"):
        predict(OmegaConf.create({**base, "input": str(single), "output": str(tmp_path / "out")}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is the input folder"):
        predict(OmegaConf.create({**base, "input": str(single), "output": str(single)}))


def test_predict_cli(trained_run, tmp_path):
    root, run, _ = trained_run
    result = subprocess.run(
        [sys.executable, "predict.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={root / 'imagesTr'}",
         f"output={tmp_path / 'out'}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [f"case_{i:03d}.nii.gz" for i in range(5)]
    assert len(list(csv.DictReader((tmp_path / "out" / "volumes.csv").open()))) == 10


def test_channel_files_group_only_into_the_models_channels(tmp_path):
    from biasseg.pipelines.predict import find_cases

    for name in ["a_0000.nii.gz", "a_0001.nii.gz", "sub_0001.nii.gz", "sub_0002.nii.gz", "plain.nii"]:
        (tmp_path / name).write_bytes(b"")
    two = find_cases(tmp_path, in_channels=2)
    assert two["a"] == [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"]
    assert "sub_0001" in two and "sub_0002" in two and "plain" in two  # not channels 0..1: cases of their own
    one = find_cases(tmp_path, in_channels=1)
    assert {"a_0000", "a_0001", "sub_0001", "sub_0002", "plain"} == set(one)
