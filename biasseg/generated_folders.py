"""Tiny Decathlon and nnU-Net v2 dataset folders of generated NIfTI files (tests, benchmarks, scripts)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

CLASSES = ("background", "core", "rim")


def case_arrays(index: int, shape=(20, 18, 12), channels: int = 2, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A sphere ("core", 1) inside a shell ("rim", 2); channels see it with different contrast.
    ``offset`` (voxels) grows the label's boundaries as a rater who over-segments would (the
    image stays the same)."""
    rng = np.random.default_rng(index)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = np.asarray(shape) / 2 + rng.uniform(-2, 2, 3)
    distance = np.linalg.norm(grid - centre, axis=-1)
    label = np.where(distance < 3 + offset, 1, np.where(distance < 5 + offset, 2, 0)).astype(np.uint8)
    if offset:
        return case_arrays(index, shape, channels)[0], label
    image = np.stack([100 + 50 * c + (c + 1) * 40 * label + rng.normal(0, 5, shape) for c in range(channels)])
    image[:, :2] = 0  # an empty border, so non-zero cropping has something to crop
    return image.astype(np.float32), label


def affine_for(index: int) -> np.ndarray:
    """Anisotropic spacing, differing a little between cases, with an LPS-like flip."""
    return np.diag([-1.0, -1.2 + 0.1 * (index % 2), 2.0, 1.0])


def write_msd(root: Path, num_cases: int = 5, channels: int = 2) -> Path:
    """Decathlon layout: one 4D image per case (channels last, as MSD stores them)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(num_cases):
        image, label = case_arrays(i, channels=channels)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), affine_for(i)), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine_for(i)), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {
        "name": "TinyMSD",
        "modality": {str(c): f"mod{c}" for c in range(channels)},
        "labels": {str(v): k for v, k in enumerate(CLASSES)},
        "numTraining": num_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def write_nnunet(root: Path, num_cases: int = 5, channels: int = 2) -> Path:
    """nnU-Net v2 raw layout: one 3D file per channel, ``CASE_XXXX.nii.gz``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(num_cases):
        image, label = case_arrays(i, channels=channels)
        for c in range(channels):
            nib.save(nib.Nifti1Image(image[c], affine_for(i)), root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine_for(i)), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    description = {
        "channel_names": {str(c): f"mod{c}" for c in range(channels)},
        "labels": {k: v for v, k in enumerate(CLASSES)},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def folder_digest(root: Path) -> dict[str, bytes]:
    """Every file's bytes, to assert a folder is unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


RATER_OFFSETS = (1.0, -1.0, 0.0)  # voxels: rater 1 over-segments, rater 2 under-segments, rater 3 does neither
RATER_LAYOUTS = ("nnunet_suffix", "nnunet_folders", "msd_list")


def write_multi_rater(root: Path, layout: str, num_cases: int = 5, channels: int = 2) -> Path:
    """A dataset annotated by three raters (:data:`RATER_OFFSETS`) in one of :data:`RATER_LAYOUTS`:
    ``labelsTr/<case>_rater<k>.nii.gz``, ``labelsTr_rater<k>/<case>.nii.gz``, or a Decathlon
    ``"label"`` list."""
    if layout == "msd_list":
        write_msd(root, num_cases, channels)
        description = json.loads((root / "dataset.json").read_text())
        for i, entry in enumerate(description["training"]):
            (root / "labelsTr" / f"case_{i:03d}.nii.gz").unlink()
            entry["label"] = [f"./labelsTr/case_{i:03d}_r{k}.nii.gz" for k in range(1, 4)]
            for k, offset in enumerate(RATER_OFFSETS, start=1):
                nib.save(nib.Nifti1Image(case_arrays(i, channels=channels, offset=offset)[1], affine_for(i)),
                         root / "labelsTr" / f"case_{i:03d}_r{k}.nii.gz")
        (root / "dataset.json").write_text(json.dumps(description))
        return root
    write_nnunet(root, num_cases, channels)
    for i in range(num_cases):
        (root / "labelsTr" / f"case_{i:03d}.nii.gz").unlink()
        for k, offset in enumerate(RATER_OFFSETS, start=1):
            label = nib.Nifti1Image(case_arrays(i, channels=channels, offset=offset)[1], affine_for(i))
            if layout == "nnunet_suffix":
                nib.save(label, root / "labelsTr" / f"case_{i:03d}_rater{k}.nii.gz")
            else:
                (root / f"labelsTr_rater{k}").mkdir(exist_ok=True)
                nib.save(label, root / f"labelsTr_rater{k}" / f"case_{i:03d}.nii.gz")
    if layout == "nnunet_folders":
        (root / "labelsTr").rmdir()
    return root


def thick_slice_spacing(index: int) -> tuple[float, float, float]:
    """Each case its own spacing: in-plane 0.7–1.0 mm, slices 2.5–5 mm (a clinical MR/CT mix)."""
    rng = np.random.default_rng(1000 + index)
    in_plane = float(rng.uniform(0.7, 1.0))
    return in_plane, in_plane * float(rng.uniform(0.95, 1.05)), float(rng.uniform(2.5, 5.0))


def thick_slice_case(index: int, field_mm=(40.0, 40.0, 45.0), modality: str = "MRI", empty_border: int = 2
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image (W, H, D), label (W, H, D) uint8, affine)`` of an ellipsoid (semi-axes 9–13 mm in
    plane, 8–14 mm across slices) in a field of ``field_mm``, sampled at
    :func:`thick_slice_spacing`; ``modality`` "CT" gives Hounsfield-like intensities; the first
    ``empty_border`` voxels along each in-plane axis are 0 (for the non-zero crop)."""
    rng = np.random.default_rng(index)
    spacing = np.asarray(thick_slice_spacing(index))
    shape = tuple(int(round(f / s)) for f, s in zip(field_mm, spacing))
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*centres, indexing="ij"), -1)
    centre = np.asarray(field_mm) / 2 + rng.uniform(-3, 3, 3)
    axes = np.asarray([rng.uniform(9, 13), rng.uniform(9, 13), rng.uniform(8, 14)])
    label = (np.linalg.norm((grid - centre) / axes, axis=-1) < 1).astype(np.uint8)
    if modality == "CT":
        image = -100.0 + 160 * label + rng.normal(0, 20, shape)
    else:
        image = 200.0 + 120 * label + rng.normal(0, 25, shape)
    image[:empty_border] = 0  # an empty border for the non-zero crop
    image[:, :empty_border] = 0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return image.astype(np.float32), label, affine


