"""Files from elsewhere are hostile until checked: checkpoints, NIfTI headers, dataset.json,
splits, prediction folders. Each test reproduces a way in that once worked (a pickle that
ran, a target that emptied a file, a flipped qform, an overwritten label, …) and shows the
one-line refusal, the unchanged files and, where the input is fine, the correct run."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, compose_config
from omegaconf import OmegaConf
from untrusted_files import (
    lying_header,
    modified_checkpoint,
    nifti,
    one_line_error,
    payload_checkpoint,
    run_entry_point,
)

from biasseg.errors import DatasetError, InputError
from biasseg.generated_folders import folder_digest, write_msd, write_nnunet
from biasseg.pipelines.predict import predict
from biasseg.pipelines.train import train
from datamodules import FolderDataModule
from datamodules.image_files import UnreadableImage, read_image

QUIET = ["callbacks.validation_figures=null"]


def folder_module(root: Path, cache: Path, **kwargs) -> FolderDataModule:
    return FolderDataModule(root=str(root), cache_dir=str(cache), num_workers=0, patch_size=(16, 16, 8), **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny synthetic run: its directory (checkpoints/last.ckpt, metrics.json, …)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_config([*TINY, *QUIET], run))
    return run


def predict_config(ckpt: Path, source: Path, output: Path, **extra) -> OmegaConf:
    return OmegaConf.create({"ckpt_path": str(ckpt), "input": str(source), "output": str(output), "save_probabilities": False,
                             "device": "cpu", "overlap": None, "batch_size": None, "overwrite": False, **extra})


# --- 1. checkpoints cannot run code ----------------------------------------------------------

@pytest.mark.slow
def test_a_pickle_payload_is_refused_by_every_entry_point_and_never_runs(trained, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = payload_checkpoint(trained / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    with pytest.raises(Exception):  # guard: the payload really is a payload
        torch.load(evil, weights_only=True)
    images = tmp_path / "images"
    images.mkdir()
    nifti(images / "a.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 16)).astype(np.float32))

    line = one_line_error(run_entry_point("train.py", *TINY, f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'r1'}", cwd=tmp_path))
    assert "evil.ckpt" in line and "refused" in line and "convert_trusted_checkpoint" in line
    line = one_line_error(run_entry_point("evaluate.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path))
    assert "evil.ckpt" in line and "refused" in line
    line = one_line_error(run_entry_point("predict.py", f"ckpt_path={evil}", f"input={images}", f"output={tmp_path / 'out'}",
                                          f"hydra.run.dir={tmp_path / 'r3'}", cwd=tmp_path))
    assert "evil.ckpt" in line and "refused" in line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoints/last.ckpt", "hpc_ckpt_3.ckpt"])
def test_a_payload_in_the_run_directory_is_refused_by_auto_resume(trained, tmp_path, name):
    marker = tmp_path / "payload_ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    payload_checkpoint(trained / "checkpoints" / "last.ckpt", run / name, marker)
    line = one_line_error(run_entry_point("train.py", *TINY, f"hydra.run.dir={run}", cwd=tmp_path))
    assert name.split("/")[-1] in line and "refused" in line
    assert not marker.exists()


@pytest.mark.slow
def test_a_foreign_target_in_the_stored_config_is_refused(trained, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")

    def open_victim(checkpoint):
        checkpoint["run_config"]["loss"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}

    def load_anything(checkpoint):
        checkpoint["run_config"]["data"] = {"_target_": "torch.load", "f": str(victim), "weights_only": False}

    def nested(checkpoint):
        checkpoint["run_config"]["loss"] = {"_target_": "losses.CompoundLoss", "terms": {"x": {"_target_": "os.remove", "path": str(victim)}}}

    def torchio_that_unpickles(checkpoint):  # a TorchIO class, but one that torch.loads a file of its choosing
        checkpoint["run_config"]["loss"] = {"_target_": "losses.CompoundLoss", "terms": {
            "x": {"_target_": "torchio.HistogramStandardization", "landmarks": str(victim)}}}

    def data_reader(checkpoint):
        checkpoint["run_config"]["data"]["augmentation"] = {"x": {"_target_": "torchio.HistogramStandardization",
                                                                  "landmarks": str(victim)}}

    for change in (open_victim, load_anything, nested, torchio_that_unpickles, data_reader):
        crafted = modified_checkpoint(trained / "checkpoints" / "last.ckpt", tmp_path / f"{change.__name__}.ckpt", change)
        line = one_line_error(run_entry_point("evaluate.py", f"ckpt_path={crafted}", f"hydra.run.dir={tmp_path / change.__name__}",
                                              cwd=tmp_path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}))
        assert crafted.name in line and "its stored config names" in line and "are built from it" in line
        assert victim.read_text() == "precious"


def test_a_compressed_checkpoint_is_refused_before_it_expands(trained, tmp_path):
    import zipfile

    source = trained / "checkpoints" / "last.ckpt"
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for info in original.infolist():
            packed.writestr(info.filename, original.read(info.filename))
    from lightning_modules.checkpoints import read_checkpoint

    with pytest.raises(InputError, match="compressed entries"):
        read_checkpoint(bomb)


def test_hyper_parameters_cannot_size_allocations(trained, tmp_path):
    from lightning_modules.checkpoints import load_trained, read_checkpoint

    def absurd_features(checkpoint):
        checkpoint["hyper_parameters"]["features"] = [4, 300000]

    def huge_features(checkpoint):  # within range, 1.7 GB of weights the file does not hold: checked on the meta device
        checkpoint["hyper_parameters"]["features"] = [4, 4000]

    def huge_window(checkpoint):
        checkpoint["hyper_parameters"]["sliding_window"]["patch_size"] = [4000, 4000, 4000]

    def not_a_window(checkpoint):
        checkpoint["hyper_parameters"]["sliding_window"] = "big"

    def unknown_accumulation(checkpoint):
        checkpoint["hyper_parameters"]["sliding_window"]["accumulate"] = "disk"

    def unknown_loss_argument(checkpoint):
        checkpoint["run_config"]["loss"]["from_the_future"] = 1

    for change, message in ((absurd_features, "documented type and range"), (huge_features, "weights do not fit"),
                            (huge_window, "would need about"),
                            (not_a_window, "sliding_window must be a mapping"),
                            (unknown_accumulation, "sliding_window.accumulate must be one of"),
                            (unknown_loss_argument, "cannot be built by this version of biasseg")):
        crafted = modified_checkpoint(trained / "checkpoints" / "last.ckpt", tmp_path / f"{change.__name__}.ckpt", change)
        started = time.perf_counter()
        with pytest.raises(InputError, match=message):
            load_trained(read_checkpoint(crafted), source=str(crafted))
        assert time.perf_counter() - started < 20


def test_interpolations_and_unknown_hyper_parameters_are_refused(trained, tmp_path):
    from lightning_modules.checkpoints import load_trained, read_checkpoint

    def interpolation(checkpoint):
        checkpoint["run_config"]["loss"]["gamma"] = "${oc.env:HOME}"

    def unknown(checkpoint):
        checkpoint["hyper_parameters"]["optimizer"] = "anything"

    def wrong_weights(checkpoint):
        checkpoint["hyper_parameters"]["features"] = [4, 8, 16]

    for change, message in ((interpolation, "interpolation"), (unknown, "unknown hyper_parameters"), (wrong_weights, "weights do not fit")):
        crafted = modified_checkpoint(trained / "checkpoints" / "last.ckpt", tmp_path / f"{change.__name__}.ckpt", change)
        with pytest.raises(InputError, match=message):
            load_trained(read_checkpoint(crafted), source=str(crafted))


def test_checkpoints_written_by_train_load_and_a_trusted_old_one_converts(trained, tmp_path):
    from lightning_modules.checkpoints import load_trained, read_checkpoint

    original = trained / "checkpoints" / "last.ckpt"
    load_trained(read_checkpoint(original))  # plain data only: loads as it is
    with_numpy = tmp_path / "numpy.ckpt"
    checkpoint = torch.load(original, weights_only=True)
    checkpoint["inference_settings"]["target_spacing"] = np.asarray(checkpoint["inference_settings"]["target_spacing"])
    torch.save(checkpoint, with_numpy)
    with pytest.raises(InputError, match="convert_trusted_checkpoint"):
        read_checkpoint(with_numpy)
    converted = tmp_path / "converted.ckpt"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_trusted_checkpoint.py"), str(with_numpy), str(converted)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    trained_model = load_trained(read_checkpoint(converted))
    assert trained_model.inference_settings["target_spacing"] == checkpoint["inference_settings"]["target_spacing"].tolist()


def test_a_resumed_checkpoint_cannot_make_lightning_delete_files_outside_its_folder(trained, tmp_path):
    from lightning_modules.callback_state import confine_callback_state

    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    key = next(k for k, v in checkpoint["callbacks"].items() if "best_k_models" in v)
    folder = checkpoint["callbacks"][key]["dirpath"]
    escape = f"{folder}/../../../victim.txt"
    checkpoint["callbacks"][key]["best_k_models"][escape] = torch.tensor(0.0)
    checkpoint["callbacks"][key]["last_model_path"] = "s3://bucket/model.ckpt"
    inside = next(iter(p for p in checkpoint["callbacks"][key]["best_k_models"] if p != escape))
    assert sorted(confine_callback_state(checkpoint)) == sorted([escape, "s3://bucket/model.ckpt"])
    assert list(checkpoint["callbacks"][key]["best_k_models"]) == [inside]
    assert checkpoint["callbacks"][key]["last_model_path"] == ""
    del checkpoint["callbacks"][key]["dirpath"]  # without a folder, Lightning would use its own: keep nothing
    checkpoint["callbacks"][key]["best_model_path"] = "s3://bucket/best.ckpt"
    assert "s3://bucket/best.ckpt" in confine_callback_state(checkpoint)
    assert checkpoint["callbacks"][key]["best_k_models"] == {} and checkpoint["callbacks"][key]["best_model_path"] == ""


@pytest.mark.slow
def test_not_a_checkpoint_and_a_truncated_one_are_one_line_errors(trained, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    for bad in (text, truncated):
        line = one_line_error(run_entry_point("train.py", *TINY, f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / bad.stem}", cwd=tmp_path))
        assert bad.name in line and "not a readable PyTorch checkpoint" in line


# --- 3. one geometry ---------------------------------------------------------------------------

def flip_qform(path: Path) -> None:
    """Keep the sform, flip the qform's first axis (both coded): readers may now disagree."""
    image = nib.load(path)
    data, affine = np.asarray(image.dataobj), image.affine
    flipped = affine.copy()
    flipped[:3, 0] *= -1
    out = nib.Nifti1Image(data, affine)
    out.set_sform(affine, code=1)
    out.set_qform(flipped, code=1)
    nib.save(out, path)


