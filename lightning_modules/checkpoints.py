"""Rebuild a trained model from a training checkpoint (for evaluation and prediction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_modules.segmentation_module import SegmentationModule


@dataclass
class TrainedModel:
    """A trained module and how its data was preprocessed (``inference_settings``, see
    ``SegmentationDataModule.inference_settings``)."""

    module: SegmentationModule
    inference_settings: dict


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """The checkpoint dict; a clear error when the file is missing or not one of ours."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "run_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no run_config/state_dict)")
    return checkpoint


def load_trained(checkpoint: dict, sliding_window: dict | None = None) -> TrainedModel:
    """The module with the checkpoint's weights (eval mode, on the CPU).

    ``sliding_window`` (``SlidingWindow`` keyword arguments) replaces the validation
    settings the model was trained with; None keeps them.
    """
    run_config = OmegaConf.create(checkpoint["run_config"])
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    if sliding_window is not None:
        hparams["sliding_window"] = {**hparams.get("sliding_window", {}), **sliding_window}
    module = SegmentationModule(loss=instantiate(run_config.loss), **hparams)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return TrainedModel(module, checkpoint.get("inference_settings", {}))