def thick_slice_expected_ml(index: int) -> float:
    """The true (continuous) volume of :func:`thick_slice_case`'s ellipsoid in ml, ``4/3·π·abc``."""
    rng = np.random.default_rng(index)
    rng.uniform(-3, 3, 3)  # the centre, drawn first
    axes = [rng.uniform(9, 13), rng.uniform(9, 13), rng.uniform(8, 14)]
    return float(4 / 3 * np.pi * np.prod(axes) / 1000)


def write_thick_slices(root: Path, num_cases: int = 6, modality: str = "MRI", start: int = 0, empty_border: int = 2) -> Path:
    """An nnU-Net v2 raw dataset of :func:`thick_slice_case` cases ``start … start + num_cases − 1``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(start, start + num_cases):
        image, label, affine = thick_slice_case(i, modality=modality, empty_border=empty_border)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    description = {"channel_names": {"0": modality}, "labels": {"background": 0, "lesion": 1},
                   "numTraining": num_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def annotated_volumes_ml(root: Path) -> dict[str, float]:
    """Each case's foreground volume as annotated: voxels × its own voxel volume (ml)."""
    volumes = {}
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
        volumes[path.name[: -len(".nii.gz")]] = float((np.asarray(image.dataobj) > 0).sum() * voxel_ml)
    return volumes


REGIONS = {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": 3}  # BraTS-like nested regions


def write_nested_regions(root: Path, num_cases: int = 5) -> Path:
    """An nnU-Net v2 dataset with region labels (:data:`REGIONS`, ``regions_class_order`` [1, 2, 3]):
    label 1 oedema (the outer shell, 6–10 mm), 3 an enhancing ring (3–6 mm), 2 necrosis (< 3 mm),
    on thick-slice grids of their own; two channels (T1-like, FLAIR-like)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(num_cases):
        rng = np.random.default_rng(i)
        spacing = np.asarray(thick_slice_spacing(i)) * [1.0, 1.0, 0.6]
        field = np.asarray([36.0, 36.0, 30.0])
        shape = tuple(int(round(f / s)) for f, s in zip(field, spacing))
        centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
        grid = np.stack(np.meshgrid(*centres, indexing="ij"), -1)
        distance = np.linalg.norm(grid - (field / 2 + rng.uniform(-2, 2, 3)), axis=-1) * rng.uniform(0.9, 1.1)
        label = np.select([distance < 3, distance < 6, distance < 10], [2, 3, 1], 0).astype(np.uint8)
        t1 = 100 + 80 * (label == 3) - 30 * (label == 2) + rng.normal(0, 8, shape)
        flair = 100 + 60 * (label > 0) + rng.normal(0, 8, shape)
        affine = np.diag([*spacing, 1.0])
        for c, image in enumerate((t1, flair)):
            image[:1] = 0
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    description = {"channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0, **REGIONS},
                   "regions_class_order": [1, 2, 3], "numTraining": num_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def annotated_region_volumes_ml(root: Path) -> dict[tuple[str, str], float]:
    """``{(case, region): volume in ml}`` as annotated (voxels in the region × voxel volume)."""
    volumes = {}
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        label = np.asarray(image.dataobj)
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
        for region, values in REGIONS.items():
            volumes[(path.name[: -len(".nii.gz")], region)] = float(np.isin(label, values).sum() * voxel_ml)
    return volumes
