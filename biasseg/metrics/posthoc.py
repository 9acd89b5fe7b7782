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
* **Platt scaling** (Platt 1999), a slope and a bias: ``p = σ(a·z + b)``, ``(a, b)``
  minimising the same NLL (Newton's method, float64). The bias lets it move every
  probability in one direction, which a temperature cannot.
* **isotonic regression** (Zadrozny & Elkan 2002): the monotone map of the log-odds to the
  observed frequency that fits the validation voxels best in squared error (pool adjacent
  violators over the histogram's bins, weighted by their voxel counts). It assumes nothing
  about the shape of the miscalibration, only that the loss ranks voxels correctly.
* **calibrated soft volumes**: ``Σ p × voxel volume`` after each of the three.
* **Dice-optimal threshold**: predict ``c`` where ``p_c > t`` with the one ``t`` per class
  that maximises the mean Dice over the validation subjects (argmax decoding is ``t = 0.5``
  for two classes). A subject where both the prediction and the reference are empty counts
  as Dice 1 for this choice (it is reported as NaN, nnU-Net's convention), so a class absent
  from every subject is decoded as nothing.
* **RankSEG** decoding with the reciprocal moment approximation, RankSEG-RMA (Wang & Dai,
  NeurIPS 2025; the RankSEG framework: Dai & Li 2023, JMLR 24(224)): per subject keep the
  ``τ`` most probable voxels, ``τ`` maximising ``2 Σ_{j≤τ} p_(j) / (τ + Σ p + 1)`` (the
  expected Dice of independent Bernoulli(``p``) labels in that approximation; the reference
  package's ``rankseg_rma(metric="dice", smooth=0, pruning_prob=0.5)``, tested equal), with
  the temperature-scaled ``p``; a class whose largest probability is ≤ 0.5 is left empty.

The three recalibrations are :class:`CalibrationMaps` (fitted here on the subjects they are
measured on; :mod:`biasseg.metrics.volume_quote` fits the same maps on other subjects).
``T``, ``(a, b)``, the isotonic map and ``t`` are fitted on the subjects they are then
measured on (optimistic, as in a post-hoc analysis), in training's validation and in
``evaluate.py`` alike. Classes are
decoded one-vs-rest, so with several foreground classes the threshold and RankSEG masks of
two classes may overlap. Resolution: bins are 1/16 wide in log-odds (≤ 1.6 % in
probability); thresholds and ``τ`` move in whole bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biasseg.metrics.calibration import expected_calibration_error, reliability_bins

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
    split by the ``(K, N)`` reference (index 1 = reference voxel of the class): boolean, or a
    fraction in [0, 1] per voxel (the share of raters who marked it), which splits the voxel's
    count between the two."""
    classes = z.shape[0]
    scaled = (z.clamp(-LOG_ODDS_LIMIT, LOG_ODDS_LIMIT) + LOG_ODDS_LIMIT) * (LOG_ODDS_BINS / (2 * LOG_ODDS_LIMIT))
    index = scaled.long().clamp(0, LOG_ODDS_BINS - 1)
    index = index + 2 * LOG_ODDS_BINS * torch.arange(classes, device=z.device).view(-1, 1)
    length = classes * 2 * LOG_ODDS_BINS
    if reference.dtype == torch.bool:
        counts = torch.bincount((index + LOG_ODDS_BINS * reference.long()).reshape(-1), minlength=length).double()
    else:
        share = reference.double().reshape(-1)
        counts = (torch.bincount((index + LOG_ODDS_BINS).reshape(-1), weights=share, minlength=length)
                  + torch.bincount(index.reshape(-1), weights=1 - share, minlength=length))
    return counts.view(classes, 2, LOG_ODDS_BINS)


def fit_temperature(histograms: torch.Tensor) -> torch.Tensor:
    """Per-class ``T`` ``(K,)`` minimising the NLL of the pooled ``(S, K, 2, B)`` histograms."""
    pooled = histograms.sum(0)  # (K, 2, B)
    occupied = pooled.sum((0, 1)) > 0  # only bins that hold voxels contribute
    pooled = pooled[..., occupied]
    temperatures = TEMPERATURES.to(pooled.device)
    z = bin_centres(pooled.device)[occupied] / temperatures.view(-1, 1)  # (T, occupied bins)
    # −log(1 − σ(z)) = softplus(z) for the class's non-voxels, −log σ(z) = softplus(−z) for its voxels
    nll = pooled[:, 0] @ torch.nn.functional.softplus(z).T + pooled[:, 1] @ torch.nn.functional.softplus(-z).T  # (K, T)
    return temperatures[nll.argmin(-1)]


def calibrated_probabilities(temperature: torch.Tensor) -> torch.Tensor:
    """``σ(z_b / T_k)`` per class and bin, ``(K, B)``."""
    return torch.sigmoid(bin_centres(temperature.device) / temperature.view(-1, 1))


def fit_platt(histograms: torch.Tensor, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class slope ``a`` and bias ``b`` ``(K,)`` minimising the NLL of ``σ(a·z + b)`` on the
    pooled ``(S, K, 2, B)`` histograms: damped Newton steps on the convex 2-parameter problem."""
    pooled = histograms.sum(0)  # (K, 2, B)
    negative, positive = pooled[:, 0], pooled[:, 1]
    z = bin_centres(pooled.device).expand_as(negative)
    features = torch.stack([z, torch.ones_like(z)], -1)  # (K, B, 2)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, device=pooled.device).repeat(len(pooled), 1)  # (K, 2)

    def nll(p: torch.Tensor) -> torch.Tensor:
        u = (features @ p.unsqueeze(-1))[..., 0]
        return (positive * F.softplus(-u) + negative * F.softplus(u)).sum(-1)

    for _ in range(iterations):  # Newton converges in a few steps on this smooth convex problem
        probability = torch.sigmoid((features @ params.unsqueeze(-1))[..., 0])  # (K, B)
        gradient = (features * ((negative + positive) * probability - positive).unsqueeze(-1)).sum(1)
        weight = (negative + positive) * probability * (1 - probability)
        hessian = features.transpose(1, 2) @ (features * weight.unsqueeze(-1))
        hessian = hessian + 1e-9 * torch.eye(2, dtype=torch.float64, device=pooled.device)
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1))[..., 0]
        scale = torch.ones(len(params), dtype=torch.float64, device=pooled.device)
        current = nll(params)
        for _ in range(30):  # halve the step until the NLL does not rise
            worse = nll(params - scale.unsqueeze(-1) * step) > current
            if not worse.any():
                break
            scale = torch.where(worse, scale / 2, scale)
        params = params - scale.unsqueeze(-1) * step
        if bool((scale.unsqueeze(-1) * step).abs().max() < 1e-12):
            break
    return params[:, 0], params[:, 1]


def platt_probabilities(slope: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``σ(a_k·z_b + b_k)`` per class and bin, ``(K, B)``."""
    return torch.sigmoid(slope.view(-1, 1) * bin_centres(slope.device) + bias.view(-1, 1))


def fit_isotonic(histograms: torch.Tensor) -> torch.Tensor:
    """Per class and bin ``(K, B)``: the non-decreasing function of the log-odds closest in
    count-weighted squared error to each bin's observed frequency (pool adjacent violators);
    bins without voxels take their neighbours' value."""
    pooled = histograms.sum(0).double().cpu()  # (K, 2, B): small; fitted once per validation
    fitted = torch.zeros(pooled.shape[0], pooled.shape[2], dtype=torch.float64)
    for k in range(pooled.shape[0]):
        counts, positives = pooled[k].sum(0), pooled[k, 1]
        occupied = torch.nonzero(counts > 0).flatten().tolist()
        blocks: list[list[float]] = []  # [sum of positives, sum of counts, number of bins]
        for b in occupied:
            blocks.append([float(positives[b]), float(counts[b]), 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                last = blocks.pop()
                blocks[-1] = [blocks[-1][0] + last[0], blocks[-1][1] + last[1], blocks[-1][2] + last[2]]
        values = [block[0] / block[1] for block in blocks for _ in range(int(block[2]))]
        if occupied:
            on_occupied = torch.tensor(values, dtype=torch.float64)
            position = torch.searchsorted(torch.tensor(occupied), torch.arange(pooled.shape[2]), right=True) - 1
            fitted[k] = on_occupied[position.clamp_min(0)]
    return fitted.to(histograms.device)


def calibration_error(histograms: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """ECE ``(K,)`` of the pooled histograms when each bin's voxels have ``probability`` ``(K, B)``."""
    pooled = histograms.sum(0)  # (K, 2, B)
    sums = reliability_bins(probability, pooled[:, 1], count=pooled.sum(1))
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
    # both empty is right: it scores 1 for the choice (NaN only in what is reported)
    mean = dice.nan_to_num(1.0).mean(0)  # (K, B + 1)
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


def uncalibrated_probability(classes: int) -> torch.Tensor:
    """The probability of every log-odds bin as it is, ``(classes, B)`` float64."""
    return torch.sigmoid(bin_centres()).expand(classes, -1)


METHODS = ("none", "temperature", "platt", "isotonic")  # the recalibrations of a soft volume


@dataclass
class CalibrationMaps:
    """Fitted recalibration maps for ``K`` classes: ``temperature``, ``platt_slope``,
    ``platt_bias`` ``(K,)`` and ``isotonic`` ``(K, B)`` (the probability of each log-odds bin)."""

    temperature: torch.Tensor
    platt_slope: torch.Tensor
    platt_bias: torch.Tensor
    isotonic: torch.Tensor

    @classmethod
    def fit(cls, histograms: torch.Tensor) -> CalibrationMaps:
        """Every map fitted on the pooled ``(S, K, 2, B)`` histograms."""
        histograms = histograms.double()
        slope, bias = fit_platt(histograms)
        return cls(fit_temperature(histograms), slope, bias, fit_isotonic(histograms))

    def bin_probability(self, method: str) -> torch.Tensor:
        """The recalibrated probability of every class and log-odds bin, ``(K, B)`` float64."""
        if method == "none":
            return uncalibrated_probability(len(self.temperature)).to(self.temperature.device)
        if method == "temperature":
            return calibrated_probabilities(self.temperature)
        if method == "platt":
            return platt_probabilities(self.platt_slope, self.platt_bias)
        if method == "isotonic":
            return self.isotonic
        raise ValueError(f"unknown recalibration {method!r}; one of {METHODS}")


def soft_volumes(histograms: torch.Tensor, voxel_ml: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """``Σ n_b p_b × voxel volume`` per subject and class ``(S, K)`` (ml)."""
    counts = histograms.double().sum(2)  # (S, K, B)
    return (counts * probability.unsqueeze(0)).sum(-1) * voxel_ml.double().view(-1, 1)


def posthoc_remedies(histograms: torch.Tensor, voxel_ml: torch.Tensor) -> tuple[dict, dict]:
    """All remedies for ``(S, K, 2, B)`` histograms and ``(S,)`` voxel volumes (ml), fitted on
    those subjects themselves (in-sample; :mod:`biasseg.metrics.volume_quote` fits them on others).

    Returns per-subject ``(S, K)`` tensors ``volume_soft_calibrated_ml`` (temperature),
    ``volume_soft_platt_ml``, ``volume_soft_isotonic_ml``, ``dice_threshold``,
    ``volume_threshold_ml``, ``dice_rankseg``, ``volume_rankseg_ml``, and per-class ``(K,)``
    ``temperature``, ``platt_slope``, ``platt_bias``, ``threshold`` and the pooled ECE after
    each recalibration: ``ece_calibrated`` (temperature), ``ece_platt``, ``ece_isotonic``;
    ``isotonic_map`` ``(K, B)``, the fitted isotonic probability of every bin.
    """
    maps = CalibrationMaps.fit(histograms)
    probability = {name: maps.bin_probability(method) for name, method in
                   (("calibrated", "temperature"), ("platt", "platt"), ("isotonic", "isotonic"))}
    threshold, dice_threshold, threshold_voxels = threshold_decoding(histograms)
    dice_rankseg, rankseg_voxels = rankseg_decoding(histograms, maps.temperature)
    voxel_ml = voxel_ml.view(-1, 1)
    rows = {f"volume_soft_{name}_ml": soft_volumes(histograms, voxel_ml, p) for name, p in probability.items()}
    rows.update({
        "dice_threshold": dice_threshold,
        "volume_threshold_ml": threshold_voxels * voxel_ml,
        "dice_rankseg": dice_rankseg,
        "volume_rankseg_ml": rankseg_voxels * voxel_ml,
    })
    fitted = {
        "temperature": maps.temperature,
        "platt_slope": maps.platt_slope,
        "platt_bias": maps.platt_bias,
        "isotonic_map": maps.isotonic,
        "threshold": threshold,
        **{f"ece_{name}": calibration_error(histograms, p) for name, p in probability.items()},
    }
    return rows, fitted
