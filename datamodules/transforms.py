"""TorchIO transforms: preprocessing (every split) and augmentation (training only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torchio as tio

NORMALISATIONS = ("zscore", "none")


class PadToAtLeast(tio.SpatialTransform):
    """Pad (symmetrically, with zeros) every spatial axis shorter than ``min_shape``."""

    def __init__(self, min_shape: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_shape = np.asarray(min_shape, dtype=int)
        self.args_names = ["min_shape"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        missing = np.maximum(self.min_shape - np.asarray(subject.spatial_shape), 0)
        if not missing.any():
            return subject
        before = missing // 2
        padding = [int(v) for pair in zip(before, missing - before) for v in pair]
        return tio.Pad(padding, padding_mode=0)(subject)


def preprocessing(normalization: str, min_shape: Sequence[int] | None = None) -> tio.Compose:
    """Intensity normalisation of ``image`` (``zscore`` per subject, as nnU-Net for MRI)."""
    if normalization not in NORMALISATIONS:
        raise ValueError(f"data.normalization must be one of {NORMALISATIONS}, got {normalization!r}")
    transforms: list[tio.Transform] = []
    if normalization == "zscore":
        transforms.append(tio.ZNormalization(include=["image"]))
    if min_shape is not None:
        transforms.append(PadToAtLeast(min_shape))
    return tio.Compose(transforms)


def augmentation(transforms: Mapping[str, tio.Transform | None] | None) -> tio.Compose:
    """Compose the configured augmentations in config order; ``None`` entries are skipped."""
    return tio.Compose([t for t in (transforms or {}).values() if t is not None])
