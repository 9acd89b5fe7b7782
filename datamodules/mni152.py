"""``data=mni152``: real anatomy with real label uncertainty, offline.

nilearn ships the ICBM 2009 MNI152 T1 template with grey- and white-matter probability maps
(1 mm). Each subject is the template under a random smooth deformation (affine + elastic)
with random bias field, gamma and noise, and its label is *drawn* voxel by voxel from the
deformed tissue probabilities: the probability map is the inherent uncertainty, so the
expected volume ``Σ p × voxel volume`` of every subject is known exactly, as for the
synthetic data.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torchio as tio

from biasseg.errors import InputError
from datamodules.cases import Case, in_memory_case
from datamodules.segmentation import SegmentationDataModule

TISSUES = ("grey_matter", "white_matter")


@lru_cache(maxsize=4)
def template(resolution_mm: float, tissues: tuple[str, ...]) -> tio.Subject:
    """The T1 template (``image``) and tissue probabilities (``probabilities``, one channel per
    tissue) at ``resolution_mm``, cropped to the brain with a 4-voxel margin."""
    try:
        from nilearn import datasets
    except ImportError as error:  # a clear message instead of a bare ImportError
        raise ImportError("data=mni152 needs nilearn, which ships the MNI152 template: pip install nilearn") from error
    loaders = {"grey_matter": datasets.load_mni152_gm_template, "white_matter": datasets.load_mni152_wm_template}
    t1 = datasets.load_mni152_template(resolution=1)
    maps = np.stack([np.asarray(loaders[t](resolution=1).get_fdata(), dtype=np.float32) for t in tissues])
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=np.asarray(t1.get_fdata(), dtype=np.float32)[None], affine=t1.affine),
        probabilities=tio.ScalarImage(tensor=np.clip(maps, 0, 1), affine=t1.affine),
    )
    subject = tio.Resample(float(resolution_mm))(subject)
    brain = (subject["image"].data[0] > 0) | (subject["probabilities"].data.sum(0) > 0)
    lower = [int(torch.nonzero(brain.any(dim=tuple(a for a in range(3) if a != axis)))[0]) for axis in range(3)]
    upper = [int(torch.nonzero(brain.any(dim=tuple(a for a in range(3) if a != axis)))[-1]) for axis in range(3)]
    margin = 4
    bounds = []
    for axis, (lo, hi) in enumerate(zip(lower, upper)):
        bounds += [max(0, lo - margin), max(0, brain.shape[axis] - 1 - hi - margin)]
    return tio.Crop(tuple(bounds))(subject)


def draw_labels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per voxel: class 0 with ``1 − Σ p``, class ``k`` with ``p[k − 1]``."""
    background = 1 - probabilities.sum(0, keepdims=True)
    thresholds = np.cumsum(np.concatenate([background, probabilities[:-1]]), axis=0)  # upper edge of classes 0 … K − 1
    return (rng.random(probabilities.shape[1:])[None] >= thresholds).sum(0).astype(np.uint8)


class MNI152DataModule(SegmentationDataModule):
    """Deformed MNI152 subjects with labels drawn from the tissue probability maps.

    Args:
        num_train, num_val: subjects per split.
        tissues: foreground classes, in order (``grey_matter``, ``white_matter``).
        resolution_mm: isotropic voxel size the template is resampled to.
        degrees, scales: random affine (TorchIO ``RandomAffine``) per subject.
        max_displacement_mm: random elastic deformation per subject.
        bias_field: random bias-field coefficients (TorchIO ``RandomBiasField``).
        noise_std: image noise, relative to the template's intensity range.
        seed: data seed, independent of the training seed.
        **loader: :class:`SegmentationDataModule` arguments.
    """

    def __init__(
        self,
        num_train: int = 12,
        num_val: int = 4,
        tissues: Sequence[str] = ("grey_matter",),
        resolution_mm: float = 2.0,
        degrees: float = 5.0,
        scales: float = 0.05,
        max_displacement_mm: float = 6.0,
        bias_field: float = 0.3,
        noise_std: float = 0.03,
        seed: int = 0,
        **loader,
    ) -> None:
        super().__init__(**loader)
        unknown = sorted(set(tissues) - set(TISSUES))
        if unknown or not tissues or len(set(tissues)) != len(tissues):
            raise InputError(f"data.tissues must be distinct names from {TISSUES}, got {list(tissues)}")
        self.num_train, self.num_val = int(num_train), int(num_val)
        self.tissues = tuple(tissues)
        self.resolution_mm = float(resolution_mm)
        self.deformation = tio.Compose([
            tio.RandomAffine(scales=scales, degrees=degrees),
            tio.RandomElasticDeformation(max_displacement=max_displacement_mm),
        ])
        self.appearance = tio.Compose([
            tio.RandomBiasField(coefficients=bias_field),
            tio.RandomGamma(log_gamma=0.2),
        ])
        self.noise_std = float(noise_std)
        self.seed = int(seed)

    @property
    def num_classes(self) -> int:
        return len(self.tissues) + 1

    @property
    def in_channels(self) -> int:
        return 1

    @property
    def class_names(self) -> list[str]:
        return list(self.tissues)

    def inference_settings(self) -> dict:
        return {**super().inference_settings(), "target_spacing": [self.resolution_mm] * 3}

    def generate(self, index: int) -> Case:
        """Subject ``index`` (training first, then validation), seeded by ``(seed, index)``."""
        rng = np.random.default_rng([self.seed, index])
        base = template(self.resolution_mm, self.tissues)  # built (once) outside the seeded block: it draws too
        with torch.random.fork_rng(devices=[]):  # TorchIO draws from torch's global generator
            torch.manual_seed(int(rng.integers(2**63)))
            subject = self.deformation(base)
            image = self.appearance(subject["image"]).data.numpy()
        tissues = np.clip(subject["probabilities"].data.numpy(), 0, 1)
        tissues /= np.maximum(tissues.sum(0, keepdims=True), 1)  # tissues never exceed 1 in total
        image = image / max(float(image.max()), 1e-6)
        image = image + rng.normal(0, self.noise_std, image.shape).astype(np.float32)
        voxel_ml = float(np.prod(subject["image"].spacing)) / 1000
        return in_memory_case(
            f"mni152_{index:03d}",
            image,
            draw_labels(tissues, rng),
            subject["image"].affine,
            self.num_classes,
            expected_volume_ml=[float(p.sum(dtype=np.float64) * voxel_ml) for p in tissues],
            seed=index,
            probabilities=np.concatenate([1 - tissues.sum(0, keepdims=True), tissues]),
        )

    def load_cases(self) -> tuple[list[Case], list[Case]]:
        cases = [self.generate(i) for i in range(self.num_train + self.num_val)]
        return cases[: self.num_train], cases[self.num_train :]
