"""The optimum of a loss's *expected* value under label uncertainty, and the volumes it implies.

A perfect network trained with a loss converges (per input) to the prediction ``p`` that
minimises the loss averaged over the label's distribution. Written on the exchangeable voxel
groups of :mod:`biasseg.theory.groups` (counts ``n_g``, mean probability ``q_g``, draws ``k_mg``), with
``p_g`` the foreground probability predicted for group ``g``:

* cross-entropy, the mean over the image's ``N = Σ n_g`` voxels,
  ``−Σ_g n_g [q_g log p_g + (1 − q_g) log(1 − p_g)] / N``: linear in the label, so its
  expectation is exact (no draws); its optimum is ``p_g = q_g`` (a proper scoring rule);
* soft Dice of the foreground, as :class:`biasseg.losses.SoftDiceLoss` (nnU-Net: smooth 1e-5 in
  numerator and denominator), ``1 − mean_m (2 T_m + s) / (P_m + Y_m + s)`` with
  ``T_m = Σ_g p_g k_mg``, ``P_m = Σ_g n_g p_g``, ``Y_m = Σ_g k_mg`` summed over one image
  (per image) or pooled over ``batch_size`` independent draws of it (batch Dice);
  estimated over the draws. Its Tversky generalisation (``α, β``: false positives ``P − T``
  and negatives ``Y − T`` weighted, Jaccard at ``α = β = 1``) is the same on group sums,
  ``(2T + s) / (2T + 2α(P − T) + 2β(Y − T) + s)``;
* a weighted sum of the two (nnU-Net's DC+CE);
* Nordström et al.'s calibrated Dice surrogate (``calibrated``, see :mod:`biasseg.losses.soft_dice`):
  the same ratio with ``T = Σ k_g (1 − φ(z_g))`` and false positives ``Σ (n_g − k_g) φ(−z_g)``.
  At its optimum of value ``t`` every free group satisfies
  ``logit p_g = logit q_g + log((2 − t)/t)`` (in the limit of many voxels, where the ratio's
  expectation is the ratio of expectations): :func:`calibrated_surrogate_optimum`.

Binary: one foreground class (the Dice of the foreground only, background excluded), with
``p = sigmoid(z)`` from one logit per group (the two-class softmax). The optimum is found
with L-BFGS over the free groups' logits in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit
from threadpoolctl import threadpool_limits

from biasseg.theory.groups import VoxelGroups

EPSILON = 1e-12  # the start p = q is clipped to [ε, 1 − ε] so that its logit is finite
FTOL = 1e-10  # L-BFGS stops when an iteration improves the expected loss by less (relative)
MAX_ITERATIONS = 3000
SET_LOGIT = 16.0  # |logit| of a threshold-set start: p within 1.2e-7 of 0 or 1, so tails add no soft volume


@dataclass(frozen=True)
class LossSpec:
    """``ce_weight · CE + dice_weight · (1 − soft Dice)``; the soft Dice is per image
    (``batch_size`` 1) or pools its sums over ``batch_size`` images, weighs false positives
    by ``alpha`` and false negatives by ``beta`` (0.5: Dice, 1: Jaccard, else Tversky) and is
    smoothed as :class:`biasseg.losses.SoftDiceLoss`."""

    ce_weight: float = 0.0
    dice_weight: float = 0.0
    batch_size: int = 1
    alpha: float = 0.5
    beta: float = 0.5
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    calibrated: bool = False  # Nordström et al.'s calibrated surrogate in place of p·y


LOSS_NAMES = ("ce", "softdice", "softdice_batch", "ce_softdice", "calibrated_dice")  # the options of configs/loss/


def named_loss(name: str, batch_size: int = 2) -> LossSpec:
    """The :class:`LossSpec` of a ``configs/loss`` option with its default settings;
    ``batch_size`` is used by ``softdice_batch`` only."""
    specs = {
        "ce": LossSpec(ce_weight=1.0),
        "softdice": LossSpec(dice_weight=1.0),
        "softdice_batch": LossSpec(dice_weight=1.0, batch_size=int(batch_size)),
        "ce_softdice": LossSpec(ce_weight=1.0, dice_weight=1.0),
        "calibrated_dice": LossSpec(dice_weight=1.0, calibrated=True),
    }
    if name not in specs:
        raise ValueError(f"unknown loss {name!r}; the theory models {LOSS_NAMES}")
    return specs[name]


def cross_entropy(logits: np.ndarray, groups: VoxelGroups) -> tuple[float, np.ndarray]:
    """Expected voxel-mean cross-entropy and its gradient over the group ``logits`` ``(G,)``
    (``log p = −softplus(−z)``, ``log(1 − p) = −softplus(z)``: finite for any logit)."""
    n, q, total = groups.counts, groups.probability, groups.num_voxels
    value = float(n @ (q * np.logaddexp(0, -logits) + (1 - q) * np.logaddexp(0, logits))) / total
    gradient = n * (expit(logits) - q) / total
    return value, gradient


def soft_dice_loss(logits: np.ndarray, groups: VoxelGroups, loss: LossSpec) -> tuple[float, np.ndarray]:
    """``1 − mean soft Dice`` (Tversky with ``alpha, beta``) over the draws, pooled in batches of
    ``loss.batch_size`` consecutive draws, and its gradient over the group ``logits`` ``(G,)``.

    Per batch ``m``: ``T_m = Σ_g k_mg·t(z_g)`` and ``F_m = Σ_g (n_g − k_mg)·f(z_g)`` with
    ``t = f = σ`` (soft Dice: ``p·y`` and ``p·(1 − y)``), or with ``loss.calibrated`` Nordström's
    bounds ``t(z) = 1 − φ(z)``, ``f(z) = φ(−z)``, ``φ(m) = log₂(1 + e^{−m})``; the score is
    ``(2T + s) / (2T + 2α·F + 2β·(Y − T) + s)``."""
    batch = loss.batch_size
    num_batches = len(groups.draws) // batch
    if num_batches == 0:
        raise ValueError(f"{len(groups.draws)} label draws cannot fill one batch of {batch}")
    k = groups.draws[: num_batches * batch].reshape(num_batches, batch, -1).sum(1)  # (batches, G)
    n = batch * groups.counts
    if loss.calibrated:
        t, dt = 1 - np.logaddexp(0, -logits) / np.log(2), expit(-logits) / np.log(2)
        f, df = np.logaddexp(0, logits) / np.log(2), expit(logits) / np.log(2)
    else:
        t = f = expit(logits)
        dt = df = t * (1 - t)
    tp, fp, y = k @ t, (n - k) @ f, k.sum(1)
    numerator = 2 * tp + loss.smooth_nr
    denominator = 2 * tp + 2 * loss.alpha * fp + 2 * loss.beta * (y - tp) + loss.smooth_dr
    if loss.calibrated and (denominator <= 0).any():
        # Beyond the surrogate's pole: T (a lower bound) is negative where a draw labels voxels
        # predicted z ≪ 0 as foreground, and where it reaches −(α·F + β·Y)/(1 − β) the denominator
        # crosses 0 and the score jumps from −∞ to +∞. Gradient descent from p ≈ ½ (T ≈ 0) never
        # crosses that barrier; here the value is infinite, so the line search steps back.
        return np.inf, np.zeros_like(logits)
    value = 1 - float(np.mean(numerator / denominator))
    # d(N/D) = dN/D − N·dD/D², dN = 2·dT, dD = (2 − 2β)·dT + 2α·dF, per batch row
    d_tp = (2 / denominator - (2 - 2 * loss.beta) * numerator / denominator**2) @ k  # (G,) / dt
    d_fp = (-2 * loss.alpha * numerator / denominator**2) @ (n - k)
    return value, -(d_tp * dt + d_fp * df) / num_batches


def expected_loss(logits: np.ndarray, groups: VoxelGroups, loss: LossSpec) -> tuple[float, np.ndarray]:
    """The expected value of ``loss`` for the foreground logits ``(G,)`` of the groups
    (``p = sigmoid(logit)``, the two-class softmax) and its gradient over the logits."""
    value, gradient = 0.0, np.zeros_like(logits)
    if loss.ce_weight:
        v, g = cross_entropy(logits, groups)
        value, gradient = value + loss.ce_weight * v, gradient + loss.ce_weight * g
    if loss.dice_weight:
        v, g = soft_dice_loss(logits, groups, loss)
        value, gradient = value + loss.dice_weight * v, gradient + loss.dice_weight * g
    return value, gradient


def calibrated_logits(groups: VoxelGroups) -> np.ndarray:
    """The logits of ``p = q`` (clipped to ``[ε, 1 − ε]``): cross-entropy's optimum."""
    return logit(np.clip(groups.probability, EPSILON, 1 - EPSILON))


