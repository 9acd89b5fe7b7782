"""Cross-entropy and focal loss for segmentation, one implementation.

Per voxel, with softmax probabilities ``p``, target probabilities ``y``, class weights ``w``
and focusing exponent ``γ`` (focal loss, Lin et al., ICCV 2017)::

    ℓ = −Σ_c w_c · y_c · (1 − p_c)^γ · log p_c

and the loss is the plain mean of ``ℓ`` over all voxels of the batch. ``γ = 0`` is
cross-entropy — a proper scoring rule, so its optimum is calibrated — computed by
``F.cross_entropy``. Note the normalisation with class weights: always the voxel count (as
Lin et al., MONAI's ``FocalLoss`` and ``F.cross_entropy`` with soft targets), not
``F.cross_entropy``'s ``Σ w_y`` for label maps, so a label map and its one-hot encoding give
the same loss. MONAI's scalar focal ``alpha`` is ``weight = [1 − alpha, alpha, …, alpha]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from biasseg.errors import InputError
from biasseg.losses.targets import class_probabilities, is_soft_target, label_map


def focal_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float | torch.Tensor = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean voxel focal cross-entropy (see the module docstring).

    Args:
        logits: ``(B, C, D, H, W)``.
        target: label map ``(B, 1, D, H, W)`` or class probabilities ``(B, C, D, H, W)``.
        gamma: focusing exponent ``γ ≥ 0``, one for all classes or a tensor ``(C,)`` per class.
        weight: class weights ``(C,)`` or ``None``.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if weight is not None and weight.numel() != num_classes:
        raise InputError(f"class weight has {weight.numel()} entries for {num_classes} classes")
    num_voxels = logits.numel() // num_classes
    if not isinstance(gamma, torch.Tensor) and gamma == 0:
        target = target.float() if is_soft_target(logits, target) else label_map(target)
        return F.cross_entropy(logits, target, weight=weight, reduction="sum") / num_voxels
    per_class = (1, num_classes) + (1,) * (logits.ndim - 2)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(logits).view(per_class)
    log_probs = F.log_softmax(logits, dim=1)
    # clamped so that (1 − p)^γ has a finite gradient where p rounds to 1 (γ < 1, or γ = 0 per class)
    modulation = (1 - log_probs.exp()).clamp_min(torch.finfo(logits.dtype).tiny).pow(gamma)
    terms = class_probabilities(logits, target) * modulation * log_probs
    if weight is not None:
        terms = terms * weight.to(logits).view(per_class)
    return -terms.sum() / num_voxels


class CrossEntropyLoss(nn.Module):
    """Mean voxel cross-entropy, or focal loss with ``gamma > 0``, from logits ``(B, C, D, H, W)``.

    The target is an integer label map ``(B, 1, D, H, W)`` or class probabilities
    ``(B, C, D, H, W)`` (soft target).

    Args:
        weight: optional class weights, one per class including background.
        gamma: focal loss's focusing exponent (Lin et al. 2017); 0 is cross-entropy.
    """

    def __init__(self, weight: Sequence[float] | None = None, gamma: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise InputError(f"gamma must be >= 0; got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(list(weight), dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_cross_entropy(logits, target, self.gamma, self.weight)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
