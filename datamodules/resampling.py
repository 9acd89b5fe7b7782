"""Resampling a case to the target spacing: nnU-Net's separate out-of-plane rule for thick slices.

nnU-Net (``preprocessing/resampling/default_resampling.py``, ``resample_data_or_seg`` with its
plans' ``order=3, order_z=0`` for images and ``order=1, order_z=0`` for labels) resamples a case
whose spacing (or target spacing) is more than ``ANISO_THRESHOLD`` (3) times coarser along one
axis than the finest separately (``determine_do_sep_z_and_axis``): in plane with cubic splines
(images) or per label value with linear interpolation, the highest winning (labels), and across
slices with the nearest neighbour — interpolating between 5 mm slices invents anatomy. Other
cases keep TorchIO's ``Resample`` (images linear, labels nearest).

Both keep TorchIO's output grid (same orientation, the centre kept, ``floor`` of the extent
over the spacing), so the affine, the cache and the mapping back to the annotated grid
(:mod:`datamodules.original_grid`) are the same whichever rule resamples; ``tests/test_resampling.py``
checks the separate rule against nnunetv2's own function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from datamodules.plan import ANISO_THRESHOLD


def separate_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The axis resampled separately (nearest neighbour), or None: nnU-Net's
    ``determine_do_sep_z_and_axis`` — the current spacing's coarsest axis when it is more than
    3 × the finest, else the target spacing's; None when two axes tie for coarsest."""
    for values in (np.asarray(spacing, dtype=float), np.asarray(target, dtype=float)):
        if values.max() / values.min() > ANISO_THRESHOLD:
            coarsest = np.flatnonzero(np.isclose(values, values.max()))
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def source_coordinates(size: int, spacing: float, target: float) -> np.ndarray:
    """For each voxel of TorchIO's resampled grid along one axis, its (continuous) index in
    the source: same centre, ``floor(size · spacing / target)`` voxels (at least one)."""
    new_size = max(1, int(np.floor(size * spacing / target))) if size > 1 else 1
    return (size - 1) / 2 + (np.arange(new_size) - (new_size - 1) / 2) * target / spacing


def _resample(volume: np.ndarray, coordinates: list[np.ndarray], axis: int, order: int) -> np.ndarray:
    """``volume`` ``(W, H, D)`` at ``coordinates`` per axis: nearest along ``axis``, splines of
    ``order`` in the other two (edges extended, as nnU-Net's ``mode='edge'``)."""
    nearest = np.clip(np.rint(coordinates[axis]), 0, volume.shape[axis] - 1).astype(int)
    volume = np.take(volume, nearest, axis=axis)
    scale = [1.0 if a == axis else (c[1] - c[0] if len(c) > 1 else 1.0) for a, c in enumerate(coordinates)]
    offset = [0.0 if a == axis else c[0] for a, c in enumerate(coordinates)]
    shape = [len(c) for c in coordinates]
    return ndimage.affine_transform(volume, scale, offset=offset, output_shape=shape, order=order, mode="nearest")


def _resample_labels(labels: np.ndarray, coordinates: list[np.ndarray], axis: int) -> np.ndarray:
    """A label map resampled as nnU-Net's ``resize_segmentation`` (batchgenerators): each label
    value's mask (background included) interpolated linearly in plane, the highest score wins,
    and where labels tie the nearest neighbour's label does (if it is among them)."""
    values = np.unique(labels)
    scores = np.stack([_resample((labels == v).astype(np.float32), coordinates, axis, 1) for v in values])
    best = scores.max(0)
    winner = scores.argmax(0)  # the first maximum: the smaller label
    nearest = np.searchsorted(values, _resample(labels.astype(np.float32), coordinates, axis, 0))
    nearest_score = np.take_along_axis(scores, nearest[None], 0)[0]
    winner = np.where((nearest_score == best) & (best > 0), nearest, winner)
    return values[winner].astype(np.float32)


def resample_subject(subject: tio.Subject, target_spacing: Sequence[float]) -> tio.Subject:
    """``subject`` (RAS+, ``image`` and label maps) resampled to ``target_spacing`` (mm)."""
    image = subject["image"]
    spacing = np.asarray(image.spacing, dtype=float)
    axis = separate_axis(spacing, target_spacing)
    if axis is None:
        return tio.Resample(tuple(float(s) for s in target_spacing))(subject)
    coordinates = [source_coordinates(n, s, t) for n, s, t in zip(image.shape[1:], spacing, target_spacing)]
    to_source = np.eye(4)
    to_source[:3, :3] = np.diag([c[1] - c[0] if len(c) > 1 else 1.0 for c in coordinates])
    to_source[:3, 3] = [c[0] for c in coordinates]
    affine = image.affine @ to_source  # the new grid in world coordinates (TorchIO's, up to rounding)
    resampled = {key: value for key, value in subject.items() if not isinstance(value, tio.Image)}
    for key, value in subject.get_images_dict(intensity_only=False).items():
        data = value.data.numpy()
        if isinstance(value, tio.LabelMap):
            out = np.stack([_resample_labels(labels, coordinates, axis) for labels in data])
            resampled[key] = tio.LabelMap(tensor=torch.from_numpy(out), affine=affine)
        else:
            out = np.stack([_resample(np.asarray(c, dtype=np.float32), coordinates, axis, 3) for c in data])
            resampled[key] = tio.ScalarImage(tensor=torch.from_numpy(out), affine=affine)
    return tio.Subject(resampled)