def threshold_logits(groups: VoxelGroups, loss: LossSpec) -> np.ndarray:
    """Logits ``±SET_LOGIT`` of the free groups' threshold set ``{q ≥ t}`` with the lowest
    expected ``loss`` (the empty set included). Soft Dice's optimum is near such a set, and
    from ``p = q`` alone L-BFGS can end in a local minimum (small structures, boundary kind)."""
    q, free = groups.probability, groups.free
    candidates = []
    for threshold in [*np.unique(q[free]), np.inf]:
        logits = calibrated_logits(groups)
        logits[free] = np.where(q[free] >= threshold, SET_LOGIT, -SET_LOGIT)
        candidates.append((expected_loss(logits, groups, loss)[0], logits))
    return min(candidates, key=lambda candidate: candidate[0])[1]


def minimised_logits(start: np.ndarray, groups: VoxelGroups, loss: LossSpec) -> tuple[float, np.ndarray]:
    """``(expected loss, logits)`` at the local minimum L-BFGS reaches from ``start`` over the
    free groups' logits (the certain groups keep theirs). The logits are scaled by
    ``√(n_g q_g (1 − q_g))``, the root of cross-entropy's curvature at ``p = q``: with it a
    loss with cross-entropy converges in tens of iterations instead of hundreds."""
    logits, free = start.copy(), groups.free
    q = np.clip(groups.probability[free], EPSILON, 1 - EPSILON)
    scale = np.sqrt(groups.counts[free] * q * (1 - q))
    scale /= scale.max()

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        logits[free] = x / scale
        value, gradient = expected_loss(logits, groups, loss)
        return value, gradient[free] / scale

    with threadpool_limits(1, user_api="blas"):  # multithreaded BLAS on these tiny vectors is ~50× slower
        result = minimize(objective, logits[free] * scale, jac=True, method="L-BFGS-B",
                          options={"maxiter": MAX_ITERATIONS, "ftol": FTOL, "gtol": 0.0})
    logits[free] = result.x / scale
    return expected_loss(logits, groups, loss)[0], logits


