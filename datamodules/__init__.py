"""TorchIO datamodules: one shared patch/queue/validation pipeline, one subclass per source."""

from datamodules.segmentation import SegmentationDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = ["SegmentationDataModule", "SyntheticDataModule"]
