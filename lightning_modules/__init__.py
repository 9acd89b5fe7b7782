"""The segmentation LightningModule, its 3D U-Net and sliding-window inference."""

import os
import warnings

if "SLURM_JOB_ID" not in os.environ:
    # Lightning hints "prepend your python command with `srun`" at every Trainer on any machine
    # where srun is installed; outside a SLURM job that is noise (biasseg submits through
    # hydra/launcher=slurm). Inside a job it stays: there it can mean a job started without srun.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")

from lightning_modules.segmentation_module import SegmentationModule
from lightning_modules.sliding_window import SlidingWindow, sliding_window_probabilities
from lightning_modules.unet import UNet3D

__all__ = ["SegmentationModule", "SlidingWindow", "UNet3D", "sliding_window_probabilities"]