def shear_sform(path: Path) -> None:
    """A sform with shear, which ITK ignores (it falls back to the qform) and nibabel uses."""
    image = nib.load(path)
    sheared = image.affine.copy()
    sheared[0, 1] = 0.3
    out = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    out.set_qform(image.affine, code=1)
    out.set_sform(sheared, code=1)
    nib.save(out, path)


@pytest.mark.parametrize("breaker,message", [(flip_qform, "qform and sform disagree"), (shear_sform, "qform and sform disagree")])
def test_a_label_whose_readers_disagree_on_its_geometry_is_refused(tmp_path, breaker, message):
    root = write_nnunet(tmp_path / "data")
    label = root / "labelsTr" / "case_002.nii.gz"
    breaker(label)
    before = folder_digest(root)
    with pytest.raises(DatasetError, match=message) as caught:
        folder_module(root, tmp_path / "cache").setup()
    assert str(label) in str(caught.value)
    assert folder_digest(root) == before
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_file_whose_spacing_would_explode_when_resampled_is_refused(tmp_path):
    root = write_nnunet(tmp_path / "data")
    label = root / "labelsTr" / "case_002.nii.gz"
    image = root / "imagesTr" / "case_002_0000.nii.gz"
    for path in (label, image, root / "imagesTr" / "case_002_0001.nii.gz"):
        original = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(original.dataobj), np.diag([-400.0, -400.0, 400.0, 1.0])), path)
    with pytest.raises(DatasetError, match="case_002_0000.nii.gz: its spacing .* more than 50% of this machine's memory"):
        folder_module(root, tmp_path / "cache").setup()


