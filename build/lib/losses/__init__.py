"""Segmentation losses: all take logits ``(B, C, D, H, W)`` and a label map or soft target."""

from losses.compound import CompoundLoss
from losses.cross_entropy import CrossEntropyLoss
from losses.soft_dice import SoftDiceLoss
from losses.unified_focal import UnifiedFocalLoss

__all__ = ["CompoundLoss", "CrossEntropyLoss", "SoftDiceLoss", "UnifiedFocalLoss"]
