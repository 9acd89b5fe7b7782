"""The segmentation LightningModule, its 3D U-Net and sliding-window inference."""

from lightning_modules.segmentation_module import SegmentationModule
from lightning_modules.sliding_window import SlidingWindow, sliding_window_probabilities
from lightning_modules.unet import UNet3D

__all__ = ["SegmentationModule", "SlidingWindow", "UNet3D", "sliding_window_probabilities"]
