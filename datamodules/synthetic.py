"""``data=synthetic``: generated volumes with a known amount of label uncertainty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from biasseg.errors import InputError
from datamodules.cases import Case, in_memory_case
from datamodules.segmentation import SegmentationDataModule
from datamodules.synthetic_volumes import (
    UNCERTAINTY_KINDS,
    SyntheticCase,
    generate_case,
    sample_label,
    structure_distances,
)


def synthetic_case(case: SyntheticCase, name: str, num_classes: int, raters: np.ndarray | None = None) -> Case:
    """The generated arrays as a :class:`Case`, with their known expected volumes; with
    ``raters`` ``(R, W, H, D)``, a multi-rater case (majority vote, rater mean, mean rater volume)."""
    if raters is not None:
        return in_memory_case(name, case.image[None], None, np.diag([*case.spacing_mm, 1.0]), num_classes, raters=raters)
    return in_memory_case(
        name,
        case.image[None],
        case.label,
        np.diag([*case.spacing_mm, 1.0]),
        num_classes,
        expected_volume_ml=[float(v) for v in case.expected_volume_ml()],
        probabilities=case.probabilities,
    )


class SyntheticDataModule(SegmentationDataModule):
    """Seeded synthetic subjects generated in memory at setup; nothing is downloaded.

    Args:
        num_train, num_val: subjects per split.
        shape: volume size in voxels ``(W, H, D)``.
        spacing_mm: voxel spacing in mm (anisotropic by default).
        num_structures: spheres per subject.
        radius_mm: range of the spheres' true radius in mm.
        num_classes: classes including background (structures cycle through 1..C−1).
        uncertainty: label uncertainty sigma in mm (0 = none).
        uncertainty_kind: ``"boundary"`` (per-structure shift) or ``"voxel"`` (independent).
        noise_std: image noise relative to a contrast of 1.
        structure_gap_mm: least surface-to-surface distance between two spheres in mm (None: 4 × uncertainty + 2).
        raters: annotations per subject (0 = one label, as from one rater). Rater ``k`` draws
            its label from the same uncertainty model around spheres whose radius is shifted by
            ``rater_offsets_mm[k]`` (cycled): one over-segments, one under-segments, one draws
            around the truth.
        rater_offsets_mm: each rater's systematic radius offset in mm.
        seed: data seed, independent of the training seed so runs compare on the same subjects.
        **loader: :class:`SegmentationDataModule` arguments.
    """

    def __init__(
        self,
        num_train: int = 16,
        num_val: int = 6,
        shape: Sequence[int] = (64, 64, 32),
        spacing_mm: Sequence[float] = (1.0, 1.0, 2.0),
        num_structures: int = 2,
        radius_mm: Sequence[float] = (6.0, 14.0),
        num_classes: int = 2,
        uncertainty: float = 1.0,
        uncertainty_kind: str = "boundary",
        noise_std: float = 0.1,
        structure_gap_mm: float | None = None,
        raters: int = 0,
        rater_offsets_mm: Sequence[float] = (1.5, -1.5, 0.0),
        seed: int = 0,
        **loader,
    ) -> None:
        super().__init__(**loader)
        if uncertainty_kind not in UNCERTAINTY_KINDS:
            raise InputError(f"data.uncertainty_kind must be one of {UNCERTAINTY_KINDS}, got {uncertainty_kind!r}")
        if num_classes < 2:
            raise InputError(f"data.num_classes must be >= 2, got {num_classes}")
        self.num_train, self.num_val = int(num_train), int(num_val)
        self.case_kwargs = dict(
            shape=tuple(int(s) for s in shape),
            spacing_mm=tuple(float(s) for s in spacing_mm),
            num_structures=int(num_structures),
            radius_mm=(float(radius_mm[0]), float(radius_mm[1])),
            num_classes=int(num_classes),
            sigma_mm=float(uncertainty),
            kind=uncertainty_kind,
            noise_std=float(noise_std),
            gap_mm=None if structure_gap_mm is None else float(structure_gap_mm),
        )
        if int(raters) < 0 or (int(raters) > 0 and not rater_offsets_mm):
            raise InputError(f"data.raters must be >= 0 and needs data.rater_offsets_mm, got {raters} and {list(rater_offsets_mm)}")
        self.raters = int(raters)
        self.rater_offsets_mm = [float(o) for o in rater_offsets_mm]
        self.seed = int(seed)

    @property
    def num_raters(self) -> int:
        return self.raters

    @property
    def num_classes(self) -> int:
        return self.case_kwargs["num_classes"]

    @property
    def in_channels(self) -> int:
        return 1

    @property
    def class_names(self) -> list[str]:
        return [f"structure{c}" for c in range(1, self.num_classes)]

    def inference_settings(self) -> dict:
        return {**super().inference_settings(), "target_spacing": list(self.case_kwargs["spacing_mm"])}

    def generate(self, index: int) -> SyntheticCase:
        """Case ``index`` (training cases first, then validation), seeded by ``(seed, index)``."""
        return generate_case(np.random.default_rng([self.seed, index]), **self.case_kwargs)

    def rater_labels(self, case: SyntheticCase, index: int) -> np.ndarray | None:
        """``(R, W, H, D)`` labels of the case's raters (seeded by ``(seed, index, "raters")``), or None."""
        if not self.raters:
            return None
        rng = np.random.default_rng([self.seed, index, 1])
        distances = structure_distances(case.label.shape, case.spacing_mm, case.structures)
        labels = []
        for k in range(self.raters):
            offset = self.rater_offsets_mm[k % len(self.rater_offsets_mm)]
            shifted = [replace(s, radius_mm=max(s.radius_mm + offset, 0.0)) for s in case.structures]
            labels.append(sample_label(rng, distances, shifted, case.sigma_mm, case.kind))
        return np.stack(labels)

    def load_cases(self) -> tuple[list[Case], list[Case]]:
        cases = []
        for i in range(self.num_train + self.num_val):
            generated = self.generate(i)
            cases.append(synthetic_case(generated, f"synthetic_{i:03d}", self.num_classes, self.rater_labels(generated, i)))
        return cases[: self.num_train], cases[self.num_train :]
