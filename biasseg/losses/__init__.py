"""Segmentation losses: all take logits ``(B, C, D, H, W)`` and a label map or soft target."""

from biasseg.losses.compound import CompoundLoss
from biasseg.losses.cross_entropy import CrossEntropyLoss
from biasseg.losses.soft_dice import SoftDiceLoss
from biasseg.losses.unified_focal import UnifiedFocalLoss

__all__ = ["CompoundLoss", "CrossEntropyLoss", "SoftDiceLoss", "UnifiedFocalLoss"]
