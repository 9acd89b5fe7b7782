"""One subject as arrays: what every data source hands to the training and validation loaders.

Conventions: ``image`` is ``(C, W, H, D)`` float32, ``label`` ``(W, H, D)`` integers in
``[0, num_classes)``, ``probabilities`` (where the label's distribution is known)
``(num_classes, W, H, D)`` float32 class probabilities, background first, summing to 1; all
on the voxel grid of ``affine`` (4 × 4, mm, RAS+ as TorchIO/nibabel).
Arrays are either in memory or ``.npy`` files in the preprocessing cache, opened
memory-mapped, so that a training patch reads only its own bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from datamodules.original_grid import OriginalGrid

MAX_LOCATIONS_PER_CLASS = 10_000  # like nnU-Net: a random subset of each class's voxels is enough to sample from

ArrayOrPath = np.ndarray | Path


def class_locations(label: np.ndarray, num_classes: int, rng: np.random.Generator,
                    regions: Sequence[Sequence[int]] | None = None) -> dict[int, np.ndarray]:
    """Up to ``MAX_LOCATIONS_PER_CLASS`` voxel indices ``(N, 3)`` of each foreground class present
    (with ``regions``: of each region ``c − 1``, the voxels holding any of its label values)."""
    locations = {}
    for c in range(1, num_classes):
        where = np.argwhere(label == c if regions is None else np.isin(label, regions[c - 1]))
        if len(where) > MAX_LOCATIONS_PER_CLASS:
            where = where[rng.choice(len(where), MAX_LOCATIONS_PER_CLASS, replace=False)]
        if len(where):
            locations[c] = where.astype(np.int32)
    return locations


@dataclass
class Intensity:
    """Per-channel intensity mapping ``(clip(x, lower, upper) − shift) / scale``; where
    ``keep_zero`` is set for a channel, its zero voxels (outside the non-zero mask) stay 0, as
    nnU-Net's masked z-score leaves them."""

    shift: np.ndarray
    scale: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    keep_zero: np.ndarray | None = None

    @classmethod
    def zscore(cls, mean: np.ndarray, std: np.ndarray) -> "Intensity":
        """Per-channel z-score, no clipping (a constant channel keeps scale 1e-8)."""
        mean = np.asarray(mean, dtype=np.float64)
        unbounded = np.full(len(mean), np.inf)
        return cls(mean, np.maximum(np.asarray(std, dtype=np.float64), 1e-8), -unbounded, unbounded)

    @classmethod
    def identity(cls, channels: int) -> "Intensity":
        return cls.zscore(np.zeros(channels), np.ones(channels))

    @classmethod
    def per_channel(cls, parts: Sequence["Intensity"]) -> "Intensity":
        """Channel ``c`` mapped as ``parts[c]``'s channel ``c`` (each part covers every channel)."""
        pick = {key: np.asarray([getattr(part, key)[c] for c, part in enumerate(parts)], dtype=np.float64)
                for key in ("shift", "scale", "lower", "upper")}
        keep = np.asarray([bool(part.keep_zero[c]) if part.keep_zero is not None else False for c, part in enumerate(parts)])
        return cls(**pick, keep_zero=keep if keep.any() else None)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalised float32 copy of ``image`` ``(C, …)``."""
        shape = (-1,) + (1,) * (image.ndim - 1)
        out = np.asarray(image, dtype=np.float32)
        if np.isfinite(self.lower).any() or np.isfinite(self.upper).any():
            out = np.clip(out, self.lower.reshape(shape).astype(np.float32), self.upper.reshape(shape).astype(np.float32))
        shift, scale = self.shift.reshape(shape).astype(np.float32), self.scale.reshape(shape).astype(np.float32)
        out = (out - shift) / scale
        if self.keep_zero is not None:
            out = np.where((np.asarray(image) == 0) & self.keep_zero.reshape(shape), np.float32(0), out)
        return out


NORMALISATION_SCHEMES = ("ct", "zscore", "zscore_nonzero", "none")  # per channel (datamodules.plan chooses them)


def channel_intensity(schemes: Sequence[str], mean: np.ndarray, std: np.ndarray, nonzero_mean: np.ndarray | None = None,
                      nonzero_std: np.ndarray | None = None, ct: Intensity | None = None) -> Intensity:
    """One image's intensity mapping, one scheme per channel: ``zscore`` with the image's
    ``mean``/``std``; ``zscore_nonzero`` with those of its non-zero voxels, zeros kept (nnU-Net's
    masked z-score); ``ct`` with the dataset's mapping ``ct`` (clip + z-score from training
    foreground statistics); ``none`` unchanged."""
    channels = len(schemes)
    parts = []
    for scheme in schemes:
        if scheme == "zscore":
            parts.append(Intensity.zscore(mean, std))
        elif scheme == "zscore_nonzero":
            masked = Intensity.zscore(mean if nonzero_mean is None else nonzero_mean, std if nonzero_std is None else nonzero_std)
            masked.keep_zero = np.ones(channels, dtype=bool)
            parts.append(masked)
        elif scheme == "ct":
            if ct is None:
                raise ValueError("a ct channel needs the dataset's ct mapping")
            parts.append(ct)
        else:
            parts.append(Intensity.identity(channels))
    return Intensity.per_channel(parts)


def _array(value: ArrayOrPath | None) -> np.ndarray | None:
    return value if value is None or isinstance(value, np.ndarray) else np.load(value, mmap_mode="r")


@dataclass
class Case:
    """A subject's arrays and what the samplers and metrics need to know about it.

    ``channel_mean``/``channel_std`` describe the image (for per-subject z-scores),
    ``nonzero_mean``/``nonzero_std`` its non-zero voxels (masked z-scores; None: unknown),
    ``foreground_samples`` ``(C, N)`` are image values at random foreground voxels (for CT
    normalisation statistics);
    ``expected_volume_ml`` is ``Σ p × voxel volume`` per foreground class where the label's
    distribution ``probabilities`` is known (synthetic, MNI152), NaN otherwise. ``intensity`` is set by the
    datamodule from its normalisation setting. A case annotated by several raters has their
    label maps in ``raters`` ``(R, W, H, D)``; then ``label`` is their majority vote,
    ``probabilities`` their mean (one-hot) and ``expected_volume_ml`` their mean volume.

    Where ``probabilities`` are known its validation subject carries the foreground's
    ``label_distribution`` ``(C − 1, W, H, D)`` (per-lesion expected volumes).

    A case preprocessed from a file (``data=folder``) also keeps the annotation as it was
    given: ``original_grid`` (its affine and shape), ``original_label`` ``(W, H, D)`` on it and,
    with several raters, ``original_raters`` ``(R, W, H, D)`` (``original_label`` is then their
    majority vote); validation measures there (:mod:`datamodules.original_grid`). Where
    ``original_grid`` is None the case was made on its grid and is measured on it.
    """

    name: str
    image: ArrayOrPath
    label: ArrayOrPath
    affine: np.ndarray
    locations: dict[int, np.ndarray]
    channel_mean: np.ndarray
    channel_std: np.ndarray
    expected_volume_ml: list[float] = field(default_factory=list)
    foreground_samples: np.ndarray | None = None
    intensity: Intensity | None = None
    probabilities: ArrayOrPath | None = None
    raters: ArrayOrPath | None = None
    nonzero_mean: np.ndarray | None = None
    nonzero_std: np.ndarray | None = None
    original_grid: OriginalGrid | None = None
    original_label: ArrayOrPath | None = None
    original_raters: ArrayOrPath | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image, label)``, memory-mapped where they live on disk."""
        return tuple(a if isinstance(a, np.ndarray) else np.load(a, mmap_mode="r") for a in (self.image, self.label))

    def probability_maps(self) -> np.ndarray | None:
        """``probabilities``, memory-mapped where they live on disk."""
        return _array(self.probabilities)

    def rater_maps(self) -> np.ndarray | None:
        """``raters`` ``(R, W, H, D)``, memory-mapped where they live on disk."""
        return _array(self.raters)

    def normalised(self, image: np.ndarray) -> np.ndarray:
        return self.intensity(image) if self.intensity is not None else np.asarray(image, dtype=np.float32)

    def to_subject(self, num_classes: int) -> tio.Subject:
        """The whole subject as a TorchIO ``Subject`` (normalised image), for validation."""
        image, label = self.arrays()
        expected = self.expected_volume_ml or [math.nan] * (num_classes - 1)
        subject = tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(self.normalised(image)), affine=self.affine),
            label=tio.LabelMap(tensor=torch.from_numpy(np.asarray(label, dtype=np.int64))[None], affine=self.affine),
            name=self.name,
            expected_volume_ml=[float(v) for v in expected],
        )
        if self.probabilities is not None and self.original_grid is None:  # the label distribution q of the foreground
            subject["label_distribution"] = torch.from_numpy(np.asarray(self.probability_maps()[1:], dtype=np.float32))
        if self.raters is not None:  # one channel per rater
            raters = torch.from_numpy(np.asarray(self.rater_maps(), dtype=np.int64))
            subject.add_image(tio.LabelMap(tensor=raters, affine=self.affine), "raters")
        if self.original_grid is not None:  # plain entries, not images: their grid differs from the image's
            subject["original_grid"] = self.original_grid
            subject["original_label"] = torch.from_numpy(np.asarray(_array(self.original_label), dtype=np.int64))
            if self.original_raters is not None:
                subject["original_raters"] = torch.from_numpy(np.asarray(_array(self.original_raters), dtype=np.int64))
        return subject


