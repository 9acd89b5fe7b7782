"""Synthetic volumes: known probability maps, expected volumes and both uncertainty kinds."""

import numpy as np
import pytest

from datamodules.synthetic_volumes import (
    Structure,
    generate_case,
    sample_label,
    structure_distances,
    structure_probabilities,
)

SHAPE, SPACING = (24, 24, 12), (1.0, 1.0, 2.0)
STRUCTURE = [Structure((12.0, 12.0, 12.0), 6.0, 1)]
DISTANCES = structure_distances(SHAPE, SPACING, STRUCTURE)


def test_without_uncertainty_the_label_is_the_sphere():
    case = generate_case(np.random.default_rng(0), SHAPE, SPACING, 1, (5.0, 7.0), sigma_mm=0.0)
    q = case.probabilities[1]
    assert set(np.unique(q)) <= {0.0, 1.0}
    np.testing.assert_array_equal(case.label, q.astype(np.int64))
    assert case.expected_volume_ml()[0] == pytest.approx(case.label.sum() * 0.002)


@pytest.mark.parametrize("kind", ["boundary", "voxel"])
def test_label_frequency_matches_q(kind):
    rng = np.random.default_rng(1)
    sigma = 1.5
    q = structure_probabilities(DISTANCES, STRUCTURE, sigma)[0]
    draws = np.stack([sample_label(rng, DISTANCES, STRUCTURE, sigma, kind) for _ in range(2000)])
    frequency = draws.mean(0)
    assert np.abs(frequency - q).max() < 0.1
    # the mean drawn volume is the expected volume Σ q
    assert draws.sum((1, 2, 3)).mean() == pytest.approx(q.sum(), rel=0.04)  # boundary: ~1.7 % standard error


def test_kinds_differ_in_correlation():
    rng = np.random.default_rng(2)
    boundary = sample_label(rng, DISTANCES, STRUCTURE, 2.0, "boundary")
    voxel = sample_label(rng, DISTANCES, STRUCTURE, 2.0, "voxel")
    # a boundary draw is a ball (no holes); a voxel draw is speckled near the edge
    q = structure_probabilities(DISTANCES, STRUCTURE, 2.0)[0]
    band = (q > 0.2) & (q < 0.8)
    radii = np.sqrt(sum(((np.indices(SHAPE)[i] * SPACING[i]) - 12.0) ** 2 for i in range(3)))
    inside = boundary[band].astype(bool)
    assert radii[band][inside].max() < radii[band][~inside].min() + 1e-6
    assert 0.2 < voxel[band].mean() < 0.8


def test_generation_is_seeded_and_multiclass():
    a = generate_case(np.random.default_rng([0, 3]), SHAPE, SPACING, 3, (3.0, 4.0), num_classes=3)
    b = generate_case(np.random.default_rng([0, 3]), SHAPE, SPACING, 3, (3.0, 4.0), num_classes=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.probabilities.shape == (3, *SHAPE)
    np.testing.assert_allclose(a.probabilities.sum(0), 1.0, atol=1e-5)
    assert set(np.unique(a.label)) <= {0, 1, 2}
    assert len(a.expected_volume_ml()) == 2


def test_impossible_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="no structure"):
        generate_case(np.random.default_rng(0), (8, 8, 4), SPACING, 1, (30.0, 40.0))


def test_structures_keep_the_configured_gap_and_stay_one_lesion_each():
    from biasseg.metrics.lesions import LesionSettings, lesion_rows

    case = generate_case(np.random.default_rng(1), (64, 64, 48), (1.0, 1.0, 1.0), 12, (1.0, 10.0), sigma_mm=0.0, gap_mm=12.0)
    structures = case.structures
    assert len(structures) == 12
    for i, a in enumerate(structures):
        for b in structures[i + 1:]:
            assert np.linalg.norm(np.subtract(a.centre_mm, b.centre_mm)) - a.radius_mm - b.radius_mm > 12.0
    # noise-free labels: every sphere (radius >= 1 mm: at least its nearest voxel centre) is one
    # BraTS reference lesion — dilated by 3 voxels, none merge
    rows = lesion_rows(case.label == 1, case.label == 1, case.probabilities[1], (1, 1, 1), LesionSettings())
    assert len(rows) == 12