def optimal_probabilities(groups: VoxelGroups, loss: LossSpec) -> np.ndarray:
    """Group predictions ``p`` ``(G,)`` minimising the expected ``loss``; the certain groups
    are held at ``q``. Soft Dice alone can have several local minima (the optimum is nearly
    binary, so it picks a set of shells): the better of the minima reached from ``p = q`` and
    from the best threshold set is taken. With cross-entropy in the loss the minimum is interior
    and random starts were found to agree, so ``p = q`` is the only start."""
    starts = [calibrated_logits(groups)]
    if groups.free.any() and loss.dice_weight and not loss.ce_weight and not loss.calibrated:
        starts.append(threshold_logits(groups, loss))
    if loss.calibrated:  # inside the surrogate's domain: p = q, its odds raised until no draw is beyond the pole
        starts = [next(s for s in (starts[0] + shift for shift in range(0, 41, 2)) if np.isfinite(expected_loss(s, groups, loss)[0]))]
    if groups.free.any():
        _, logits = min((minimised_logits(start, groups, loss) for start in starts), key=lambda result: result[0])
    else:
        logits = starts[0]
    p = expit(logits)
    p[~groups.free] = groups.probability[~groups.free]
    return p


@dataclass(frozen=True)
class ImpliedVolumes:
    """Volumes in ml of one image: ``expected`` ``Σ q``, and the loss optimum's ``soft``
    ``Σ p`` and ``hard`` ``Σ [p > 0.5]`` (each × voxel volume)."""

    expected_ml: float
    soft_ml: float
    hard_ml: float

    @property
    def relative_soft(self) -> float:
        """``(soft − expected) / expected``."""
        return (self.soft_ml - self.expected_ml) / self.expected_ml

    @property
    def relative_hard(self) -> float:
        """``(hard − expected) / expected``."""
        return (self.hard_ml - self.expected_ml) / self.expected_ml


def implied_volumes(groups: VoxelGroups, loss: LossSpec) -> ImpliedVolumes:
    """The volumes implied by the optimum of the expected ``loss`` on ``groups``."""
    p = optimal_probabilities(groups, loss)
    return ImpliedVolumes(
        expected_ml=groups.expected_volume_ml(),
        soft_ml=float(groups.counts @ p) * groups.voxel_ml,
        hard_ml=float(groups.counts @ (p > 0.5)) * groups.voxel_ml,
    )


def calibrated_surrogate_optimum(groups: VoxelGroups, value: float) -> np.ndarray:
    """Nordström's surrogate's stationary point for a given optimum ``value`` ``t`` of its
    score (Dice weights, no smoothing, many voxels): maximising ``2T/(Y + T + F)`` at value
    ``t`` maximises ``(2 − t)·T − t·F`` voxel by voxel, ``(2 − t)·q·σ(−z) = t·(1 − q)·σ(z)``,
    so ``p = σ(z)`` has the odds of ``q`` times ``(2 − t)/t``. Returns ``p`` ``(G,)``."""
    odds = groups.probability / np.clip(1 - groups.probability, EPSILON, None) * (2 - value) / value
    return odds / (1 + odds)
