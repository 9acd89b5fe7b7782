"""Synthetic 3D volumes whose labels carry a known amount of inherent uncertainty.

Each case holds spheres ("structures") of random radius in a volume with
anisotropic spacing. The image shows every structure at its true radius ``r`` with a blurred
edge; the label is one draw from the uncertainty model, whose per-voxel foreground
probability ``q`` is known in closed form, so the expected volume ``Σ q × voxel volume``
is known exactly.

Uncertainty kinds (``sigma`` in mm is the amount; 0 means a deterministic label):

* ``boundary``: the rater's boundary is shifted per structure, ``r + δ`` with
  ``δ ~ N(0, sigma²)``; hence ``q(x) = Φ((r − d(x)) / sigma)`` with ``d`` the distance to the
  centre, and neighbouring voxels are perfectly correlated.
* ``voxel``: every voxel is labelled independently, foreground with probability
  ``q(x) = Φ((r − d(x)) / sigma)``.

Conventions: arrays are ``(W, H, D)`` in TorchIO's (x, y, z) voxel order, spacing in mm,
volumes in ml (1 ml = 1000 mm³).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from biasseg.errors import InputError

UNCERTAINTY_KINDS = ("boundary", "voxel")


@dataclass(frozen=True)
class Structure:
    """A sphere: centre in mm, true radius in mm, class index (>= 1)."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    label: int


