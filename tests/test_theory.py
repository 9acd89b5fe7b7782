"""The expected-loss optimum that predicts each loss's volume bias (theory/, theory.py)."""

import csv
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_config
from omegaconf import OmegaConf
from scipy.optimize import approx_fprime
from scipy.special import logit

from biasseg.losses import CompoundLoss, CrossEntropyLoss, SoftDiceLoss
from biasseg.theory import bias_curve, predicted_volume_bias, run_bias_curve
from biasseg.theory.curves import ROW_KEYS
from biasseg.theory.expected_loss import (
    LossSpec,
    calibrated_surrogate_optimum,
    expected_loss,
    implied_volumes,
    named_loss,
    optimal_probabilities,
)
from biasseg.theory.groups import VoxelGroups, case_groups, latin_binomial, probability_map_groups, sphere_groups
from biasseg.theory.prediction import loss_spec
from datamodules.synthetic_volumes import generate_case

SPECS = {
    "ce": (LossSpec(ce_weight=1.0), CrossEntropyLoss()),
    "softdice": (LossSpec(dice_weight=1.0), SoftDiceLoss()),
    "softdice_batch": (LossSpec(dice_weight=1.0, batch_size=2), SoftDiceLoss(batch_dice=True)),
    "tversky": (LossSpec(dice_weight=1.0, alpha=0.3, beta=0.7), SoftDiceLoss(alpha=0.3, beta=0.7)),
    "calibrated_dice": (LossSpec(dice_weight=1.0, calibrated=True), SoftDiceLoss(calibrated_surrogate=True)),
    "calibrated_tversky_batch": (LossSpec(dice_weight=1.0, calibrated=True, alpha=0.3, beta=0.7, batch_size=2),
                                 SoftDiceLoss(calibrated_surrogate=True, alpha=0.3, beta=0.7, batch_dice=True)),
    "ce_softdice": (LossSpec(ce_weight=1.0, dice_weight=0.7),
                    CompoundLoss({"ce": CrossEntropyLoss(), "dice": SoftDiceLoss()}, {"dice": 0.7})),
}


def voxelwise_groups(labels: np.ndarray) -> VoxelGroups:
    """Every voxel its own group; the draws are ``labels`` ``(M, …)``, ``q`` their frequency."""
    draws = labels.reshape(len(labels), -1).astype(np.float64)
    size = draws.shape[1]
    return VoxelGroups(np.ones(size), draws.mean(0), draws, np.ones(size, bool), 0.001, np.zeros(size, int))


@pytest.mark.parametrize("name", SPECS)
def test_group_loss_is_the_trained_loss_and_its_gradient_is_right(name):
    # groups of one voxel: the theory's loss on group sums must be the training loss itself
    spec, module = SPECS[name]
    rng = np.random.default_rng(0)
    labels = (rng.random((4, 3, 4, 5)) < rng.random((3, 4, 5))).astype(np.int64)
    groups = voxelwise_groups(labels)
    logits = rng.normal(0, 2, groups.counts.size)
    value, gradient = expected_loss(logits, groups, spec)

    network = torch.zeros(4, 2, 3, 4, 5, dtype=torch.float64)
    network[:, 1] = torch.from_numpy(logits.reshape(3, 4, 5))
    target = torch.from_numpy(labels)[:, None]
    trained = np.mean([float(module(network[b:b + spec.batch_size], target[b:b + spec.batch_size]))
                       for b in range(0, 4, spec.batch_size)])  # the mean over the batches of one epoch
    assert value == pytest.approx(trained, abs=2e-6)
    numeric = approx_fprime(logits, lambda z: expected_loss(z, groups, spec)[0], 1e-7)
    np.testing.assert_allclose(gradient, numeric, atol=1e-6)