def majority_vote(raters: np.ndarray, num_classes: int) -> np.ndarray:
    """The class most raters gave each voxel, ``(W, H, D)`` int64, from ``(R, W, H, D)``; a tie
    goes to the lower class (background first)."""
    counts = np.stack([(raters == c).sum(0) for c in range(num_classes)])
    return counts.argmax(0).astype(np.int64)  # argmax takes the first maximum: the lower class


def rater_mean(raters: np.ndarray, num_classes: int) -> np.ndarray:
    """The raters' mean one-hot map ``(num_classes, W, H, D)`` float32: each class's share of raters."""
    return np.stack([(raters == c).mean(0, dtype=np.float64) for c in range(num_classes)]).astype(np.float32)


def rater_volumes_ml(raters: np.ndarray, num_classes: int, voxel_ml: float) -> np.ndarray:
    """Each rater's volume of each foreground class, ``(R, num_classes − 1)`` in ml."""
    flat = raters.reshape(len(raters), -1)
    return np.stack([(flat == c).sum(1) for c in range(1, num_classes)], axis=1) * voxel_ml


def in_memory_case(
    name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, num_classes: int,
    expected_volume_ml: list[float] | None = None, seed: int = 0, probabilities: np.ndarray | None = None,
    raters: np.ndarray | None = None,
) -> Case:
    """A :class:`Case` from arrays already in memory (``image`` ``(C, W, H, D)``; the label's
    class ``probabilities`` ``(num_classes, W, H, D)`` where known). With ``raters``
    ``(R, W, H, D)`` the label, probabilities and expected volumes are the raters' majority
    vote, mean and mean volume (``label``, ``probabilities``, ``expected_volume_ml`` must then
    be None)."""
    if raters is not None:
        assert label is None and probabilities is None and expected_volume_ml is None, "given by the raters"
        raters = np.ascontiguousarray(raters, dtype=np.int64)
        label, probabilities = majority_vote(raters, num_classes), rater_mean(raters, num_classes)
        voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
        expected_volume_ml = [float(v) for v in rater_volumes_ml(raters, num_classes, voxel_ml).mean(0)]
    image = np.ascontiguousarray(image, dtype=np.float32)
    flat = image.reshape(len(image), -1)
    rng = np.random.default_rng(seed)
    return Case(
        name=name,
        image=image,
        label=np.ascontiguousarray(label),
        affine=np.asarray(affine, dtype=np.float64),
        locations=class_locations(label, num_classes, rng),
        channel_mean=flat.mean(1, dtype=np.float64),
        channel_std=flat.std(1, dtype=np.float64),
        expected_volume_ml=list(expected_volume_ml or []),
        foreground_samples=foreground_samples(image, label, rng),
        probabilities=None if probabilities is None else np.ascontiguousarray(probabilities, dtype=np.float32),
        raters=raters,
    )


