"""Training augmentation: the configured TorchIO transforms, applied per patch in config order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torchio as tio

# Transforms that resample the patch and so pull in voxels from outside it: they run on the
# patch with its context margin, everything after the last of them on the exact patch.
RESAMPLING = (tio.RandomAffine, tio.RandomElasticDeformation, tio.RandomAffineElasticDeformation, tio.RandomAnisotropy)


def augmentation(transforms: Mapping[str, tio.Transform | None] | None) -> list[tio.Transform]:
    """The configured augmentations in config order; ``None`` entries are skipped."""
    return [t for t in (transforms or {}).values() if t is not None]


def split_at_last_resampling(transforms: Sequence[tio.Transform]) -> tuple[tio.Compose | None, tio.Compose | None]:
    """``(with_context, after_crop)``: the transforms up to the last resampling one, and the rest.

    TorchIO deep-copies the subject in every transform by default; a training patch is a
    fresh tensor nobody else holds, so the copies are switched off (they cost about a
    quarter of a patch's time).
    """
    for transform in transforms:
        transform.copy = False
    cut = max((i + 1 for i, t in enumerate(transforms) if isinstance(t, RESAMPLING)), default=0)
    first, rest = list(transforms[:cut]), list(transforms[cut:])
    return (tio.Compose(first, copy=False) if first else None, tio.Compose(rest, copy=False) if rest else None)
