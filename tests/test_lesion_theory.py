"""The theory's per-lesion prediction (biasseg/theory/lesions.py): its optimum map against an
independent Monte Carlo optimisation of the real soft Dice loss on real label draws, and the
prediction a run's config gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import ndtri

from biasseg.losses import SoftDiceLoss
from biasseg.metrics.lesions import LESION_COLUMNS, LesionSettings, lesion_rows
from biasseg.theory.expected_loss import implied_volumes, named_loss
from biasseg.theory.groups import case_groups
from biasseg.theory.lesions import equivalent_radius_mm, optimal_map, predicted_lesion_rows
from biasseg.theory.prediction import BINS, NUM_DRAWS
from datamodules.synthetic_volumes import (
    Structure,
    SyntheticCase,
    sample_label,
    structure_distances,
    structure_probabilities,
)
from tests.helpers import compose_config

RADII_MM = (1.5, 2.5, 7.0)  # a small, a middling and a large lesion


def lesion_case(kind: str, sigma_mm: float = 1.0) -> SyntheticCase:
    """Three spheres of :data:`RADII_MM`, far apart, in an 80 × 32 × 32 mm image of 1 mm voxels."""
    shape, spacing = (80, 32, 32), (1.0, 1.0, 1.0)
    structures = [Structure((x, 16.0, 16.0), r, 1) for x, r in zip((10.5, 35.5, 62.5), RADII_MM)]
    distances = structure_distances(shape, spacing, structures)
    q = structure_probabilities(distances, structures, sigma_mm).sum(0).clip(0, 1)
    label = sample_label(np.random.default_rng(0), distances, structures, sigma_mm, kind)
    probabilities = np.stack([1 - q, q]).astype(np.float32)
    return SyntheticCase(np.zeros(shape, np.float32), label, probabilities, spacing, structures, sigma_mm, kind)


def relative_soft_bias(case: SyntheticCase, p: np.ndarray) -> np.ndarray:
    """Per reference lesion, ``(Σ p − Σ q) / Σ q`` over its region."""
    rows = lesion_rows(p > 0.5, case.label == 1, p, case.spacing_mm, LesionSettings(), expected=case.probabilities[1])
    column = {name: rows[:, i] for i, name in enumerate(LESION_COLUMNS)}
    reference = column["reference"] == 1
    return ((column["volume_pred_soft_ml"] - column["volume_expected_ml"]) / column["volume_expected_ml"])[reference]


def monte_carlo_optimum(case: SyntheticCase, draws: int = 64, iterations: int = 60) -> np.ndarray:
    """The per-image soft Dice (:class:`SoftDiceLoss`, the training loss) minimised over ``draws``
    label draws, the prediction a piecewise-linear function of ``Φ⁻¹(q)`` (49 knots) fitted by
    torch's L-BFGS: no voxel groups, no Latin hypercube, none of the theory's code."""
    q = case.probabilities[1].astype(np.float64)
    labels = torch.from_numpy(case.draw_labels(np.random.default_rng(1), draws)).unsqueeze(1)
    z = torch.from_numpy(np.clip(ndtri(np.clip(q, 1e-12, 1 - 1e-12)), -6, 6)).float()
    knots = torch.linspace(-6, 6, 49)
    theta = torch.nn.Parameter(knots.clone())
    index = torch.clamp(torch.bucketize(z, knots) - 1, 0, len(knots) - 2)
    weight = (z - knots[index]) / (knots[index + 1] - knots[index])
    loss = SoftDiceLoss()
    optimiser = torch.optim.LBFGS([theta], max_iter=iterations, line_search_fn="strong_wolfe")

    def logit() -> torch.Tensor:
        return theta[index] * (1 - weight) + theta[index + 1] * weight

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        foreground = logit()
        value = loss(torch.stack([torch.zeros_like(foreground), foreground]).unsqueeze(0).expand(draws, -1, -1, -1, -1),
                     labels)
        value.backward()
        return value

    optimiser.step(closure)
    return torch.sigmoid(logit()).detach().double().numpy()


def test_cross_entropy_optimum_is_the_label_distribution():
    """Exactly q; with boundary uncertainty to within the other spheres' tails (a voxel's label
    follows its nearest surface only)."""
    for kind, tolerance in (("voxel", 1e-9), ("boundary", 1e-3)):
        case = lesion_case(kind)
        p = optimal_map(case, named_loss("ce"), np.random.default_rng(0))
        np.testing.assert_allclose(p, case.probabilities[1], atol=tolerance)


def test_optimum_map_adds_up_to_the_image_optimum():
    """Σ p of the voxel map is the soft volume of the group optimum it was mapped from."""
    for kind in ("voxel", "boundary"):
        case = lesion_case(kind)
        loss = named_loss("softdice")
        p = optimal_map(case, loss, np.random.default_rng(0))
        image = implied_volumes(case_groups(case, NUM_DRAWS, np.random.default_rng(0), BINS), loss)
        assert p.sum() * case.voxel_volume_ml == pytest.approx(image.soft_ml, rel=0.01)


def test_per_lesion_bias_matches_monte_carlo_soft_dice():
    """Soft Dice shrinks the small lesion and inflates the large one, by the amounts that
    minimising the real loss on sampled labels finds (within 1 point per lesion; found within
    0.01 points)."""
    case = lesion_case("voxel")
    theory = relative_soft_bias(case, optimal_map(case, named_loss("softdice"), np.random.default_rng(0)))
    measured = relative_soft_bias(case, monte_carlo_optimum(case))
    assert len(theory) == len(measured) == len(RADII_MM)
    assert theory[0] < -0.1 and theory[-1] > 0.0
    np.testing.assert_allclose(theory, measured, atol=0.01)


def test_run_prediction_follows_the_run_config():
    overrides = ["experiment=multi_lesion", "data.num_val=2", "data.shape=[48,48,32]", "data.patch_size=[48,48,32]",
                 "data.num_structures=5"]
    softdice, ce, off, focal = (compose_config([*overrides, *extra]) for extra in
                                (["loss=softdice"], ["loss=ce"], ["loss=softdice", "lesions=none"], ["loss=focal"]))
    rows = predicted_lesion_rows(softdice)
    assert len(rows) == 2 and all(r.shape[1] == len(LESION_COLUMNS) for r in rows)
    column = {name: np.concatenate(rows)[:, i] for i, name in enumerate(LESION_COLUMNS)}
    reference = column["reference"] == 1
    radius = equivalent_radius_mm(column["volume_expected_ml"][reference])
    bias = (column["volume_pred_soft_ml"] - column["volume_expected_ml"])[reference] / column["volume_expected_ml"][reference]
    assert bias[np.argmin(radius)] < bias[np.argmax(radius)]
    ce_rows = np.concatenate(predicted_lesion_rows(ce))
    ce_column = {name: ce_rows[:, i] for i, name in enumerate(LESION_COLUMNS)}
    np.testing.assert_allclose(ce_column["volume_pred_soft_ml"], ce_column["volume_expected_ml"], rtol=1e-4)
    assert predicted_lesion_rows(off) is None
    assert predicted_lesion_rows(focal) is None


def test_equivalent_radius():
    np.testing.assert_allclose(equivalent_radius_mm(np.array([4 / 3 * np.pi * 8 / 1000])), [2.0])
