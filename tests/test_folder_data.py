"""data=folder: both dataset layouts, the preprocessing cache, splits, and input checks."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT, TINY_FOLDER, compose_config
from helpers import folder_datamodule as datamodule

from biasseg.generated_folders import folder_digest, write_msd, write_nnunet
from biasseg.pipelines.train import train
from datamodules import DatasetError, FolderDataModule

WRITERS = {"msd": write_msd, "nnunet": write_nnunet}
@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_one_epoch_on_each_layout_reports_per_class_metrics(layout, tmp_path):
    root = WRITERS[layout](tmp_path / "data")
    out = tmp_path / "run"
    cfg = compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"], out)
    summary = train(cfg)
    assert {"val/dice/core", "val/dice/rim", "val/volume_bias_ml/core", "val/dice"} <= set(summary)
    subjects = (out / "subjects.csv").read_text()
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits) == 1 and len(splits[0]["val"]) == 1 and len(splits[0]["train"]) == 4
    assert splits[0]["val"][0] in subjects  # rows are named by case
    assert "core" in subjects and "rim" in subjects


def test_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path):
    root = write_nnunet(tmp_path / "data")
    first = datamodule(root, tmp_path / "cache")
    first.setup()
    entry = first.cache.directory / "case_001.image.npy"
    built = entry.stat().st_mtime_ns
    second = datamodule(root, tmp_path / "cache")
    second.setup()
    assert entry.stat().st_mtime_ns == built  # reused, not rewritten
    # change one input: a brighter image for case_001
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2, image.affine), path)
    third = datamodule(root, tmp_path / "cache")
    third.setup()
    assert entry.stat().st_mtime_ns != built
    case = next(c for c in [*third.train_cases, *third.val_cases] if c.name == "case_001")
    old = next(c for c in [*first.train_cases, *first.val_cases] if c.name == "case_001")
    assert case.channel_mean[0] == pytest.approx(2 * old.channel_mean[0], rel=1e-4)
    assert not list(third.cache.directory.glob(".*tmp"))


def test_changed_settings_get_their_own_cache_entry(tmp_path):
    root = write_msd(tmp_path / "data")
    a = datamodule(root, tmp_path / "cache")
    b = datamodule(root, tmp_path / "cache", target_spacing=[2.0, 2.0, 2.0])
    a.setup(), b.setup()
    assert a.cache.directory != b.cache.directory
    assert a.cache.settings["target_spacing_mm"] == [1.0, 1.2, 2.0]  # the median spacing
    image, _ = b.train_cases[0].arrays()
    assert b.train_cases[0].spacing == pytest.approx((2.0, 2.0, 2.0))
    assert image.shape[1] == 9 and image.shape[2] in (10, 11) and image.shape[3] == 12  # 18 × 1, 18 × 1.1–1.2, 12 × 2 mm


def test_folds_partition_the_cases_and_splits_can_be_reused(tmp_path):
    root = write_msd(tmp_path / "data", num_cases=6)
    vals = []
    for fold in range(3):
        dm = datamodule(root, tmp_path / "cache", fold=fold, num_folds=3, splits_file=str(tmp_path / f"s{fold}.json"))
        dm.setup()
        vals += dm.val_subject_names
        assert not set(dm.val_subject_names) & {c.name for c in dm.train_cases}
    assert sorted(vals) == [f"case_{i:03d}" for i in range(6)]
    reused = datamodule(root, tmp_path / "cache", fold=1, num_folds=3, splits_from=str(tmp_path / "s0.json"))
    reused.setup()
    assert reused.val_subject_names == json.loads((tmp_path / "s0.json").read_text())[1]["val"]


def break_shape(root):
    label = root / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 11), np.uint8), nib.load(label).affine), label)
    return label, "shape"


def break_nan(root):
    path = root / "imagesTr" / "case_002_0001.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return path, "NaN"


def break_missing(root):
    path = root / "imagesTr" / "case_003_0001.nii.gz"
    path.unlink()
    return path, "missing"


def break_label_value(root):
    path = root / "labelsTr" / "case_000.nii.gz"
    label = nib.load(path)
    data = np.asarray(label.dataobj).copy()
    data[3, 3, 3] = 7
    nib.save(nib.Nifti1Image(data, label.affine), path)
    return path, "[7] not declared"


def break_truncated(root):
    path = root / "imagesTr" / "case_004_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    return path, "cannot be read"


def break_affine(root):
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)
    return path, "affine differs"


BREAKERS = [break_shape, break_nan, break_missing, break_label_value, break_truncated, break_affine]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_broken_input_is_named_and_nothing_is_written(breaker, tmp_path):
    root = write_nnunet(tmp_path / "data")
    path, problem = breaker(root)
    before = folder_digest(root)
    dm = datamodule(root, tmp_path / "cache")
    with pytest.raises(DatasetError) as caught:
        dm.setup()
    message = str(caught.value)
    assert str(path) in message and problem in message
    assert folder_digest(root) == before
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_all_problems_are_reported_at_once_by_the_cli_without_traceback(tmp_path):
    root = write_nnunet(tmp_path / "data")
    broken = [breaker(root) for breaker in (break_nan, break_missing, break_label_value)]
    before = folder_digest(root)
    result = subprocess.run(
        [sys.executable, "train.py", "data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
         f"paths.log_dir={tmp_path / 'logs'}", "trainer.accelerator=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "3 problems" in result.stderr
    for path, problem in broken:
        assert str(path) in result.stderr
    assert folder_digest(root) == before


def test_an_unusable_dataset_json_is_a_clean_error(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json: cannot be read as JSON"):
        datamodule(tmp_path, tmp_path / "cache")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {}}))
    with pytest.raises(DatasetError, match="neither a Decathlon"):
        datamodule(tmp_path, tmp_path / "cache")
    with pytest.raises(DatasetError, match="data.root is not set"):
        FolderDataModule(root=None)


def test_truncated_gzip_really_is_unreadable(tmp_path):
    """Guard for break_truncated: the file must be a damaged gzip, not a valid tiny one."""
    root = write_nnunet(tmp_path / "data", num_cases=1)
    path, _ = break_truncated(root) if False else (root / "imagesTr" / "case_000_0000.nii.gz", None)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(Exception):
        gzip.decompress(path.read_bytes())


def test_ct_normalisation_uses_training_foreground_statistics(tmp_path):
    root = write_msd(tmp_path / "data")
    dm = datamodule(root, tmp_path / "cache", normalization="ct")
    dm.setup()
    pooled = np.concatenate([c.foreground_samples for c in dm.train_cases], axis=1)
    lower, upper = np.percentile(pooled, [0.5, 99.5], axis=1)
    np.testing.assert_allclose(dm.intensity.lower, lower)
    np.testing.assert_allclose(dm.intensity.upper, upper)
    subject = dm.val_cases[0].to_subject(dm.num_classes)
    image = subject["image"].data.numpy()
    top = (upper - dm.intensity.shift) / dm.intensity.scale
    assert (image.reshape(2, -1).max(1) <= top + 1e-5).all()  # clipped, then scaled
    assert dm.inference_settings()["intensity"]["lower"] == pytest.approx(list(lower))


def test_soft_labels_of_one_label_per_case_are_refused_before_any_preprocessing(tmp_path):
    root = write_nnunet(tmp_path / "data")
    with pytest.raises(ValueError, match="label_mode=soft.*data=folder has them only where several raters"):
        FolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), label_mode="soft")
    assert not (tmp_path / "cache").exists()
