"""An image reduced to groups of exchangeable voxels, with label draws counted per group.

A loss's expected value under label uncertainty depends on the voxels only through sums,
and voxels that share their foreground probability ``q`` and their joint behaviour across
label draws are exchangeable: the optimum gives them one prediction. So an image becomes
groups ``g`` with voxel count ``n_g``, mean foreground probability ``q_g`` and, per label draw
``m``, the group's foreground count ``k_mg``. Binary: one foreground class.

Uncertainty kinds (as :mod:`datamodules.synthetic_volumes`):

* ``voxel`` (independent voxels; any probability map, e.g. MNI152 grey matter): groups are
  equal-width bins of ``q``; ``k_mg ~ Binomial(n_g, q_g)`` (the exact count is
  Poisson-binomial over the bin's ``q``; the bins are narrow), drawn as a Latin hypercube
  (the ``M`` quantiles ``(m + ½) / M`` of each group's binomial, permuted independently per
  group): the expected loss then hardly depends on the seed.
* ``boundary`` (each sphere's radius shifted per draw by ``δ ~ N(0, σ²)``): groups are thin
  distance shells per structure (equal-width bins of ``z = (r − d) / σ``, i.e. in mm);
  ``k_mg`` counts the shell's voxels with ``d < r + δ_m`` exactly. The shifts are a Latin
  hypercube too (the ``M`` quantiles of ``N(0, σ²)``, permuted per structure), so for one
  structure the expectation is a quadrature, not Monte Carlo.

Voxels with ``|z| > CERTAIN_Z`` (``q < 3·10⁻⁷`` or ``q > 1 − 3·10⁻⁷``) form two fixed groups
whose prediction is held at ``q``: the optimum of every modelled loss, to within that ``q``.

Conventions: distances and radii in mm, volumes in ml (1 ml = 1000 mm³).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import binom

from datamodules.synthetic_volumes import UNCERTAINTY_KINDS, SyntheticCase, distances_mm, structure_distances

CERTAIN_Z = 5.0  # |Φ⁻¹(q)| beyond which a voxel's label is taken as certain (held at q)


@dataclass(frozen=True)
class VoxelGroups:
    """One image as exchangeable voxel groups.

    ``counts`` ``(G,)`` voxels per group; ``probability`` ``(G,)`` their mean foreground
    probability ``q_g``; ``draws`` ``(M, G)`` foreground voxels per group in each label draw;
    ``free`` ``(G,)`` groups whose prediction is optimised (the others are held at ``q_g``);
    ``voxel_ml`` one voxel's volume in ml; ``part`` ``(G,)`` the part a free group was built
    from (``boundary``: its structure's index; ``voxel``: 0) and −1 for the certain groups.
    """

    counts: np.ndarray
    probability: np.ndarray
    draws: np.ndarray
    free: np.ndarray
    voxel_ml: float
    part: np.ndarray

    @property
    def num_voxels(self) -> float:
        return float(self.counts.sum())

    def expected_volume_ml(self) -> float:
        """``Σ q × voxel volume``: the mean volume over the label's distribution."""
        return float(self.counts @ self.probability) * self.voxel_ml


def soft_target(groups: VoxelGroups, copies: int) -> VoxelGroups:
    """The groups with the label's probabilities as a deterministic target (``data.label_mode
    = soft``): ``copies`` identical draws ``k_g = n_g q_g``."""
    return replace(groups, draws=np.tile(groups.counts * groups.probability, (int(copies), 1)))


def fixed_groups(q: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, probability, draw)`` of the two certain groups, the voxels with ``z`` below
    and above ``[−CERTAIN_Z, CERTAIN_Z]``; a certain group's draw is its rounded total ``Σ q``."""
    low, high = q[z < -CERTAIN_Z], q[z > CERTAIN_Z]
    counts = np.array([low.size, high.size], dtype=np.float64)
    totals = np.array([low.sum(dtype=np.float64), high.sum(dtype=np.float64)])
    probability = np.divide(totals, counts, out=np.zeros(2), where=counts > 0)
    return counts, probability, np.round(totals)


def assemble(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], fixed, voxel_ml: float) -> VoxelGroups:
    """:class:`VoxelGroups` from free parts ``(counts, probability, draws (M, G))`` (part ``i``'s
    groups get ``part`` ``i``) and the fixed groups of :func:`fixed_groups` (their draws
    repeated); empty groups dropped."""
    num_draws = parts[0][2].shape[0]
    fixed_counts, fixed_probability, fixed_totals = fixed
    counts = np.concatenate([fixed_counts, *(c for c, _, _ in parts)])
    probability = np.concatenate([fixed_probability, *(q for _, q, _ in parts)])
    draws = np.concatenate([np.tile(fixed_totals, (num_draws, 1)), *(k for _, _, k in parts)], axis=1)
    part = np.concatenate([[-1, -1], *(np.full(len(c), i) for i, (c, _, _) in enumerate(parts))]).astype(np.int64)
    free = part >= 0
    keep = counts > 0
    return VoxelGroups(counts[keep], probability[keep], draws[:, keep].astype(np.float64), free[keep], float(voxel_ml),
                       part[keep])


