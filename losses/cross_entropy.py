"""Cross-entropy for segmentation: a proper scoring rule, so its optimum is calibrated."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.targets import is_soft_target, label_map


class CrossEntropyLoss(nn.Module):
    """Mean voxel-wise cross-entropy from logits ``(B, C, D, H, W)``.

    The target is an integer label map ``(B, 1, D, H, W)`` or class probabilities
    ``(B, C, D, H, W)`` (soft target). ``weight`` optionally weights the classes (length ``C``).
    """

    def __init__(self, weight: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(list(weight), dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(
                f"CrossEntropyLoss weight has {self.weight.numel()} entries for {logits.shape[1]} classes"
            )
        target = target.float() if is_soft_target(logits, target) else label_map(target)
        return F.cross_entropy(logits, target, weight=self.weight)