@pytest.mark.parametrize("ending", [".mha", ".mhd", ".nrrd"])
def test_only_nifti_is_read(tmp_path, ending):
    """Other formats' headers may name data files anywhere (.mhd's ElementDataFile, .nrrd's data file)."""
    root = write_msd(tmp_path / "data")
    rewrite_json(root, lambda d: d["training"][0].update(image=f"./imagesTr/case_000{ending}"))
    with pytest.raises(DatasetError, match=f"case_000{ending}: only NIfTI files"):
        folder_module(root, tmp_path / "cache")


def test_the_checked_geometry_is_the_one_itk_reads(tmp_path):
    """Only a qform, flipped: both readers agree, and the check reports ITK's affine."""
    import torchio as tio

    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    image.set_sform(None, code=0)
    image.set_qform(affine, code=1)
    nib.save(image, tmp_path / "q.nii.gz")
    _, checked = read_image(tmp_path / "q.nii.gz", with_data=False)
    np.testing.assert_allclose(checked, tio.ScalarImage(tmp_path / "q.nii.gz").affine)


def test_a_label_whose_readers_disagree_on_its_values_is_refused(tmp_path):
    """scl_slope 0 with an intercept: ITK adds the intercept (labels shift by one), nibabel not."""
    root = write_nnunet(tmp_path / "data")
    label = root / "labelsTr" / "case_001.nii.gz"
    raw = bytearray(gzip.decompress(label.read_bytes()))
    header = np.frombuffer(raw[:348], dtype=nib.nifti1.header_dtype).copy()
    header["scl_slope"], header["scl_inter"] = 0.0, 1.0
    raw[:348] = header.tobytes()
    label.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="case_001.nii.gz: its intensity scaling .* is read differently by ITK and nibabel"):
        folder_module(root, tmp_path / "cache").setup()


