"""Training augmentation: the configured TorchIO transforms, applied per patch in config order."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torchio as tio

# Transforms that resample the patch and so pull in voxels from outside it: they run on the
# patch with its context margin, everything after the last of them on the exact patch.
RESAMPLING = (tio.RandomAffine, tio.RandomElasticDeformation, tio.RandomAffineElasticDeformation, tio.RandomAnisotropy)


def augmentation(transforms: Mapping[str, tio.Transform | None] | None) -> list[tio.Transform]:
    """The configured augmentations in config order; ``None`` entries are skipped."""
    return [t for t in (transforms or {}).values() if t is not None]


class PatchAugmentation:
    """The configured transforms, run on one patch; resampling ones get context only when drawn.

    A resampling transform (affine, elastic, …) pulls in voxels from outside the patch, so
    when it is applied the patch is read with a context margin and cropped right after the
    last resampling transform. Whether each one is applied is drawn here, with its configured
    probability ``p``, from the patch's own generator (the transform then runs with p = 1):
    the same distribution as TorchIO's, but patches that draw no resampling transform (80 %
    with the defaults) skip the margin altogether.

    TorchIO also deep-copies the subject in every transform by default; a training patch is a
    fresh tensor nobody else holds, so the copies are switched off (they cost about a quarter
    of a patch's time).
    """

    def __init__(self, transforms: Sequence[tio.Transform]) -> None:
        self.transforms = copy.deepcopy(list(transforms))  # the settings below must not leak to the caller's
        self.probability = [float(t.probability) for t in self.transforms]
        for transform in self.transforms:
            transform.copy = False
            if isinstance(transform, RESAMPLING):
                transform.probability = 1.0

    def draw(self, rng) -> list[tio.Transform]:
        """This patch's resampling transforms that fire, and all the others, in order."""
        return [
            t for t, p in zip(self.transforms, self.probability)
            if not isinstance(t, RESAMPLING) or rng.random() < p
        ]

    @staticmethod
    def split(chosen: Sequence[tio.Transform]) -> tuple[list[tio.Transform], list[tio.Transform]]:
        """``(with_context, after_crop)``: up to the last resampling transform, and the rest."""
        cut = max((i + 1 for i, t in enumerate(chosen) if isinstance(t, RESAMPLING)), default=0)
        return list(chosen[:cut]), list(chosen[cut:])