@dataclass
class SyntheticCase:
    """One generated subject.

    ``image`` float32 ``(W, H, D)``; ``label`` int64 ``(W, H, D)``; ``probabilities``
    float32 ``(C, W, H, D)`` = ``q`` per class (background first); ``sigma_mm`` and ``kind``
    the uncertainty model the label was drawn from.
    """

    image: np.ndarray
    label: np.ndarray
    probabilities: np.ndarray
    spacing_mm: tuple[float, float, float]
    structures: list[Structure]
    sigma_mm: float
    kind: str

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def expected_volume_ml(self) -> np.ndarray:
        """``Σ q × voxel volume`` per foreground class, shape ``(C − 1,)``."""
        return self.probabilities[1:].reshape(len(self.probabilities) - 1, -1).sum(1) * self.voxel_volume_ml

    def draw_labels(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` further label draws from the same uncertainty model, ``(count, W, H, D)``."""
        distances = structure_distances(self.label.shape, self.spacing_mm, self.structures)
        return np.stack([sample_label(rng, distances, self.structures, self.sigma_mm, self.kind) for _ in range(count)])


def distances_mm(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], centre_mm) -> np.ndarray:
    """Euclidean distance in mm from each voxel centre to ``centre_mm``; shape ``shape``."""
    axes = [np.arange(n, dtype=np.float32) * s - c for n, s, c in zip(shape, spacing_mm, centre_mm)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(x * x + y * y + z * z)


def foreground_probability(distance_mm: np.ndarray, radius_mm: float, sigma_mm: float) -> np.ndarray:
    """``q = Φ((r − d) / σ)``; the hard sphere ``d < r`` when ``σ = 0``."""
    if sigma_mm <= 0:
        return (distance_mm < radius_mm).astype(np.float32)
    return ndtr((radius_mm - distance_mm) / sigma_mm).astype(np.float32)


def place_structures(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    num_structures: int,
    radius_mm: tuple[float, float],
    num_classes: int,
    sigma_mm: float,
    gap_mm: float | None = None,
) -> list[Structure]:
    """Non-overlapping spheres fully inside the field of view (rejection sampling), at least
    ``gap_mm`` apart surface to surface (None: ``4 sigma + 2`` mm, so their q barely overlap)."""
    extent = np.array(shape) * np.array(spacing_mm)
    margin = sigma_mm + 1.0  # to the field of view's edge; q's tails beyond it are cut off
    gap = 4.0 * sigma_mm + 2.0 if gap_mm is None else float(gap_mm)
    structures: list[Structure] = []
    for _ in range(200 * max(num_structures, 1)):
        if len(structures) == num_structures:
            break
        radius = float(rng.uniform(*radius_mm))
        low, high = radius + margin, extent - radius - margin
        if np.any(high <= low):
            continue
        centre = rng.uniform(low, high)
        if all(
            np.linalg.norm(centre - np.array(s.centre_mm)) > radius + s.radius_mm + gap for s in structures
        ):
            label = 1 + len(structures) % (num_classes - 1)
            structures.append(Structure(tuple(float(c) for c in centre), radius, label))
    if not structures:
        raise InputError(
            f"no structure of radius {radius_mm} mm fits a volume of {tuple(extent)} mm; "
            "reduce data.radius_mm or enlarge data.shape"
        )
    return structures


def structure_distances(shape: tuple[int, int, int], spacing_mm, structures: list[Structure]) -> np.ndarray:
    """Distance in mm from every voxel to each structure's centre, shape ``(K, W, H, D)``."""
    return np.stack([distances_mm(shape, spacing_mm, s.centre_mm) for s in structures])


def structure_probabilities(distances: np.ndarray, structures: list[Structure], sigma_mm: float) -> np.ndarray:
    """``q`` per structure, shape ``(K, W, H, D)``, from :func:`structure_distances`."""
    return np.stack([foreground_probability(d, s.radius_mm, sigma_mm) for d, s in zip(distances, structures)])


def sample_label(
    rng: np.random.Generator,
    distances: np.ndarray,
    structures: list[Structure],
    sigma_mm: float,
    kind: str,
) -> np.ndarray:
    """One draw of the label map (int64, ``(W, H, D)``) under the uncertainty model.

    ``distances`` is :func:`structure_distances` of the case (computed once, reused per draw).
    """
    if kind not in UNCERTAINTY_KINDS:
        raise InputError(f"unknown uncertainty kind {kind!r}; choose one of {UNCERTAINTY_KINDS}")
    shape = distances.shape[1:]
    label = np.zeros(shape, dtype=np.int64)
    if kind == "boundary":
        for d, s in zip(distances, structures):
            shift = rng.normal(0.0, sigma_mm) if sigma_mm > 0 else 0.0
            label[d < s.radius_mm + shift] = s.label
        return label
    u = rng.random(shape, dtype=np.float32)
    cumulative = np.zeros(shape, dtype=np.float32)
    for s, q_s in zip(structures, structure_probabilities(distances, structures, sigma_mm)):
        inside = (u >= cumulative) & (u < cumulative + q_s)
        label[inside] = s.label
        cumulative += q_s
    return label


def generate_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (64, 64, 32),
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 2.0),
    num_structures: int = 2,
    radius_mm: tuple[float, float] = (6.0, 14.0),
    num_classes: int = 2,
    sigma_mm: float = 1.0,
    kind: str = "boundary",
    noise_std: float = 0.1,
    image_blur_mm: float = 0.5,
    gap_mm: float | None = None,
) -> SyntheticCase:
    """Generate one case (see module docstring).

    The image edge is blurred with ``sqrt(sigma² + image_blur²)`` (partial volume plus the
    ill-defined boundary), class ``c`` has intensity ``c`` before a random per-subject gain
    and offset, and white Gaussian noise of ``noise_std`` is added.
    """
    if num_classes < 2:
        raise InputError("num_classes must be >= 2 (background + at least one structure)")
    if sigma_mm < 0:
        raise InputError("the uncertainty sigma must be >= 0 mm")
    shape = tuple(int(s) for s in shape)
    spacing_mm = tuple(float(s) for s in spacing_mm)
    structures = place_structures(rng, shape, spacing_mm, num_structures, radius_mm, num_classes, sigma_mm, gap_mm)
    distances = structure_distances(shape, spacing_mm, structures)
    q = structure_probabilities(distances, structures, sigma_mm)
    edge = float(np.hypot(sigma_mm, image_blur_mm))
    image = np.zeros(shape, dtype=np.float32)
    for d, s in zip(distances, structures):
        image += s.label * foreground_probability(d, s.radius_mm, edge)
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2)
    image = gain * image + offset + rng.normal(0.0, noise_std, shape).astype(np.float32)
    label = sample_label(rng, distances, structures, sigma_mm, kind)
    probabilities = np.zeros((num_classes, *shape), dtype=np.float32)
    for s, q_s in zip(structures, q):
        probabilities[s.label] += q_s
    probabilities[1:] = np.clip(probabilities[1:], 0.0, 1.0)
    probabilities[0] = np.clip(1.0 - probabilities[1:].sum(0), 0.0, 1.0)
    return SyntheticCase(image.astype(np.float32), label, probabilities, spacing_mm, structures, sigma_mm, kind)