def probability_map_groups(
    q: np.ndarray, voxel_ml: float, num_draws: int, rng: np.random.Generator, bins: int = 400
) -> VoxelGroups:
    """``voxel`` kind: any foreground probability map ``q`` (voxels labelled independently)."""
    q = np.asarray(q, dtype=np.float64).ravel()
    z = ndtri(np.clip(q, 0.0, 1.0))
    uncertain = np.abs(z) <= CERTAIN_Z
    edges = np.linspace(ndtr(-CERTAIN_Z), ndtr(CERTAIN_Z), bins + 1)
    index = np.clip(np.digitize(q[uncertain], edges) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    sums = np.bincount(index, weights=q[uncertain], minlength=bins)
    counts, probability = counts[counts > 0], sums[counts > 0] / counts[counts > 0]
    draws = latin_binomial(counts, probability, num_draws, rng)
    return assemble([(counts, probability, draws)], fixed_groups(q, z), voxel_ml)


def latin_binomial(counts: np.ndarray, probability: np.ndarray, num_draws: int, rng: np.random.Generator) -> np.ndarray:
    """``(M, G)`` draws of ``Binomial(n_g, q_g)`` per group, a Latin hypercube: the quantiles
    at ``(m + ½) / M`` of each group's binomial, permuted independently per group."""
    levels = (rng.permuted(np.tile(np.arange(num_draws), (len(counts), 1)), axis=1).T + 0.5) / num_draws
    return binom.ppf(levels, counts, probability)


def latin_shifts(num_draws: int, num_structures: int, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """``(M, K)`` radius shifts: the quantiles ``σ Φ⁻¹((m + ½) / M)``, permuted per structure."""
    quantiles = sigma_mm * ndtri((np.arange(num_draws) + 0.5) / num_draws)
    return np.stack([rng.permutation(quantiles) for _ in range(num_structures)], axis=1)


def nearest_surface(distances: np.ndarray, radii_mm: np.ndarray, sigma_mm: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``boundary`` kind, per voxel (flattened): ``owner`` the structure whose surface is
    nearest, ``d`` the distance (mm) to its centre, ``z = (r − d) / σ`` and ``q = Φ(z)`` (±∞ and
    0/1 at σ = 0). ``distances`` ``(K, …)`` as :func:`boundary_groups`."""
    distances = np.asarray(distances, dtype=np.float64).reshape(len(radii_mm), -1)
    owner = np.argmin(distances - radii_mm[:, None], axis=0)
    d = distances[owner, np.arange(distances.shape[1])]
    r = radii_mm[owner]
    if sigma_mm > 0:
        z = (r - d) / sigma_mm
        return owner, d, z, ndtr(z)
    return owner, d, np.where(d < r, np.inf, -np.inf), (d < r).astype(np.float64)


def boundary_groups(
    distances: np.ndarray,
    radii_mm: Sequence[float],
    sigma_mm: float,
    voxel_ml: float,
    num_draws: int,
    rng: np.random.Generator,
    bins: int = 400,
) -> VoxelGroups:
    """``boundary`` kind: spheres of ``radii_mm`` whose radius shifts by ``δ ~ N(0, σ²)``
    per structure and draw. ``distances`` ``(K, …)`` in mm from each voxel to each centre
    (:func:`datamodules.synthetic_volumes.structure_distances`); a voxel belongs to the
    structure whose surface is nearest, and only that one's shift moves its label (the
    generator keeps 4σ + 2 mm between surfaces, so the shells' tails barely overlap)."""
    radii = np.asarray(radii_mm, dtype=np.float64)
    owner, d, z, q = nearest_surface(distances, radii, sigma_mm)
    shifts = latin_shifts(num_draws, len(radii), sigma_mm, rng)
    edges = np.linspace(-CERTAIN_Z, CERTAIN_Z, bins + 1)
    parts = []
    for s in range(len(radii)):
        mine = (owner == s) & (np.abs(z) <= CERTAIN_Z)
        if not mine.any():  # kept empty, so that part s is structure s
            parts.append((np.zeros(0), np.zeros(0), np.zeros((num_draws, 0))))
            continue
        order = np.argsort(d[mine], kind="stable")
        d_sorted, q_sorted = d[mine][order], q[mine][order]
        index = np.clip(np.digitize(z[mine][order], edges) - 1, 0, bins - 1)  # non-increasing along d_sorted
        starts = np.flatnonzero(np.r_[True, np.diff(index) != 0])
        counts = np.diff(np.r_[starts, len(d_sorted)]).astype(np.float64)
        probability = np.add.reduceat(q_sorted, starts) / counts
        inside = np.searchsorted(d_sorted, radii[s] + shifts[:, s], side="left")  # voxels with d < r + δ
        draws = np.clip(inside[:, None] - starts[None, :], 0, counts[None, :])
        parts.append((counts, probability, draws))
    if not parts:  # no structures
        parts.append((np.zeros(0), np.zeros(0), np.zeros((num_draws, 0))))
    return assemble(parts, fixed_groups(q, z), voxel_ml)


def case_groups(case: SyntheticCase, num_draws: int, rng: np.random.Generator, bins: int = 400) -> VoxelGroups:
    """The groups of a generated synthetic case (one foreground class), by its uncertainty kind."""
    if len(case.probabilities) != 2:
        raise ValueError(f"the theory is binary; this case has {len(case.probabilities) - 1} foreground classes")
    if case.kind == "voxel":
        return probability_map_groups(case.probabilities[1], case.voxel_volume_ml, num_draws, rng, bins)
    distances = structure_distances(case.label.shape, case.spacing_mm, case.structures)
    radii = [s.radius_mm for s in case.structures]
    return boundary_groups(distances, radii, case.sigma_mm, case.voxel_volume_ml, num_draws, rng, bins)


def sphere_groups(
    radius_mm: float,
    sigma_mm: float,
    kind: str,
    spacing_mm: Sequence[float],
    field_of_view_mm: float | Sequence[float],
    num_draws: int,
    rng: np.random.Generator,
    bins: int = 400,
) -> VoxelGroups:
    """One sphere of ``radius_mm`` in an image of ``field_of_view_mm`` (a cube's side, or three
    sides; the image the loss sees: it sets the voxel count that cross-entropy averages over),
    sampled on a grid of ``spacing_mm``, with uncertainty ``sigma_mm`` of ``kind`` (see the
    module docstring). The centre is the image's, shifted by a random fraction of a voxel
    (from ``rng``), so that voxels do not share distances by symmetry and the optimum does not
    jump shell by shell."""
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"unknown uncertainty kind {kind!r}; choose one of {UNCERTAINTY_KINDS}")
    spacing = tuple(float(s) for s in spacing_mm)
    sides = np.broadcast_to(np.asarray(field_of_view_mm, dtype=np.float64), (3,))
    shape = tuple(max(1, round(side / s)) for side, s in zip(sides, spacing))
    centre = tuple((n - 1) * s / 2 + rng.uniform(-0.5, 0.5) * s for n, s in zip(shape, spacing))
    distance = distances_mm(shape, spacing, centre).astype(np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if kind == "voxel":
        q = ndtr((radius_mm - distance) / sigma_mm) if sigma_mm > 0 else (distance < radius_mm).astype(np.float64)
        return probability_map_groups(q, voxel_ml, num_draws, rng, bins)
    return boundary_groups(distance[None], [radius_mm], sigma_mm, voxel_ml, num_draws, rng, bins)
