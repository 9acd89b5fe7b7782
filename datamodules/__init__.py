"""Datamodules: one shared patch-training / whole-volume-validation pipeline, one subclass per source."""

from biasseg.errors import DatasetError
from datamodules.folder import FolderDataModule
from datamodules.mni152 import MNI152DataModule
from datamodules.segmentation import SegmentationDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = ["DatasetError", "FolderDataModule", "MNI152DataModule", "SegmentationDataModule", "SyntheticDataModule"]
