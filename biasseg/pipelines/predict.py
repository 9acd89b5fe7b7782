"""Segment new images with a trained checkpoint, in each input's own geometry.

    python predict.py ckpt_path=…/best.ckpt input=scans/ output=predictions/
    python predict.py "ckpt_path=runs/seed*/checkpoints/last.ckpt" input=… output=…   # an ensemble: maps averaged
    python predict.py ckpt_path=…/hypernet.ckpt alpha=0.3 input=… output=…        # a Tversky hypernetwork at one α

Each case is preprocessed like the training data (RAS+, target spacing, non-zero crop,
normalisation; stored in the checkpoint), segmented with sliding-window inference, and its
class probabilities are resampled back onto the input's grid, so ``<case>.nii.gz`` has
exactly the input's shape and affine (header copied). ``volumes.csv`` lists per case and class
(ml): ``volume_ml``, the volume to quote — the soft volume ``Σ p × voxel volume`` after the
recalibration stored with the checkpoint (``volume_calibration.json``, fitted on the training
run's validation subjects; ``calibration=…``), ``volume_low_ml``/``volume_high_ml`` its
interval (``1 − α``, 90 % by default: split conformal, valid where the calibration subjects and
these scans are exchangeable), ``soft_volume_ml`` (Σ p uncalibrated), ``mask_volume_ml``
(argmax) and ``volume_sd_ml`` (the map's own Poisson-binomial SD, which under-covers; see
:mod:`biasseg.metrics.volume_quote`). Without a stored calibration (or for an ensemble) ``volume_ml``
is the uncalibrated soft volume and the interval is empty. With lesion measures (``lesions=…``,
on by default) ``volumes.csv`` also counts each class's lesions (``lesion_count``) and
``lesions.csv`` lists each predicted lesion: its hard and soft volume (Σ p over the voxels
nearer to it than to any other lesion, within the near-structure margin), size bin and centre
in voxels of the input (:mod:`biasseg.metrics.lesions`).
A region model (nnU-Net region labels) writes nnU-Net's export (``regions_class_order``), its
volumes per region (``p > 0.5``, Σ p) and, with ``save_probabilities``, one channel per region.
Inputs: ``.nii``/``.nii.gz`` files; several channels either as nnU-Net's
``CASE_0000.nii.gz, CASE_0001…`` or as one 4D file. Every input is checked before anything
is written (readable, the size its header declares, one geometry, channels, finite values),
two inputs that would give one case name are refused, and no existing file is overwritten
unless ``overwrite=true`` (an input never).
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
import torchio as tio
from omegaconf import DictConfig
from tqdm import tqdm

from biasseg.cli import CONFIGS, check_command_line
from biasseg.errors import DatasetError, InputError, exit_on_input_error
from biasseg.metrics.lesion_metrics import LESION_TABLE_COLUMNS, lesion_table, subject_lesion_rows
from biasseg.metrics.lesions import LESION_COLUMNS, lesion_settings
from biasseg.metrics.volume_quote import (
    VolumeCalibration,
    apply_stored,
    map_histograms,
    poisson_binomial_sd,
)
from biasseg.run_files import csv_text, write_atomically
from datamodules.cases import Intensity, channel_intensity
from datamodules.dataset_layout import case_name
from datamodules.image_files import NIFTI_ENDINGS
from datamodules.input_checks import image_problems
from datamodules.original_grid import OriginalGrid
from datamodules.preprocessing_cache import nonzero_statistics, preprocess_subject
from lightning_modules.calibration_file import resolve_calibration
from lightning_modules.checkpoints import TrainedModel, load_ensemble, read_checkpoints


def find_cases(source: Path, in_channels: int) -> dict[str, list[Path]]:
    """``{case: [channel files…]}``: files ``X_0000 … X_{C−1}`` (nnU-Net's naming, exactly the
    model's ``C`` channels) form case ``X``; every other file is a case of its own. Two inputs
    that would give one case name (``x.nii`` and ``x.nii.gz``; ``x_0000.nii.gz`` and
    ``x.nii.gz`` for a one-channel model) are a :class:`DatasetError`, not a silent choice."""
    if not source.exists():
        raise DatasetError([f"{source}: input does not exist"])
    if source.is_file() and not source.name.endswith(NIFTI_ENDINGS):
        raise DatasetError([f"{source}: not a .nii/.nii.gz file (only NIfTI is read; convert it first)"])
    files = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith(".")
    )
    if not files:
        raise DatasetError([f"{source}: no .nii/.nii.gz files"])
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path in files:
        match = re.fullmatch(r"(.+)_(\d{4})", case_name(path))
        if match:
            groups.setdefault(match.group(1), []).append((int(match.group(2)), path))
    claims: dict[str, list[list[Path]]] = {}
    grouped = set()
    for name, members in groups.items():
        if sorted(i for i, _ in members) == list(range(in_channels)):
            claims.setdefault(name, []).append([p for _, p in sorted(members)])
            grouped.update(p for _, p in members)
    for path in files:
        if path not in grouped:
            claims.setdefault(case_name(path), []).append([path])
    problems = [
        f"{source}: case {name!r} would come from both " + " and ".join(", ".join(p.name for p in c) for c in claimants)
        for name, claimants in claims.items() if len(claimants) > 1
    ]
    if problems:
        raise DatasetError(problems)
    return {name: claimants[0] for name, claimants in sorted(claims.items())}


def check_case(files: list[Path], trained: TrainedModel) -> list[str]:
    """The problems of one case's files (empty when it can be segmented): training's image
    checks (:func:`datamodules.input_checks.image_problems`), with the memory for the image's
    channels and the class probabilities at the model's grid and back on the input's."""
    classes = len(trained.module.class_names) + 1
    in_channels = int(trained.module.hparams.in_channels)
    return image_problems(files, in_channels, "the model expects", trained.inference_settings.get("target_spacing"),
                          arrays=in_channels + 2 * classes)[0]


def load_case(files: list[Path]) -> tio.ScalarImage:
    """The case's image with all channels (after :func:`check_case` found no problem)."""
    images = [tio.ScalarImage(p) for p in files]
    if len(images) == 1:
        return images[0]
    return tio.ScalarImage(tensor=torch.cat([i.data for i in images]), affine=images[0].affine)


def intensity_for(image: np.ndarray, settings: dict) -> Intensity:
    """The training run's normalisation (a scheme for every channel or one per channel; CT
    statistics from training), applied to this (preprocessed) image as validation applies it."""
    flat = image.reshape(len(image), -1)
    normalization = settings.get("normalization") or "none"
    schemes = normalization if isinstance(normalization, list) else [normalization] * len(image)
    ct = Intensity(**{k: np.asarray(v) for k, v in settings["intensity"].items()}) if "ct" in schemes else None
    nonzero = nonzero_statistics(flat)
    return channel_intensity(schemes, flat.mean(1, dtype=np.float64), flat.std(1, dtype=np.float64),
                             np.asarray(nonzero["nonzero_mean"]), np.asarray(nonzero["nonzero_std"]), ct)


@torch.no_grad()
def predict_case(trained: TrainedModel, image: tio.ScalarImage) -> np.ndarray:
    """Class probabilities ``(C, W, H, D)`` on the input ``image``'s own grid (mapped back as
    validation does, :mod:`datamodules.original_grid`)."""
    settings = trained.inference_settings
    subject = preprocess_subject(tio.Subject(image=image), settings.get("target_spacing"), bool(settings.get("crop_nonzero")))
    data = subject["image"].data.numpy()
    normalised = torch.from_numpy(intensity_for(data, settings)(data))
    probabilities = trained.predictor.predict_probabilities(normalised).float()
    grid = OriginalGrid(image.affine, tuple(image.shape[1:]))
    return grid.probabilities(probabilities, subject["image"].affine, background=trained.module.regions is None).cpu().numpy()


VOLUME_COLUMNS = ("case", "class", "volume_ml", "volume_low_ml", "volume_high_ml", "soft_volume_ml", "mask_volume_ml",
                  "volume_sd_ml", "lesion_count")


# lesions.csv of predict.py: each predicted lesion's volumes (no reference, so no Dice or match)
PREDICTED_LESION_COLUMNS = tuple(c for c in LESION_TABLE_COLUMNS if c not in
                                 ("kind", "detected", "components", "dice", "volume_ref_ml", "volume_expected_ml"))


def quote_volumes(probabilities: torch.Tensor, regions: bool, voxel_ml: float,
                  calibration: VolumeCalibration | None) -> dict[str, torch.Tensor]:
    """Per class ``(K,)``, from the map on the input's grid: the Poisson-binomial SD
    (``volume_sd_ml``) and, with a calibration, the quoted volume and its interval's ends
    (``volume_quote_ml``, ``volume_low_ml``, ``volume_high_ml``; the calibration's own method), ml."""
    histograms = map_histograms(probabilities, regions)
    voxel = torch.tensor([voxel_ml], dtype=torch.float64)
    if calibration is None:
        return {"volume_sd_ml": poisson_binomial_sd(histograms, voxel)[0]}
    return {key: value[0] for key, value in apply_stored(calibration, histograms, voxel).items()}


def write_like(path: Path, data: np.ndarray, reference: nib.Nifti1Image, dtype) -> None:
    """Save ``data`` as ``.nii.gz`` with the reference's affine and header (only the data
    type changes), atomically."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    image = nib.Nifti1Image(data.astype(dtype), reference.affine, header)
    write_atomically(path, lambda handle: handle.write(gzip.compress(image.to_bytes(), compresslevel=6)))


def planned_outputs(output: Path, cases: dict[str, list[Path]], save_probabilities: bool, lesions: bool = False) -> dict[Path, str]:
    """``{file this run would write: the case it comes from}``, ``volumes.csv`` (and ``lesions.csv``) included."""
    planned: dict[Path, list[str]] = {output / "volumes.csv": ["the volume table"]}
    if lesions:
        planned[output / "lesions.csv"] = ["the lesion table"]
    for name in cases:
        planned.setdefault(output / f"{name}.nii.gz", []).append(name)
        if save_probabilities:
            planned.setdefault(output / f"{name}_probabilities.nii.gz", []).append(name)
    clashes = [f"{path}: would be written for both {' and '.join(names)}" for path, names in planned.items() if len(names) > 1]
    if clashes:
        raise DatasetError(clashes)
    return {path: names[0] for path, names in planned.items()}


def check_output(output: Path, source: Path, cases: dict[str, list[Path]], save_probabilities: bool, overwrite: bool,
                 lesions: bool = False) -> None:
    """Refuse an output folder where this run would replace an input, or (without
    ``overwrite``) any existing file."""
    if output == (source if source.is_dir() else source.parent):
        raise InputError(f"output={output} is the input folder; choose another so no input can be overwritten")
    if output.exists() and not output.is_dir():
        raise InputError(f"output={output} is a file; give a folder")
    planned = planned_outputs(output, cases, save_probabilities, lesions)
    inputs = {p.resolve() for files in cases.values() for p in files}
    replaced_inputs = sorted(str(p) for p in planned if p.resolve() in inputs)
    if replaced_inputs:
        raise InputError(f"output={output}: would replace the input {replaced_inputs[0]}; choose another folder")
    existing = sorted(str(p) for p in planned if p.exists() or p.is_symlink())
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise InputError(f"output={output}: {existing[0]}{more} already exist(s); choose another folder or set overwrite=true")


def predict(cfg: DictConfig) -> Path:
    """Segment every case of ``cfg.input`` into ``cfg.output``; returns the volumes.csv path."""
    for key in ("ckpt_path", "input", "output"):
        if not cfg.get(key):
            raise InputError(f"predict.py needs {key}=…")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={cfg.device}, but this machine has no usable CUDA device; use device=cpu or auto")
    source, output = Path(cfg.input).expanduser().resolve(), Path(cfg.output).expanduser().resolve()
    window = {k: (list(cfg[k]) if k == "mirror_axes" else cfg[k]) for k in ("overlap", "batch_size", "mirror_axes", "accumulate")
              if cfg.get(k) is not None}
    checkpoints = read_checkpoints(cfg.ckpt_path)
    trained = load_ensemble(checkpoints, sliding_window=window or None, alpha=cfg.get("alpha"))
    in_channels = int(trained.module.hparams.in_channels)
    class_names = trained.module.class_names
    cases = find_cases(source, in_channels)
    lesions = lesion_settings(cfg.get("lesions"),
                              float(trained.module.hparams.soft_volume_margin_mm))
    check_output(output, source, cases, bool(cfg.save_probabilities), bool(cfg.get("overwrite", False)), lesions is not None)
    problems = []
    for files in tqdm(cases.values(), desc="Checking inputs", unit="case", leave=False):  # all, before anything is written
        problems += check_case(files, trained)
    if problems:
        raise DatasetError(problems)
    calibration, _, note = resolve_calibration(str(cfg.get("calibration", "auto")), cfg.get("calibration_file"),
                                               [path for path, _ in checkpoints],
                                               trained.module.net, class_names)  # refused before anything is written
    print(f"volume calibration: {note}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device)
    trained.module.to(device)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"output={output}: cannot be created ({error.strerror or error})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise InputError(f"output={output}: not writable by you")
    rows, lesion_rows = [], []
    for name, files in tqdm(cases.items(), desc="Predicting", unit="case"):
        probabilities = predict_case(trained, load_case(files))
        reference = nib.load(files[0])
        segmentation = trained.module.exported_labels(torch.from_numpy(probabilities)).numpy()
        masks = trained.module.segmentation(torch.from_numpy(probabilities)).numpy()  # with regions: (R, …) region masks
        write_like(output / f"{name}.nii.gz", segmentation, reference, np.uint8 if segmentation.max(initial=0) < 256 else np.int16)
        if cfg.save_probabilities:
            write_like(output / f"{name}_probabilities.nii.gz", np.moveaxis(probabilities, 0, -1), reference, np.float32)
        voxel_ml = abs(np.linalg.det(reference.affine[:3, :3])) / 1000.0
        regions = trained.module.regions is not None
        quoted = quote_volumes(torch.from_numpy(probabilities), regions, voxel_ml, calibration)
        found = None
        if lesions is not None:  # every predicted lesion (no reference here), on the input's grid
            spacing = np.linalg.norm(reference.affine[:3, :3], axis=0)
            found = subject_lesion_rows(torch.from_numpy(probabilities), None, spacing, lesions, trained.module.regions)
            table = lesion_table(np.concatenate([np.zeros((len(found), 1)), found], axis=1), [name], class_names, lesions)
            lesion_rows += [{key: row[key] for key in PREDICTED_LESION_COLUMNS} for row in table]
        for c, class_name in enumerate(class_names, start=1):
            mask, soft = (masks[c - 1], probabilities[c - 1]) if regions else (segmentation == c, probabilities[c])
            soft_ml = float(soft.sum(dtype=np.float64) * voxel_ml)
            quote = {key: float(value[c - 1]) for key, value in quoted.items()}
            rows.append({
                "case": name,
                "class": class_name,
                "volume_ml": quote.get("volume_quote_ml", soft_ml),  # without a calibration: Σ p as it comes
                "volume_low_ml": quote.get("volume_low_ml", ""),
                "volume_high_ml": quote.get("volume_high_ml", ""),
                "soft_volume_ml": soft_ml,
                "mask_volume_ml": float(mask.sum() * voxel_ml),
                "volume_sd_ml": quote["volume_sd_ml"],
                "lesion_count": "" if found is None else int((found[:, LESION_COLUMNS.index("class")] == c).sum()),
            })
    write_atomically(output / "volumes.csv", csv_text(rows, VOLUME_COLUMNS))
    if lesions is not None:
        write_atomically(output / "lesions.csv", csv_text(lesion_rows, PREDICTED_LESION_COLUMNS))
    return output / "volumes.csv"


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="predict")
def main(cfg: DictConfig) -> None:
    print(f"volumes: {exit_on_input_error(lambda: predict(cfg))}")


def cli() -> None:
    """``python predict.py …`` and the console script ``biasseg-predict``: misspelt keys and ``--help`` first, then Hydra."""
    check_command_line("predict")
    main()
