"""Asymmetric Unified Focal loss (Yeung et al., Comput Med Imaging Graph 2022, "Unified Focal
loss: Generalising Dice and cross entropy-based losses to handle class imbalanced medical image
segmentation"), built from the shared pieces: the focal cross-entropy of
:mod:`biasseg.losses.cross_entropy` and the Tversky score of :class:`biasseg.losses.SoftDiceLoss`.

With ``λ = weight``, ``δ = delta``, ``γ = gamma``, softmax probabilities ``p`` and target ``y``::

    L   = λ · L_aF + (1 − λ) · L_aFT
    L_aF  = mean over voxels of  −(1 − δ)·(1 − p_0)^γ·y_0·log p_0  −  Σ_{c≥1} δ·y_c·log p_c
    L_aFT = mean over images and all C classes of  [1 − TI_0,  (1 − TI_c)^(1−γ) for c ≥ 1]

with ``TI_c`` the Tversky index of class ``c`` (background included), false positives weighted
``1 − δ`` and false negatives ``δ``. The background is suppressed (focal factor in the
cross-entropy, no enhancement in the Tversky term) and every foreground class is "rare"
(enhanced), which is the authors' multi-class generalisation of their binary definition.

Where this differs from the references, deliberately:

* Inputs are logits and the softmax is applied here. MONAI's ``AsymmetricUnifiedFocalLoss``
  documents logits but applies no activation (it expects probabilities), and it is binary only.
* MONAI averages its focal term over the two classes as well as the voxels, halving it relative
  to the authors' code (sum over classes, mean over voxels), which we follow.
* ``λ`` weighs the focal cross-entropy as in MONAI and the paper's ``λ·L_maF + (1 − λ)·L_maFT``;
  the authors' TensorFlow code puts ``weight`` on the Tversky term. Identical at ``λ = 0.5``.
* No clipping of ``p`` to ``[ε, 1 − ε]``: the log-softmax is finite; the Tversky smoothing is
  ``smooth`` in numerator and denominator of ``(2·TP + s)/(2·TP + 2α·FP + 2β·FN + s)``, i.e. the
  authors' ``ε`` is ``smooth / 2``.
"""

from __future__ import annotations

import torch
from torch import nn

from biasseg.errors import InputError
from biasseg.losses.cross_entropy import focal_cross_entropy
from biasseg.losses.soft_dice import SoftDiceLoss


class UnifiedFocalLoss(nn.Module):
    """Asymmetric Unified Focal loss from logits ``(B, C, D, H, W)`` and a label map or soft target.

    Args:
        weight: ``λ`` in ``[0, 1]``, the weight of the focal cross-entropy; ``1 − λ`` weighs the
            focal Tversky term.
        delta: ``δ`` in ``[0, 1]``: foreground class weight in the cross-entropy (background
            ``1 − δ``) and false-negative weight in the Tversky index (false positives ``1 − δ``).
        gamma: ``γ`` in ``[0, 1)``: background suppression ``(1 − p_0)^γ`` in the cross-entropy,
            foreground enhancement ``(1 − TI)^(1−γ)`` in the Tversky term.
        batch_dice: Tversky indices over the whole batch instead of per image.
        pool_across_processes: with ``batch_dice`` under DDP, over the global batch.
        smooth: Tversky smoothing in numerator and denominator.
    """

    def __init__(
        self,
        weight: float = 0.5,
        delta: float = 0.6,
        gamma: float = 0.5,
        batch_dice: bool = False,
        pool_across_processes: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if not (0 <= weight <= 1 and 0 <= delta <= 1 and 0 <= gamma < 1):
            raise InputError(f"need 0 <= weight, delta <= 1 and 0 <= gamma < 1; got {weight}, {delta}, {gamma}")
        self.weight = float(weight)
        self.delta = float(delta)
        self.gamma = float(gamma)
        self.tversky = SoftDiceLoss(
            batch_dice=batch_dice,
            include_background=True,
            alpha=1 - delta,
            beta=delta,
            smooth_nr=smooth,
            smooth_dr=smooth,
            pool_across_processes=pool_across_processes,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        foreground = torch.ones(num_classes, device=logits.device)
        foreground[0] = 0.0
        class_weight = self.delta * foreground + (1 - self.delta) * (1 - foreground)
        focal = focal_cross_entropy(logits, target, gamma=self.gamma * (1 - foreground), weight=class_weight)
        shortfall = 1 - self.tversky.scores(logits, target)
        # (1 − TI)^(1−γ) has an infinite gradient at TI = 1: clamp as the focal factor
        enhanced = shortfall[..., 1:].clamp_min(torch.finfo(shortfall.dtype).tiny).pow(1 - self.gamma)
        tversky = torch.cat([shortfall[..., :1], enhanced], dim=-1).mean()
        return self.weight * focal + (1 - self.weight) * tversky

    def extra_repr(self) -> str:
        return f"weight={self.weight}, delta={self.delta}, gamma={self.gamma}"
