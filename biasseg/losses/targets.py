"""Turn a segmentation target into per-class probabilities.

Every loss in :mod:`biasseg.losses` accepts two target forms:

* an integer label map of shape ``(B, 1, D, H, W)`` (or ``(B, D, H, W)``), values in ``[0, C)``;
* class probabilities of shape ``(B, C, D, H, W)`` (soft targets), summing to 1 over ``C``.
"""

from __future__ import annotations

import torch


def is_soft_target(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """True when ``target`` holds class probabilities shaped like ``logits``."""
    return target.is_floating_point() and target.shape == logits.shape and logits.shape[1] > 1


def label_map(target: torch.Tensor) -> torch.Tensor:
    """Integer label map ``(B, D, H, W)`` from ``(B, 1, D, H, W)`` or ``(B, D, H, W)``."""
    if target.ndim == 5:
        if target.shape[1] != 1:
            raise ValueError(f"an integer target must have one channel, got shape {tuple(target.shape)}")
        target = target[:, 0]
    return target.long()


def class_probabilities(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target as class probabilities ``(B, C, D, H, W)`` in ``logits``' float dtype.

    Integer label maps are one-hot encoded; soft targets are returned as they are.
    """
    num_classes = logits.shape[1]
    if is_soft_target(logits, target):
        return target.to(logits.dtype)
    labels = label_map(target)
    if labels.shape[0] != logits.shape[0] or labels.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    # compare against the class indices directly in (B, C, …) layout: no int64 one-hot, no permute
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, *([1] * (labels.ndim - 1)))
    return (labels.unsqueeze(1) == classes).to(logits.dtype)
