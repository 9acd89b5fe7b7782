"""Post-hoc remedies for the volume bias, computed from per-subject log-odds histograms.

Every validation subject contributes, per foreground class ``c``, a histogram of the
one-vs-rest log-odds ``z = log p_c − log Σ_{k≠c} p_k`` of its voxels, split by the reference
(``(2, LOG_ODDS_BINS)``: not-``c`` voxels, ``c`` voxels; ``|z|`` clipped at ``LOG_ODDS_LIMIT``).
The rest is summed from the other classes' probabilities, not taken as ``1 − p_c``, so a
saturated map (``1 − p_c`` rounds to 0 in float32 beyond ``|z|`` ≈ 16) keeps its log-odds.
The histograms are small, add up exactly over processes, and hold everything the remedies
need, so none of them keeps a probability map:

* **temperature scaling** (Guo et al. 2017): ``p = σ(z / T)`` with ``T`` minimising the
  pooled negative log-likelihood of the validation voxels. Per class on the one-vs-rest
  log-odds; with one foreground class this is exactly softmax temperature scaling.
* **calibrated soft volume**: ``Σ σ(z / T) × voxel volume``.
* **Dice-optimal threshold**: predict ``c`` where ``p_c > t`` with the one ``t`` per class
  that maximises the mean Dice over the validation subjects (argmax decoding is ``t = 0.5``
  for two classes).
* **RankSEG** (Dai & Li 2023, JMLR 24(224)): per subject keep the ``τ`` most probable
  voxels, ``τ`` maximising the expected Dice under independent Bernoulli(``p``) labels in
  the reciprocal-moment approximation ``2 Σ_{j≤τ} p_(j) / (τ + Σ p + 1)``, with the
  calibrated ``p``; a class whose largest probability is ≤ 0.5 is left empty (their
  ``pruning_prob``).

``T`` and ``t`` are fitted on the subjects they are then measured on (optimistic, as in a
post-hoc analysis), in training's validation and in ``evaluate.py`` alike. Classes are
decoded one-vs-rest, so with several foreground classes the threshold and RankSEG masks of
two classes may overlap. Resolution: bins are 1/16 wide in log-odds (≤ 1.6 % in
probability); thresholds and ``τ`` move in whole bins.
"""

from __future__ import annotations

import torch

from metrics.calibration import expected_calibration_error, reliability_bins

LOG_ODDS_LIMIT = 40.0
LOG_ODDS_BINS = 1280
TEMPERATURES = torch.logspace(-2, 2, 801, dtype=torch.float64)  # the grid T is chosen from (1.2 % steps)


def log_odds(probabilities: torch.Tensor) -> torch.Tensor:
    """One-vs-rest log-odds ``(C − 1, N)`` of the foreground classes from class probabilities
    ``(C, N)``: ``log p_c − log Σ_{k≠c} p_k``; ±inf where a side is 0, 0 where not finite."""
    rest = torch.stack([
        torch.cat([probabilities[:c], probabilities[c + 1 :]]).sum(0) for c in range(1, probabilities.shape[0])
    ])
    z = torch.log(probabilities[1:]) - torch.log(rest)
    return torch.where(torch.isnan(z), 0.0, z)


def bin_centres(device: torch.device | str = "cpu") -> torch.Tensor:
    """Log-odds at the centre of every bin, ``(LOG_ODDS_BINS,)`` float64."""
    width = 2 * LOG_ODDS_LIMIT / LOG_ODDS_BINS
    return -LOG_ODDS_LIMIT + width * (torch.arange(LOG_ODDS_BINS, dtype=torch.float64, device=device) + 0.5)