def test_cross_entropy_optimum_is_the_probability_map():
    rng = np.random.default_rng(1)
    q = rng.random((10, 10, 10)) ** 2  # any map, voxel kind
    groups = probability_map_groups(q, 0.001, 64, rng, bins=50)
    p = optimal_probabilities(groups, named_loss("ce"))
    np.testing.assert_allclose(p[groups.free], groups.probability[groups.free], atol=1e-4)
    # one voxel per group on a small 3D case: the optimum is the map, voxel by voxel
    labels = (rng.random((64, 6, 5, 4)) < q[:6, :5, :4]).astype(np.int64)
    direct = voxelwise_groups(labels)
    np.testing.assert_allclose(optimal_probabilities(direct, named_loss("ce")), direct.probability, atol=1e-4)


@pytest.mark.parametrize("kind", ["voxel", "boundary"])
def test_cross_entropy_implies_no_soft_volume_bias(kind):
    groups = sphere_groups(4.0, 2.0, kind, (1.0, 1.0, 1.5), 32.0, 128, np.random.default_rng(0))
    volumes = implied_volumes(groups, named_loss("ce"))
    assert abs(volumes.relative_soft) < 1e-4
    assert volumes.relative_hard < -0.1  # but thresholding the calibrated map shrinks a small sphere


