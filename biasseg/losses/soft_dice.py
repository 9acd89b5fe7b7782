"""The soft-overlap family in one implementation: soft Dice, Jaccard, Tversky, DSC++,
generalised Dice and the soft-label (semimetric) Dice and Jaccard.

For class ``c`` over a reduction set ``R`` (the voxels of one image, or of the whole batch
when ``batch_dice=True``), with softmax probabilities ``p`` and target probabilities ``y``::

    TP = Σ_R p·y,   FP = Σ_R p − TP,   FN = Σ_R y − TP
    score = (2·TP + smooth_nr) / (2·TP + 2α·FP + 2β·FN + smooth_dr)

and the loss is ``1 − mean(score)``, the mean over the scored classes (and over images when
per image). ``α`` weighs false positives, ``β`` false negatives:

* ``α = β = 0.5``: soft Dice ``(2·TP + nr) / (Σp + Σy + dr)``, exactly nnU-Net v2's;
* ``α = β = 1``: soft Jaccard ``TP / (TP + FP + FN)``, smoothed as MONAI's
  ``DiceLoss(jaccard=True)``: ``(2·TP + nr) / (2·(Σp + Σy − TP) + dr)``;
* otherwise the Tversky index (Salehi et al., MLMI 2017) ``TP / (TP + α·FP + β·FN)``; MONAI's
  ``TverskyLoss`` smooths ``(TP + s) / (TP + α·FP + β·FN + s)``, which is ours with ``2s``.

Options change the three sums, not the formula:

* ``squared`` (V-Net, Milletari et al. 2016): ``FP = Σp² − TP``, ``FN = Σy² − TP``, so the
  Dice denominator is ``Σp² + Σy²`` (MONAI's ``squared_pred``, also with Jaccard). Needs
  ``α = β``: otherwise the denominator can be negative.
* ``error_exponent = γ`` (DSC++, Yeung et al., J Digit Imaging 2023, "Calibrating the Dice loss
  to handle neural network overconfidence"): the voxel errors are raised to ``γ`` before
  summing, ``FP = Σ (p·(1−y))^γ``, ``FN = Σ ((1−p)·y)^γ`` (the authors' reference code);
  ``γ = 1`` is the plain definition, ``γ = 2`` the recommended one.
* ``soft_label`` (Wang & Blaschko, "Dice semimetric losses: optimizing the Dice score with
  soft labels", MICCAI 2023; "Jaccard metric losses", NeurIPS 2023): ``TP = (Σp + Σy − Σ|p − y|)/2``,
  which equals ``Σ p·y`` for hard targets but, unlike it, is maximal at ``p = y`` for soft ones:
  DML = ``1 − (Σp + Σy − Σ|p−y|)/(Σp + Σy)`` at ``α = β = 0.5``, JML =
  ``1 − (Σp + Σy − Σ|p−y|)/(Σp + Σy + Σ|p−y|)`` at ``α = β = 1`` (MONAI's ``soft_label=True``).
  With ``squared`` the same identity in the L2 norm gives ``Σ p·y`` again: no change.
* ``calibrated_surrogate`` (Nordström, Bao, Löfman, Hult, Maki, Sugiyama, "Calibrated surrogate
  maximization of Dice", MICCAI 2020, after Bao & Sugiyama, AISTATS 2020): the indicator of a
  predicted voxel is replaced by bounds built from the logistic loss in base 2,
  ``φ(m) = log₂(1 + e^{−m}) ≥ 1[m ≤ 0]``, of the one-vs-rest log-odds
  ``z_c = logit_c − log Σ_{k≠c} e^{logit_k}`` (for two classes, the difference of the logits)::

      TP = Σ y·(1 − φ(z)) ≤ Σ y·1[z > 0],   FP = Σ (1 − y)·φ(−z) ≥ Σ (1 − y)·1[z ≥ 0],   FN = Σ y − TP

  so at ``α = β = ½`` the score ``2TP / (Σy + TP + FP)`` is a lower bound of the Dice of the
  decision ``z > 0`` (the numerator shrinks, the denominator grows), and it is quasi-concave in
  the logits: ``{score ≥ t}`` is ``{(2 − t)·TP − t·FP ≥ t·Σy}``, a superlevel set of a concave
  function (``1 − φ`` is concave, ``φ(−·)`` convex). Soft Dice is neither (Nordström et al.).
  *Calibrated* is Bao & Sugiyama's sense: the *decision* ``z > 0`` at the optimum is a threshold
  of the true foreground probability ``q``. Its probabilities are not ``q``: where the expected
  score is maximal at value ``t``, every voxel's stationarity condition gives
  ``logit p = logit q + log((2 − t)/t)``, odds inflated by ``(2 − t)/t`` and a decision
  threshold ``q > t/2`` (``theory.expected_loss`` checks this on its voxel groups; RESULTS.md
  measures it). ``p·y`` in the other options is replaced, ``soft_label``, ``squared`` and
  ``error_exponent`` do not apply.
* ``generalised`` (Sudre et al., DLMIA 2017): the classes are summed, weighted, before the
  ratio: ``(2·Σ_c w_c·TP_c + nr) / (Σ_c w_c·D_c + dr)`` with ``D_c`` the denominator above and
  ``w_c = 1/(Σy_c)²`` (``"square"``), ``1/Σy_c`` (``"simple"``) or ``1`` (``"uniform"``), as
  MONAI's ``GeneralizedDiceLoss(w_type=…)``. An absent class's infinite weight is replaced by
  the largest finite weight of the image (of the batch with ``batch_dice``), as MONAI does.
  With soft targets a nearly absent class (tiny ``Σy``) dominates the ``"square"`` weights,
  so such an image's loss is ≈ 1 with a vanishing gradient (MONAI alike).

Conventions follow nnU-Net v2 and the paper (Bertels et al., BrainLes 2019 / MedIA 2021):
softmax over *all* classes first, then the background channel is dropped
(``include_background=False``, default) — dropping before the activation is MONAI issue #5413.
Smoothing 1e-5 in numerator and denominator as nnU-Net. ``batch_dice`` pools the sums over the
batch before the ratio ("batch Dice", nnU-Net's ``batch_dice``). Under DDP,
``pool_across_processes`` makes "batch" the global batch: the batch sums are added over all
processes, with their gradients (as nnU-Net does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from biasseg.errors import InputError
from biasseg.losses.distributed import sum_across_processes
from biasseg.losses.targets import class_probabilities

GENERALISED_WEIGHTS = ("uniform", "simple", "square")


class SoftDiceLoss(nn.Module):
    """``1 − mean soft overlap score`` from logits ``(B, C, D, H, W)`` and a label map or soft target.

    Args:
        batch_dice: pool the sums over the whole batch (one score per class) instead of one
            score per image and class.
        include_background: also score class 0.
        alpha: weight of the false positives (0.5: Dice, 1: Jaccard).
        beta: weight of the false negatives (0.5: Dice, 1: Jaccard).
        squared: ``Σp²`` and ``Σy²`` in place of ``Σp`` and ``Σy`` (V-Net); needs ``alpha == beta``.
        error_exponent: DSC++'s ``γ ≥ 1``, the power of the voxel false positives and negatives.
        soft_label: the semimetric intersection ``(Σp + Σy − Σ|p − y|)/2`` (Wang & Blaschko 2023).
        generalised: ``None`` (one score per class) or the generalised Dice class weights,
            ``"square"``, ``"simple"`` or ``"uniform"`` (Sudre et al. 2017).
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        pool_across_processes: with ``batch_dice`` under DDP, pool the sums over the batches
            of all processes (the global batch), with gradients; no effect otherwise.
        calibrated_surrogate: Nordström et al.'s lower bound on the logistic loss of the
            log-odds instead of ``p·y`` (see the module docstring).

    ``forward`` also takes ``alpha``/``beta`` for one call (the Tversky hypernetwork draws them
    per batch).
    """

    def __init__(
        self,
        batch_dice: bool = False,
        include_background: bool = False,
        alpha: float = 0.5,
        beta: float = 0.5,
        squared: bool = False,
        error_exponent: float = 1.0,
        soft_label: bool = False,
        generalised: str | None = None,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        pool_across_processes: bool = False,
        calibrated_surrogate: bool = False,
    ) -> None:
        super().__init__()
        if smooth_nr < 0 or smooth_dr < 0:
            raise InputError("smooth_nr and smooth_dr must be >= 0")
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise InputError(f"alpha and beta must be >= 0 and not both 0; got {alpha}, {beta}")
        if squared and alpha != beta:
            raise InputError(f"squared needs alpha == beta (else the denominator can be negative); got {alpha}, {beta}")
        if error_exponent < 1:
            raise InputError(f"error_exponent must be >= 1 (its gradient at 0 is infinite below 1); got {error_exponent}")
        if error_exponent != 1 and (squared or soft_label):
            raise InputError("error_exponent (DSC++) cannot be combined with squared or soft_label")
        if calibrated_surrogate and (squared or soft_label or error_exponent != 1):
            raise InputError("calibrated_surrogate replaces the intersection: it cannot be combined with squared, soft_label or error_exponent")
        if generalised not in (None, *GENERALISED_WEIGHTS):
            raise InputError(f"generalised must be None or one of {GENERALISED_WEIGHTS}; got {generalised!r}")
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.squared = squared
        self.error_exponent = float(error_exponent)
        self.soft_label = soft_label
        self.generalised = generalised
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.pool_across_processes = pool_across_processes
        self.calibrated_surrogate = calibrated_surrogate

    def _sums(
        self, probs: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...], log_odds: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[TP, FP, FN]`` (and ``Σy`` for the generalised weights) over ``dims``; ``log_odds``
        (one-vs-rest, like ``probs``) for the calibrated surrogate."""
        if self.calibrated_surrogate:
            # φ(m) = log2(1 + e^−m) = softplus(−m) / ln 2, finite for any logit; softplus(−m) = softplus(m) − m
            softplus = F.softplus(log_odds)
            tp = (target * (1 - (softplus - log_odds) / math.log(2))).sum(dims)
            fp = ((1 - target) * softplus / math.log(2)).sum(dims)
            fn = target.sum(dims) - tp
        elif self.squared:
            tp = (probs * target).sum(dims)
            fp, fn = (probs * probs).sum(dims) - tp, (target * target).sum(dims) - tp
        elif self.error_exponent != 1:
            tp = (probs * target).sum(dims)
            fp = (probs * (1 - target)).pow(self.error_exponent).sum(dims)
            fn = ((1 - probs) * target).pow(self.error_exponent).sum(dims)
        else:
            prob_sum, target_sum = probs.sum(dims), target.sum(dims)
            if self.soft_label:
                tp = (prob_sum + target_sum - (probs - target).abs().sum(dims)) / 2
            else:
                tp = (probs * target).sum(dims)
            fp, fn = prob_sum - tp, target_sum - tp
        sums = [tp, fp, fn]
        if self.generalised is not None:
            sums.append(target.sum(dims))
        return sums

    def _generalised_weights(self, target_sum: torch.Tensor) -> torch.Tensor:
        """Class weights ``(…, C')``; an absent class gets the largest finite weight (as MONAI)."""
        if self.generalised == "uniform":
            return torch.ones_like(target_sum)
        counts = target_sum.detach()
        weights = counts.reciprocal() if self.generalised == "simple" else (counts * counts).reciprocal()
        absent = torch.isinf(weights)
        weights = weights.masked_fill(absent, 0.0)
        # all classes absent: all weights 0, and the score is smooth_nr / smooth_dr
        return torch.where(absent, weights.amax(-1, keepdim=True), weights)

    def scores(
        self, logits: torch.Tensor, target: torch.Tensor, alpha: float | None = None, beta: float | None = None
    ) -> torch.Tensor:
        """Scores ``(B, C')`` per image, ``(C',)`` with ``batch_dice``; ``C'`` is ``C`` or ``C − 1``
        without background. With ``generalised`` the classes are pooled: ``(B,)``, or ``()``.
        ``alpha``/``beta`` replace the configured weights for this call."""
        if logits.shape[1] < 2:
            raise InputError("SoftDiceLoss expects at least 2 classes (softmax); got 1 channel")
        alpha = self.alpha if alpha is None else float(alpha)
        beta = self.beta if beta is None else float(beta)
        if self.squared and alpha != beta:
            raise InputError(f"squared needs alpha == beta; got {alpha}, {beta}")
        logits = logits.float()
        target = class_probabilities(logits, target)
        log_odds = one_vs_rest_log_odds(logits) if self.calibrated_surrogate else None
        probs = logits if self.calibrated_surrogate else torch.softmax(logits, dim=1)  # the surrogate reads log-odds only
        if not self.include_background:
            probs, target = probs[:, 1:], target[:, 1:]
            log_odds = None if log_odds is None else log_odds[:, 1:]
        dims = tuple(range(2, probs.ndim))
        if self.batch_dice:
            dims = (0, *dims)
        sums = torch.stack(self._sums(probs, target, dims, log_odds))
        if self.batch_dice and self.pool_across_processes:
            sums = sum_across_processes(sums)
        tp, fp, fn = sums[0], sums[1], sums[2]
        numerator = 2 * tp
        denominator = 2 * tp + 2 * alpha * fp + 2 * beta * fn
        if self.generalised is None:
            return (numerator + self.smooth_nr) / (denominator + self.smooth_dr)
        weights = self._generalised_weights(sums[3])
        numerator, denominator = (weights * numerator).sum(-1), (weights * denominator).sum(-1)
        return (numerator + self.smooth_nr) / (denominator + self.smooth_dr)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, alpha: float | None = None, beta: float | None = None
    ) -> torch.Tensor:
        return 1 - self.scores(logits, target, alpha, beta).mean()

    def extra_repr(self) -> str:
        return (
            f"batch_dice={self.batch_dice}, include_background={self.include_background}, "
            f"alpha={self.alpha}, beta={self.beta}, squared={self.squared}, "
            f"error_exponent={self.error_exponent}, soft_label={self.soft_label}, "
            f"generalised={self.generalised}, smooth_nr={self.smooth_nr}, smooth_dr={self.smooth_dr}, "
            f"pool_across_processes={self.pool_across_processes}, calibrated_surrogate={self.calibrated_surrogate}"
        )


def one_vs_rest_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """``log p_c − log Σ_{k≠c} p_k = logit_c − logsumexp_{k≠c} logit_k`` per class, ``(B, C, …)``."""
    if logits.shape[1] == 2:  # the other class's logit alone
        return logits - logits.flip(1)
    others = torch.stack([torch.logsumexp(torch.cat([logits[:, :c], logits[:, c + 1 :]], 1), 1) for c in range(logits.shape[1])], 1)
    return logits - others