def foreground_samples(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Image values ``(C, N)`` at up to ``MAX_LOCATIONS_PER_CLASS`` random foreground voxels."""
    values = image[:, np.asarray(label) > 0]
    if values.shape[1] > MAX_LOCATIONS_PER_CLASS:
        values = values[:, rng.choice(values.shape[1], MAX_LOCATIONS_PER_CLASS, replace=False)]
    return values.astype(np.float32)


def read_window(
    array: np.ndarray, start: np.ndarray, size: np.ndarray, transform=np.asarray, fill: float = 0
) -> np.ndarray:
    """``transform(array[..., start:start+size])`` over the last three axes, ``fill`` outside.

    Only the requested bytes are read from a memory-mapped array; ``transform`` (e.g. the
    intensity normalisation) sees only the part inside the array, padding comes after it.
    """
    shape = np.asarray(array.shape[-3:])
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, shape)
    inside = transform(array[(..., *[slice(int(a), int(b)) for a, b in zip(lo, hi)])])
    if (lo == start).all() and (hi == start + size).all():
        return np.array(inside)
    out = np.full(array.shape[:-3] + tuple(int(s) for s in size), fill, dtype=inside.dtype)
    offset = lo - start
    out[(..., *[slice(int(o), int(o + b - a)) for o, a, b in zip(offset, lo, hi)])] = inside
    return out