def brute_force(groups: VoxelGroups, spec: LossSpec, grid: np.ndarray) -> tuple[float, np.ndarray]:
    """The least expected loss over ``grid``³ and where it is (three groups), written out
    independently of theory.expected_loss: CE exactly, soft Dice over the pooled draws."""
    batches = len(groups.draws) // spec.batch_size
    k = groups.draws[: batches * spec.batch_size].reshape(batches, spec.batch_size, 3).sum(1)
    n, q, s = spec.batch_size * groups.counts, groups.probability, spec.smooth_nr
    rest = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    best = (np.inf, None)
    for first in grid:
        p = np.column_stack([np.full(len(rest), first), rest])
        if spec.calibrated:  # 1 − φ(z) = 1 + log2 p, φ(−z) = −log2(1 − p); beyond the pole: infinite
            tp, fp = (1 + np.log2(p)) @ k.T, -np.log2(1 - p) @ (n - k).T
            denominator = k.sum(1) + tp + fp + s
            score = np.where(denominator > 0, (2 * tp + s) / denominator, -np.inf)
            dice = 1 - np.mean(score, axis=1)
        else:
            dice = 1 - np.mean((2 * p @ k.T + s) / ((p @ n)[:, None] + k.sum(1) + s), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ce = -(np.log(p) @ (groups.counts * q) + np.log1p(-p) @ (groups.counts * (1 - q))) / groups.num_voxels
        value = spec.dice_weight * dice + (spec.ce_weight * ce if spec.ce_weight else 0)
        i = int(np.argmin(value))
        best = min(best, (float(value[i]), p[i]), key=lambda b: b[0])
    return best


def three_groups(kind: str) -> VoxelGroups:
    counts, q = np.array([6.0, 14.0, 30.0]), np.array([0.8, 0.45, 0.15])
    if kind == "voxel":
        draws = latin_binomial(counts, q, 24, np.random.default_rng(0))
    else:  # nested shells: a draw's boundary falls at a random depth
        depth = np.random.default_rng(0).random(24)[:, None]
        draws = counts * (depth < q)
    return VoxelGroups(counts, q, draws, np.ones(3, bool), 0.001, np.zeros(3, int))


@pytest.mark.parametrize("kind", ["voxel", "boundary"])
@pytest.mark.parametrize("name", ["softdice", "softdice_batch", "ce_softdice", "calibrated_dice"])
def test_optimum_matches_a_brute_force_grid_search(kind, name):
    groups, spec = three_groups(kind), named_loss(name, batch_size=2)
    grid = np.linspace(0.005, 0.995, 100) if spec.ce_weight or spec.calibrated else np.linspace(0, 1, 51)
    grid_value, grid_p = brute_force(groups, spec, grid)
    p = optimal_probabilities(groups, spec)
    value = expected_loss(logit(np.clip(p, 1e-300, 1 - 1e-16)), groups, spec)[0]
    assert value <= grid_value + 1e-9
    np.testing.assert_allclose(p, grid_p, atol=grid[1] - grid[0])


@pytest.mark.parametrize("kind, sign", [("voxel", 1), ("boundary", -1)])
def test_soft_dice_bias_direction_depends_on_the_kind_of_uncertainty(kind, sign):
    # verified numerically over radii 2-20 mm and sigma 0.5-3 mm (python theory.py): independent
    # voxel noise -> per-image soft Dice over-segments; a shifted boundary -> it under-segments.
    case = generate_case(np.random.default_rng(0), (24, 24, 16), (1.0, 1.0, 1.5), 1, (4.0, 4.5),
                         sigma_mm=2.5, kind=kind)
    groups = case_groups(case, 128, np.random.default_rng(0))
    assert groups.expected_volume_ml() == pytest.approx(float(case.expected_volume_ml()[0]), rel=1e-5)
    dice = implied_volumes(groups, named_loss("softdice"))
    assert np.sign(dice.relative_soft) == sign and abs(dice.relative_soft) > 0.05
    assert abs(implied_volumes(groups, named_loss("ce")).relative_soft) < 1e-4


def test_calibrated_surrogate_optimum_inflates_the_odds_by_its_own_score():
    # Nordström's surrogate at the optimum of its expected value, on independent voxel noise (where,
    # with many voxels, the mean of the ratio is the ratio of the means): logit p = logit q +
    # log((2 − t)/t), t the optimal score. So its decision z > 0 thresholds q at t/2 (a threshold
    # of q: Bao & Sugiyama's "calibrated"), but its probabilities, and its soft volume, are not
    # q's: every odds is multiplied by (2 − t)/t > 1, an over-segmentation that grows with the
    # uncertainty (t falls). Soft Dice over-segments here too, far less; cross-entropy not at all.
    groups = sphere_groups(5.0, 1.0, "voxel", (1.0, 1.0, 1.5), 30.0, 256, np.random.default_rng(0))
    spec = replace(named_loss("calibrated_dice"), smooth_nr=0.0, smooth_dr=0.0)
    p = optimal_probabilities(groups, spec)
    t = 1 - expected_loss(logit(p), groups, spec)[0]
    closed = calibrated_surrogate_optimum(groups, t)
    free, weight = groups.free, groups.counts[groups.free]
    gap = np.abs(logit(p[free]) - logit(closed[free]))
    assert 0.2 < t < 0.6
    assert np.average(gap, weights=weight) < 0.03
    volumes = {name: implied_volumes(groups, named_loss(name)) for name in ("ce", "softdice", "calibrated_dice")}
    assert volumes["calibrated_dice"].relative_soft > 0.3 > volumes["softdice"].relative_soft > 0.02
    assert abs(volumes["ce"].relative_soft) < 1e-4
    decided = p[free] > 0.5
    assert np.all(groups.probability[free][decided] > t / 2 - 0.02) and np.all(groups.probability[free][~decided] < t / 2 + 0.02)


def test_bias_curve_rows():
    rows = bias_curve("voxel", [0.0, 2.0], 4.0, (1.0, 1.0, 1.0), ["ce", "softdice"], field_of_view_mm=24.0,
                      num_draws=32, bins=50)
    assert [(r["sigma_mm"], r["loss"]) for r in rows] == [(0, "ce"), (0, "softdice"), (2, "ce"), (2, "softdice")]
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert all(r["relative_soft"] == pytest.approx(0, abs=1e-9) for r in rows[:2])  # a certain label: no bias
    assert rows[3]["relative_soft"] > 0.05 and rows[3]["soft_ml"] > rows[3]["expected_ml"]


def test_loss_spec_of_the_configured_losses():
    assert loss_spec(CrossEntropyLoss(), 4) == LossSpec(ce_weight=1.0)
    assert loss_spec(SoftDiceLoss(batch_dice=True), 4) == LossSpec(dice_weight=1.0, batch_size=4)
    compound = CompoundLoss({"ce": CrossEntropyLoss(), "softdice": SoftDiceLoss()}, {"softdice": 2.0})
    assert loss_spec(compound, 4) == LossSpec(ce_weight=1.0, dice_weight=2.0)
    assert loss_spec(SoftDiceLoss(soft_label=True), 4) == LossSpec(dice_weight=1.0)  # same on label maps
    for unmodelled in (CrossEntropyLoss(gamma=2.0), CrossEntropyLoss(weight=[1.0, 3.0]), SoftDiceLoss(squared=True),
                       SoftDiceLoss(include_background=True), SoftDiceLoss(generalised="square")):
        assert loss_spec(unmodelled, 4) is None
    assert loss_spec(SoftDiceLoss(soft_label=True), 4, soft_targets=True) is None
    assert loss_spec(SoftDiceLoss(calibrated_surrogate=True), 4) == LossSpec(dice_weight=1.0, calibrated=True)


def test_predicted_volume_bias_of_a_run_config():
    overrides = ["experiment=high_uncertainty", "data.num_val=6"]
    ce = predicted_volume_bias(compose_config(overrides + ["loss=ce"]))
    dice_config = compose_config(overrides + ["loss=softdice"])
    dice = predicted_volume_bias({key: OmegaConf.to_container(dice_config[key], resolve=True)
                                  for key in ("data", "loss")})  # a plain dict, as report.py passes
    assert set(ce) == set(dice) == {"relative_soft", "relative_hard"}
    assert all(np.isfinite(v) for v in [*ce.values(), *dice.values()])
    assert abs(ce["relative_soft"]) < 1e-4 and dice["relative_soft"] > 0.05
    assert abs(dice["relative_soft"]) > abs(ce["relative_soft"])
    assert predicted_volume_bias(compose_config(overrides + ["loss=focal"])) is None
    # trained on the probability map itself (no label noise), soft Dice is still biased
    soft = predicted_volume_bias(compose_config(overrides + ["loss=softdice", "data.label_mode=soft"]))
    assert soft["relative_soft"] > 0.05


def test_run_bias_curve_follows_the_run_config():
    curve = run_bias_curve(compose_config(["experiment=high_uncertainty", "loss=softdice"]))
    assert set(curve) == {"sigma", "relative_soft", "relative_hard"}
    assert 2.5 in curve["sigma"] and len(curve["sigma"]) == len(curve["relative_soft"]) == len(curve["relative_hard"])
    assert curve["relative_soft"][0] == pytest.approx(0, abs=1e-9) and curve["relative_soft"][-1] > 0.1
    assert run_bias_curve(compose_config(["data=mni152", "loss=softdice"])) is None  # no sphere to sweep


def test_cli_writes_the_table_and_figures(tmp_path):
    overrides = ["kinds=[voxel,boundary]", "losses=[ce,softdice]", "sigmas_mm=[0,1.5]", "radii_mm=[4]",
                 "radius_sweep.radii_mm=[3,4]", "radius_sweep.sigma_mm=1.5", "field_of_view_mm=24",
                 "num_draws=32", "bins=50", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run([sys.executable, "theory.py", *overrides], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "theory.csv") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == ROW_KEYS
    points = {(r["kind"], float(r["radius_mm"]), float(r["sigma_mm"]), r["loss"]) for r in rows}
    assert len(rows) == len(points) == 2 * 3 * 2  # kinds x {(4, 0), (4, 1.5), (3, 1.5)} x losses
    assert (tmp_path / "volume_bias.png").stat().st_size > 0
    assert (tmp_path / "volume_bias_vs_radius.png").stat().st_size > 0
    assert str(tmp_path / "theory.csv") in done.stdout


def test_hypernetworks_and_several_raters_are_not_modelled():
    """A hypernetwork's map is a marginal over α and several raters' labels a mixture of rater
    models: the theory gives no prediction rather than a wrong one."""
    from helpers import compose_config

    from biasseg.theory.curves import run_bias_curve
    from biasseg.theory.prediction import predicted_volume_bias

    plain = compose_config(["experiment=high_uncertainty", "loss=tversky", "data.num_val=2"])
    assert predicted_volume_bias(plain) is not None and run_bias_curve(plain) is not None
    for overrides in (["model=tversky_hypernet"], ["data.raters=3"]):
        cfg = compose_config(["experiment=high_uncertainty", "loss=tversky", "data.num_val=2", *overrides])
        assert predicted_volume_bias(cfg) is None and run_bias_curve(cfg) is None
