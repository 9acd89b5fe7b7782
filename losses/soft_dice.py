"""The soft-Dice family in one implementation.

Soft Dice of class ``c`` over a reduction set ``R`` (the voxels of one image, or of the
whole batch when ``batch_dice=True``), with softmax probabilities ``p`` and target ``y``::

    I = Σ_R p·y,  S = Σ_R p + Σ_R y          (S = Σ p² + Σ y² when squared=True)
    Dice    = (2·I + smooth_nr) / (S + smooth_dr)
    Jaccard = (I + smooth_nr) / (S − I + smooth_dr)   (jaccard=True)

The loss is ``1 − mean(score)``, the mean over foreground classes (and over images when
per-image). Conventions follow nnU-Net v2 and the paper (Bertels et al., BrainLes 2019 /
MedIA 2021): softmax over *all* classes first, then the background channel is dropped
(``include_background=False``, default) — dropping before the activation is MONAI issue #5413.
Smoothing 1e-5 in numerator and denominator as nnU-Net. ``batch_dice`` pools the sums over
the batch before the ratio ("batch Dice", nnU-Net's ``batch_dice``; Milletari et al. 2016
V-Net for ``squared``). Under DDP, ``pool_across_processes`` makes "batch" the global
batch: the batch sums are added over all processes, with their gradients (as nnU-Net does).
"""

from __future__ import annotations

import torch
from torch import nn

from losses.distributed import sum_across_processes
from losses.targets import class_probabilities


class SoftDiceLoss(nn.Module):
    """``1 − mean soft Dice`` from logits ``(B, C, D, H, W)`` and a label map or soft target.

    Args:
        batch_dice: pool intersections and sums over the whole batch (one Dice per class)
            instead of one Dice per image and class.
        include_background: also score class 0.
        squared: use squared terms in the denominator (V-Net, Milletari et al. 2016).
        jaccard: optimise the soft Jaccard (IoU) instead of Dice.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        pool_across_processes: with ``batch_dice`` under DDP, pool the sums over the batches
            of all processes (the global batch), with gradients; no effect otherwise.
    """

    def __init__(
        self,
        batch_dice: bool = False,
        include_background: bool = False,
        squared: bool = False,
        jaccard: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        pool_across_processes: bool = False,
    ) -> None:
        super().__init__()
        if smooth_nr < 0 or smooth_dr < 0:
            raise ValueError("smooth_nr and smooth_dr must be >= 0")
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.squared = squared
        self.jaccard = jaccard
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.pool_across_processes = pool_across_processes

    def scores(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice (or Jaccard) scores: ``(B, C')`` per image, ``(C',)`` with ``batch_dice``.

        ``C'`` is ``C`` or ``C − 1`` without background.
        """
        if logits.shape[1] < 2:
            raise ValueError("SoftDiceLoss expects at least 2 classes (softmax); got 1 channel")
        logits = logits.float()
        probs = torch.softmax(logits, dim=1)
        onehot = class_probabilities(logits, target)
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        dims = tuple(range(2, probs.ndim))
        if self.batch_dice:
            dims = (0, *dims)
        intersection = (probs * onehot).sum(dims)
        if self.squared:
            total = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
        else:
            total = probs.sum(dims) + onehot.sum(dims)
        if self.batch_dice and self.pool_across_processes:
            intersection, total = sum_across_processes(torch.stack([intersection, total])).unbind(0)
        if self.jaccard:
            return (intersection + self.smooth_nr) / (total - intersection + self.smooth_dr)
        return (2 * intersection + self.smooth_nr) / (total + self.smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1 - self.scores(logits, target).mean()

    def extra_repr(self) -> str:
        return (
            f"batch_dice={self.batch_dice}, include_background={self.include_background}, "
            f"squared={self.squared}, jaccard={self.jaccard}, "
            f"smooth_nr={self.smooth_nr}, smooth_dr={self.smooth_dr}, "
            f"pool_across_processes={self.pool_across_processes}"
        )