def log_odds_histogram(z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Voxel counts ``(K, 2, LOG_ODDS_BINS)`` float64 of ``(K, N)`` log-odds (:func:`log_odds`),
    split by the ``(K, N)`` boolean reference (index 1 = reference voxel of the class)."""
    classes = z.shape[0]
    scaled = (z.clamp(-LOG_ODDS_LIMIT, LOG_ODDS_LIMIT) + LOG_ODDS_LIMIT) * (LOG_ODDS_BINS / (2 * LOG_ODDS_LIMIT))
    index = scaled.long().clamp(0, LOG_ODDS_BINS - 1)
    index = index + LOG_ODDS_BINS * reference.long()
    index = index + 2 * LOG_ODDS_BINS * torch.arange(classes, device=z.device).view(-1, 1)
    counts = torch.bincount(index.reshape(-1), minlength=classes * 2 * LOG_ODDS_BINS)
    return counts.double().view(classes, 2, LOG_ODDS_BINS)


def fit_temperature(histograms: torch.Tensor) -> torch.Tensor:
    """Per-class ``T`` ``(K,)`` minimising the NLL of the pooled ``(S, K, 2, B)`` histograms."""
    pooled = histograms.sum(0)  # (K, 2, B)
    temperatures = TEMPERATURES.to(pooled.device)
    z = bin_centres(pooled.device) / temperatures.view(-1, 1)  # (T, B)
    # −log(1 − σ(z)) = softplus(z) for the class's non-voxels, −log σ(z) = softplus(−z) for its voxels
    nll = pooled[:, 0] @ torch.nn.functional.softplus(z).T + pooled[:, 1] @ torch.nn.functional.softplus(-z).T  # (K, T)
    return temperatures[nll.argmin(-1)]


def calibrated_probabilities(temperature: torch.Tensor) -> torch.Tensor:
    """``σ(z_b / T_k)`` per class and bin, ``(K, B)``."""
    return torch.sigmoid(bin_centres(temperature.device) / temperature.view(-1, 1))


def calibration_error(histograms: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """ECE ``(K,)`` of the pooled histograms after scaling by ``temperature``."""
    pooled = histograms.sum(0)  # (K, 2, B)
    sums = reliability_bins(calibrated_probabilities(temperature), pooled[:, 1], count=pooled.sum(1))
    return expected_calibration_error(sums)


def _from_top(values: torch.Tensor) -> torch.Tensor:
    """Cumulative sums over bins from the most probable one down, ``(…, B)``."""
    return values.flip(-1).cumsum(-1)


def dice_from_counts(true_positive: torch.Tensor, predicted: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``2·TP / (|P| + |R|)`` from voxel counts; NaN where both are empty (nnU-Net's convention)."""
    total = predicted + reference
    return torch.where(total > 0, 2 * true_positive / total.clamp_min(1e-12), torch.nan)


def threshold_decoding(histograms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Dice-optimal threshold per class and what it gives per subject.

    Returns ``threshold`` ``(K,)`` (a probability), ``dice`` and ``voxels`` ``(S, K)`` (the
    predicted voxel count) at that threshold.
    """
    positive, total = histograms[:, :, 1], histograms.sum(2)  # (S, K, B)
    zero = torch.zeros_like(total[..., :1])
    # cut j keeps the bins >= j; j = B keeps none
    true_positive = torch.cat([zero, _from_top(positive)], -1).flip(-1)  # (S, K, B + 1)
    predicted = torch.cat([zero, _from_top(total)], -1).flip(-1)
    dice = dice_from_counts(true_positive, predicted, positive.sum(-1, keepdim=True))
    mean = torch.nanmean(dice, 0).nan_to_num(-1.0)  # (K, B + 1)
    best = mean.argmax(-1)  # (K,)
    edges = torch.linspace(-LOG_ODDS_LIMIT, LOG_ODDS_LIMIT, LOG_ODDS_BINS + 1, dtype=torch.float64, device=best.device)
    threshold = torch.sigmoid(edges[best])
    pick = best.view(1, -1, 1).expand(dice.shape[0], -1, 1)
    return threshold, dice.gather(-1, pick)[..., 0], predicted.gather(-1, pick)[..., 0]


def rankseg_decoding(histograms: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RankSEG's Dice-optimal volume per subject from calibrated probabilities.

    Returns ``dice`` and ``voxels`` ``(S, K)`` of the selected top-``τ`` voxels.
    """
    positive, total = histograms[:, :, 1], histograms.sum(2)  # (S, K, B)
    probability = calibrated_probabilities(temperature).unsqueeze(0)  # (1, K, B)
    tau = _from_top(total)
    mass = _from_top(total * probability)
    expected_dice = 2 * mass / (mass[..., -1:] + tau + 1)
    # a bin counts only where it holds voxels, and a class whose top voxel has p <= 0.5 stays empty
    occupied = total.flip(-1) > 0
    top_probability = torch.where(total > 0, probability, 0.0).amax(-1)  # (S, K)
    expected_dice = torch.where(occupied, expected_dice, -1.0)
    best = expected_dice.argmax(-1, keepdim=True)
    keep = (expected_dice.gather(-1, best)[..., 0] > 0) & (top_probability > 0.5)
    voxels = torch.where(keep, tau.gather(-1, best)[..., 0], 0.0)
    true_positive = torch.where(keep, _from_top(positive).gather(-1, best)[..., 0], 0.0)
    return dice_from_counts(true_positive, voxels, positive.sum(-1)), voxels


def posthoc_remedies(histograms: torch.Tensor, voxel_ml: torch.Tensor) -> tuple[dict, dict]:
    """All remedies for ``(S, K, 2, B)`` histograms and ``(S,)`` voxel volumes (ml).

    Returns per-subject ``(S, K)`` tensors ``volume_soft_calibrated_ml``, ``dice_threshold``,
    ``volume_threshold_ml``, ``dice_rankseg``, ``volume_rankseg_ml``, and per-class ``(K,)``
    ``temperature``, ``threshold`` and ``ece_calibrated``.
    """
    voxel_ml = voxel_ml.view(-1, 1)
    temperature = fit_temperature(histograms)
    soft = (histograms.sum(2) * calibrated_probabilities(temperature).unsqueeze(0)).sum(-1)
    threshold, dice_threshold, threshold_voxels = threshold_decoding(histograms)
    dice_rankseg, rankseg_voxels = rankseg_decoding(histograms, temperature)
    rows = {
        "volume_soft_calibrated_ml": soft * voxel_ml,
        "dice_threshold": dice_threshold,
        "volume_threshold_ml": threshold_voxels * voxel_ml,
        "dice_rankseg": dice_rankseg,
        "volume_rankseg_ml": rankseg_voxels * voxel_ml,
    }
    fitted = {
        "temperature": temperature,
        "threshold": threshold,
        "ece_calibrated": calibration_error(histograms, temperature),
    }
    return rows, fitted
