"""Segment new images with a trained checkpoint, in each input's own geometry.

    python predict.py ckpt_path=…/best.ckpt input=scans/ output=predictions/

Each case is preprocessed like the training data (RAS+, target spacing, non-zero crop,
normalisation; stored in the checkpoint), segmented with sliding-window inference, and its
class probabilities are resampled back onto the input's grid, so ``<case>.nii.gz`` has
exactly the input's shape and affine (header copied). ``volumes.csv`` lists each class's
volume in ml: ``volume_ml`` from the mask (argmax), ``soft_volume_ml`` = Σ p × voxel volume.
Inputs: ``.nii``/``.nii.gz`` files; several channels either as nnU-Net's
``CASE_0000.nii.gz, CASE_0001…`` or as one 4D file.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
import torchio as tio
from omegaconf import DictConfig
from tqdm import tqdm

from callbacks.results_writer import write_atomically
from datamodules.cases import Intensity
from datamodules.input_checks import DatasetError, read_image
from datamodules.preprocessing_cache import preprocess_subject
from lightning_modules.checkpoints import TrainedModel, load_trained, read_checkpoint
from train import exit_on_dataset_error

ENDINGS = (".nii.gz", ".nii")


def case_name(path: Path) -> str:
    return next(path.name[: -len(e)] for e in ENDINGS if path.name.endswith(e))


def find_cases(source: Path, in_channels: int) -> dict[str, list[Path]]:
    """``{case: [channel files…]}``: files ``X_0000 … X_{C−1}`` (nnU-Net's naming, exactly the
    model's ``C`` channels) form case ``X``; every other file is a case of its own."""
    if not source.exists():
        raise DatasetError([f"{source}: input does not exist"])
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.name.endswith(ENDINGS))
    if not files:
        raise DatasetError([f"{source}: no .nii/.nii.gz files"])
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path in files:
        match = re.fullmatch(r"(.+)_(\d{4})", case_name(path))
        if match:
            groups.setdefault(match.group(1), []).append((int(match.group(2)), path))
    cases: dict[str, list[Path]] = {}
    grouped = set()
    for name, members in groups.items():
        if sorted(i for i, _ in members) == list(range(in_channels)):
            cases[name] = [p for _, p in sorted(members)]
            grouped.update(p for _, p in members)
    for path in files:
        if path not in grouped:
            cases[case_name(path)] = [path]
    return dict(sorted(cases.items()))


def load_case(files: list[Path], in_channels: int) -> tuple[tio.ScalarImage | None, list[str]]:
    """The case's image with all channels, or the problems that prevent it."""
    try:
        images = [tio.ScalarImage(p) for p in files]
        for image in images:
            image.load()
    except Exception as error:
        return None, [f"{files}: cannot be read ({type(error).__name__}: {error})"]
    channels = sum(i.num_channels for i in images)
    if channels != in_channels:
        return None, [f"{files[0]}: {channels} channel(s) found, the model expects {in_channels}"]
    if any(i.spatial_shape != images[0].spatial_shape for i in images):
        return None, [f"{files[0]}: its channel files differ in shape"]
    for path in files:  # TorchIO's ITK reader turns NaN into 0; look at the stored values
        if not np.isfinite(read_image(path)[0]).all():
            return None, [f"{path}: NaN/inf voxel values"]
    if len(images) == 1:
        return images[0], []
    return tio.ScalarImage(tensor=torch.cat([i.data for i in images]), affine=images[0].affine), []


def intensity_for(image: np.ndarray, settings: dict) -> Intensity:
    """The training run's normalisation, applied to this (preprocessed) image."""
    channels = len(image)
    if settings.get("normalization") == "zscore":
        flat = image.reshape(channels, -1)
        return Intensity.zscore(flat.mean(1, dtype=np.float64), flat.std(1, dtype=np.float64))
    if settings.get("normalization") == "ct":
        return Intensity(**{k: np.asarray(v) for k, v in settings["intensity"].items()})
    return Intensity.identity(channels)


@torch.no_grad()
def predict_case(trained: TrainedModel, image: tio.ScalarImage, reference: Path) -> np.ndarray:
    """Class probabilities ``(C, W, H, D)`` on the grid of ``reference`` (the input file)."""
    settings = trained.inference_settings
    subject = preprocess_subject(tio.Subject(image=image), settings.get("target_spacing"), bool(settings.get("crop_nonzero")))
    data = subject["image"].data.numpy()
    normalised = torch.from_numpy(intensity_for(data, settings)(data))
    probabilities = trained.module.predict_probabilities(normalised).float().cpu()
    on_input = tio.Resample(str(reference))(tio.ScalarImage(tensor=probabilities, affine=subject["image"].affine))
    result = on_input.data.numpy().clip(0, 1)
    result[0] = np.clip(1 - result[1:].sum(0), 0, 1)  # outside the crop only background remains
    return result


def write_like(path: Path, data: np.ndarray, reference: nib.Nifti1Image, dtype) -> None:
    """Save ``data`` with the reference's affine and header (only the data type changes)."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    image = nib.Nifti1Image(data.astype(dtype), reference.affine, header)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz" if path.name.endswith(".gz") else f".{path.name}.tmp.nii")
    nib.save(image, tmp)
    tmp.replace(path)


def predict(cfg: DictConfig) -> Path:
    """Segment every case of ``cfg.input`` into ``cfg.output``; returns the volumes.csv path."""
    for key in ("ckpt_path", "input", "output"):
        if not cfg.get(key):
            raise ValueError(f"predict.py needs {key}=…")
    source, output = Path(cfg.input).expanduser().resolve(), Path(cfg.output).expanduser().resolve()
    if output == (source if source.is_dir() else source.parent):
        raise ValueError(f"output={output} is the input folder; choose another so no input can be overwritten")
    window = {k: cfg[k] for k in ("overlap", "batch_size") if cfg.get(k) is not None}
    trained = load_trained(read_checkpoint(cfg.ckpt_path), sliding_window=window or None)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device)
    trained.module.to(device)
    in_channels = int(trained.module.hparams.in_channels)
    class_names = trained.module.class_names
    cases, problems = find_cases(source, in_channels), []
    for files in cases.values():  # every input checked before anything is written; images not kept (memory)
        problems += load_case(files, in_channels)[1]
    if problems:
        raise DatasetError(problems)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, files in tqdm(cases.items(), desc="Predicting", unit="case"):
        probabilities = predict_case(trained, load_case(files, in_channels)[0], files[0])
        reference = nib.load(files[0])
        segmentation = probabilities.argmax(0)
        write_like(output / f"{name}.nii.gz", segmentation, reference, np.uint8 if len(probabilities) < 256 else np.int16)
        if cfg.save_probabilities:
            write_like(output / f"{name}_probabilities.nii.gz", np.moveaxis(probabilities, 0, -1), reference, np.float32)
        voxel_ml = abs(np.linalg.det(reference.affine[:3, :3])) / 1000.0
        for c, class_name in enumerate(class_names, start=1):
            rows.append({
                "case": name,
                "class": class_name,
                "volume_ml": float((segmentation == c).sum() * voxel_ml),
                "soft_volume_ml": float(probabilities[c].sum(dtype=np.float64) * voxel_ml),
            })
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["case", "class", "volume_ml", "soft_volume_ml"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(output / "volumes.csv", text.getvalue())
    return output / "volumes.csv"


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    print(f"volumes: {exit_on_dataset_error(lambda: predict(cfg))}")


if __name__ == "__main__":
    main()