# --- 4, 5. predict: no overwriting, no silent collisions ------------------------------------------

@pytest.fixture
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        nifti(folder / f"{name}.nii.gz", rng.normal(size=(32, 32, 16)).astype(np.float32))
    return folder


def test_predict_refuses_to_replace_existing_files_unless_told(trained, scans, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    ground_truth = tmp_path / "labelsTs"
    ground_truth.mkdir()
    (ground_truth / "a.nii.gz").write_bytes(b"ground truth")
    with pytest.raises(InputError, match="a.nii.gz already exist.*overwrite=true"):
        predict(predict_config(ckpt, scans, ground_truth))
    assert (ground_truth / "a.nii.gz").read_bytes() == b"ground truth"
    assert sorted(p.name for p in ground_truth.iterdir()) == ["a.nii.gz"]  # nothing else written either
    predict(predict_config(ckpt, scans, ground_truth, overwrite=True))
    assert nib.load(ground_truth / "a.nii.gz").shape == (32, 32, 16)


def test_predict_never_replaces_an_input_even_with_overwrite(trained, scans, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    single = scans / "a.nii.gz"
    before = single.read_bytes()
    with pytest.raises(InputError, match="is the input folder"):
        predict(predict_config(ckpt, single, scans, overwrite=True))
    line = one_line_error(run_entry_point("predict.py", f"ckpt_path={ckpt}", f"input={scans}", f"output={scans}",
                                          f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path))
    assert "is the input folder" in line
    assert single.read_bytes() == before


@pytest.mark.parametrize("names", [("x_0000.nii.gz", "x.nii.gz"), ("y.nii", "y.nii.gz")])
def test_predict_reports_inputs_that_would_share_a_case_name(trained, tmp_path, names):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        nifti(folder / name, np.zeros((32, 32, 16), np.float32))
    with pytest.raises(DatasetError) as caught:
        predict(predict_config(trained / "checkpoints" / "last.ckpt", folder, tmp_path / "out"))
    assert all(name in str(caught.value) for name in names)
    assert not (tmp_path / "out").exists()


def test_predict_refuses_what_it_cannot_do_in_one_line(trained, scans, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    other = tmp_path / "scan.mha"
    other.write_bytes(b"not read")
    with pytest.raises(DatasetError, match="scan.mha: not a .nii/.nii.gz file"):
        predict(predict_config(ckpt, other, tmp_path / "out"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no usable CUDA device"):
            predict(predict_config(ckpt, scans, tmp_path / "out", device="cuda"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file|cannot be created"):
        predict(predict_config(ckpt, scans, blocker))
    with pytest.raises(InputError, match="cannot be created"):
        predict(predict_config(ckpt, scans, blocker / "sub"))


def test_predict_names_a_truncated_input(trained, scans, tmp_path):
    broken = scans / "b.nii.gz"
    broken.write_bytes(broken.read_bytes()[:600])
    line = one_line_error(run_entry_point("predict.py", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"input={scans}",
                                          f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path))
    assert "problem" in line
    assert not (tmp_path / "out").exists()


# --- 6, 7. dataset.json: names and paths -----------------------------------------------------------

def rewrite_json(root: Path, change) -> None:
    description = json.loads((root / "dataset.json").read_text())
    change(description)
    (root / "dataset.json").write_text(json.dumps(description))


def test_msd_case_names_keep_their_dots(tmp_path):
    root = write_msd(tmp_path / "data")
    for entry_index, old in enumerate(sorted((root / "labelsTr").iterdir())):
        for folder in ("imagesTr", "labelsTr"):
            (root / folder / old.name).rename(root / folder / f"sub.{entry_index}.nii.gz")
    rewrite_json(root, lambda d: d.update(training=[
        {"image": f"./imagesTr/sub.{i}.nii.gz", "label": f"./labelsTr/sub.{i}.nii.gz"} for i in range(5)]))
    dm = folder_module(root, tmp_path / "cache")
    dm.setup()
    assert sorted([*dm.split["train"], *dm.split["val"]]) == [f"sub.{i}" for i in range(5)]


def test_two_entries_with_one_case_name_are_refused(tmp_path):
    root = write_msd(tmp_path / "data")
    (root / "other").mkdir()
    (root / "other" / "case_000.nii.gz").write_bytes((root / "labelsTr" / "case_000.nii.gz").read_bytes())
    rewrite_json(root, lambda d: d["training"].append({"image": "./imagesTr/case_001.nii.gz", "label": "./other/case_000.nii.gz"}))
    with pytest.raises(DatasetError, match="case name 'case_000' is used by both"):
        folder_module(root, tmp_path / "cache")


def test_dataset_name_cannot_move_the_cache(tmp_path):
    root = write_msd(tmp_path / "deep" / "data")
    rewrite_json(root, lambda d: d.update(name="../../../escaped"))
    cache = tmp_path / "deep" / "cache"
    before = {p for p in tmp_path.rglob("*")}
    folder_module(root, cache).setup()
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.is_relative_to(cache) for p in new)


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_files_outside_the_dataset_folder_need_permission(tmp_path, where):
    root = write_msd(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "labelsTr" / "case_004.nii.gz").rename(outside / "case_004.nii.gz")
    entry = {"relative": "../elsewhere/case_004.nii.gz", "absolute": str(outside / "case_004.nii.gz"),
             "symlink": "./labelsTr/case_004.nii.gz"}[where]
    if where == "symlink":
        (root / "labelsTr" / "case_004.nii.gz").symlink_to(outside / "case_004.nii.gz")
    rewrite_json(root, lambda d: d["training"][4].update(label=entry))
    with pytest.raises(DatasetError, match="outside the dataset folder.*allow_outside_root"):
        folder_module(root, tmp_path / "cache")
    folder_module(root, tmp_path / "cache", allow_outside_root=True).setup()


@pytest.mark.parametrize("change,message", [
    (lambda d: d["training"][0].pop("label"), "training entry 0 needs 'label'"),
    (lambda d: d.pop("labels"), "'labels' must be a non-empty mapping"),
    (lambda d: d.update(training={"image": "x"}), "'training' must be a list"),
    (lambda d: d["training"].__setitem__(1, "imagesTr/case_001.nii.gz"), "training entry 1 needs 'image' and 'label'"),
    (lambda d: d.update(modality=["T1"]), "'modality' must be a non-empty mapping"),
])
def test_malformed_dataset_json_entries_are_named(tmp_path, change, message):
    root = write_msd(tmp_path / "data")
    rewrite_json(root, change)
    with pytest.raises(DatasetError, match=message):
        folder_module(root, tmp_path / "cache")


def test_hostile_json_shapes_and_names_are_one_line(tmp_path):
    root = write_msd(tmp_path / "data")
    (root / "dataset.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DatasetError, match="cannot be read as JSON"):
        folder_module(root, tmp_path / "cache")
    root = write_msd(tmp_path / "long")
    long_name = "x" * 240
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / "case_000.nii.gz").rename(root / folder / f"{long_name}.nii.gz")
    rewrite_json(root, lambda d: d["training"][0].update(image=f"./imagesTr/{long_name}.nii.gz", label=f"./labelsTr/{long_name}.nii.gz"))
    with pytest.raises(DatasetError, match="case name longer than 200 characters"):
        folder_module(root, tmp_path / "cache")
    root = write_msd(tmp_path / "loop")
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    (root / "labelsTr" / "case_001.nii.gz").symlink_to(root / "labelsTr" / "case_001.nii.gz")
    with pytest.raises(DatasetError, match="case_001.nii.gz"):
        folder_module(root, tmp_path / "cache")


def test_repeated_cases_in_a_splits_file_are_refused(tmp_path):
    root = write_msd(tmp_path / "data")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["case_000", "case_000", "case_001"], "val": ["case_002"]}]))
    with pytest.raises(DatasetError, match="listed more than once"):
        folder_module(root, tmp_path / "cache", splits_from=str(splits))


def test_evaluate_keeps_the_users_settings_for_a_checkpoints_data(tmp_path):
    from biasseg.pipelines.evaluate import data_config

    stored = {"_target_": "datamodules.FolderDataModule", "root": "/data/x", "cache_dir": "/somewhere/else",
              "allow_outside_root": True, "num_workers": 512, "splits_file": "/x/splits.json"}
    cfg = OmegaConf.create({"data": None, "paths": {"output_dir": str(tmp_path)}})
    data = data_config(cfg, stored, "ckpt_path=x")
    assert data.allow_outside_root is False and data.num_workers == "auto"
    assert data.cache_dir != "/somewhere/else" and data.splits_file == str(tmp_path / "splits.json")


def test_nnunet_file_ending_must_be_an_image_ending(tmp_path):
    root = write_nnunet(tmp_path / "data")
    rewrite_json(root, lambda d: d.update(file_ending="/../../x"))
    with pytest.raises(DatasetError, match="'file_ending' must be one of"):
        folder_module(root, tmp_path / "cache")


# --- 8. permissions -----------------------------------------------------------------------------

def test_results_and_cache_files_follow_the_umask(tmp_path):
    root = write_nnunet(tmp_path / "data")
    old = os.umask(0o002)
    try:
        run = tmp_path / "run"
        train(compose_config(["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.patch_size=[16,16,8]",
                              *[o for o in TINY if not o.startswith("data.")], "data.num_workers=0", "data.samples_per_volume=2",
                              *QUIET], run))
    finally:
        os.umask(old)
    written = [run / n for n in ("metrics.json", "subjects.csv", "splits.json", "calibration.csv")]
    written += [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
    assert set(modes.values()) == {0o664}, modes


SHARED_CACHE_USER = """
import os, sys
from datamodules import FolderDataModule
from biasseg.errors import InputError
import shutil, tempfile
warm = tempfile.mkdtemp()
shutil.copytree({data!r}, warm + "/data")
FolderDataModule(root=warm + "/data", cache_dir=warm + "/cache", num_workers=0, patch_size=(16, 16, 8)).setup()  # every lazy import now
dm = FolderDataModule(root={data!r}, cache_dir={cache!r}, num_workers=0, patch_size=(16, 16, 8))
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)  # another user from here on (the Python installation may be private to root)
try:
    dm.setup()
    print("ok", len(dm.train_cases))
except InputError as error:
    print("error:", error)
"""


def as_another_user(data: Path, cache: Path) -> str:
    code = SHARED_CACHE_USER.format(root=str(ROOT), data=str(data), cache=str(cache))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": "/tmp"})
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def world_readable_dir():
    """A folder every user can enter (pytest's own temporary folders are private to their owner)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="biasseg-shared-", dir="/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_another_user_reads_a_shared_cache_and_gets_one_line_when_it_cannot_write(world_readable_dir):
    base = world_readable_dir
    root = write_nnunet(base / "data")
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    cache = base / "cache"
    folder_module(root, cache).setup()  # built by this user (umask 022)
    assert as_another_user(root, cache) == "ok 4"  # fresh entries: read only
    if os.geteuid() != 0:
        for path in [cache, *cache.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o555)
    nib.save(nib.load(root / "labelsTr" / "case_001.nii.gz"), root / "labelsTr" / "case_001.nii.gz")  # stale: must rebuild
    os.chmod(root / "labelsTr" / "case_001.nii.gz", 0o644)
    line = as_another_user(root, cache)
    assert line.startswith("error: data.cache_dir=") and "not writable by you" in line


# --- 9. headers that lie about their size -------------------------------------------------------------

@pytest.mark.parametrize("name", ["big.nii", "big.nii.gz"])
def test_a_header_declaring_gigabytes_it_does_not_hold_is_refused_at_once(tmp_path, name):
    path = lying_header(tmp_path / name)
    started = time.perf_counter()
    with pytest.raises(UnreadableImage, match="truncated|memory"):
        read_image(path)
    assert time.perf_counter() - started < 10  # no 4 GB allocation, no full decompression


def test_a_truncated_image_in_a_dataset_is_named(tmp_path):
    root = write_nnunet(tmp_path / "data")
    path = root / "imagesTr" / "case_003_0001.nii.gz"
    lying_header(path, shape=(20, 18, 12), keep_bytes=100)
    with pytest.raises(DatasetError, match="case_003_0001.nii.gz: cannot be read: truncated"):
        folder_module(root, tmp_path / "cache").setup()


# --- 10. user errors are one line, before any long work -----------------------------------------------

def test_split_problems_are_found_before_preprocessing(tmp_path):
    root = write_nnunet(tmp_path / "data", num_cases=3)
    line = one_line_error(run_entry_point("train.py", "data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                          "data.fold=7", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path))
    assert "data.fold must be in [0, 5)" in line
    with pytest.raises(InputError, match="data.num_folds=5 folds need at least as many cases"):
        folder_module(root, tmp_path / "cache", fold=0)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["case_000"], "val": []}]))
    with pytest.raises(InputError, match="0 validation cases"):
        folder_module(root, tmp_path / "cache", splits_from=str(splits))
    splits.write_text(json.dumps({"train": "oops"}))
    with pytest.raises(DatasetError, match="not a splits file"):
        folder_module(root, tmp_path / "cache", splits_from=str(splits))
    assert not (tmp_path / "cache").exists()


def test_a_loss_weight_of_the_wrong_length_fails_before_training(tmp_path):
    line = one_line_error(run_entry_point("train.py", *TINY, "loss.weight=[1.0,2.0,3.0]", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path))
    assert "2 classes" in line and "class weight has 3 entries" in line


# --- 11. the cache: damaged entries, orphans, concurrent runs; empty labels ---------------------------

def test_a_damaged_cache_entry_is_rebuilt_and_orphans_are_removed(tmp_path):
    root = write_nnunet(tmp_path / "data")
    dm = folder_module(root, tmp_path / "cache")
    dm.setup()
    directory = dm.cache.directory
    image = directory / "case_001.image.npy"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # truncated
    (directory / "case_002.label.npy").write_bytes(b"garbage")
    orphan = directory / ".case_003.image.npy.abc123.tmp"
    orphan.write_bytes(b"left by kill -9")
    again = folder_module(root, tmp_path / "cache")
    again.setup()
    assert image.read_bytes() == good
    assert not orphan.exists()
    for case in [*again.train_cases, *again.val_cases]:
        case.arrays()[0].sum()  # every entry readable


def test_two_runs_on_one_new_cache_preprocess_once(tmp_path):
    root = write_nnunet(tmp_path / "data", num_cases=8)
    code = ("from datamodules import FolderDataModule; "
            f"FolderDataModule(root={str(root)!r}, cache_dir={str(tmp_path / 'cache')!r}, num_workers=0).setup()")
    runs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[1] for p in runs]
    assert all(p.returncode == 0 for p in runs), outputs
    built = [o for o in outputs if "Preprocessing" in o]
    assert len(built) == 1, outputs  # the other found the entries complete after waiting for the lock


def test_all_empty_training_labels_are_warned_about(tmp_path):
    root = write_nnunet(tmp_path / "data")
    for label in (root / "labelsTr").iterdir():
        image = nib.load(label)
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), label)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder_module(root, tmp_path / "cache").setup()
    assert any("every training label" in str(w.message) for w in caught)
