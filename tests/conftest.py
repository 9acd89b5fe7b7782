"""Shared helpers: composing the real Hydra configs with tiny, CPU-fast overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# What any tiny run needs, whatever its data: 2 patches per subject, no workers, a 2-stage
# U-Net, one quiet CPU epoch.
TINY_RUN = [
    "data.samples_per_volume=2",
    "data.steps_per_epoch=null",  # data=folder's fixed 100 steps per epoch would be slow here
    "data.num_workers=0",
    "model.features=[4,8]",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# A tiny but complete run on the synthetic data: 4 training / 2 validation subjects.
TINY = [
    "data.num_train=4",
    "data.num_val=2",
    "data.shape=[32,32,16]",
    "data.radius_mm=[4,7]",
    "data.num_structures=1",
    "data.patch_size=[16,16,16]",
    *TINY_RUN,
]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The train config with ``overrides``, writing into ``output_dir`` (no Hydra run needed)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def thick_slice_run(tmp_path_factory):
    """One epoch on six CT cases, each with its own in-plane (0.7–1.0 mm) and slice (2.5–5 mm)
    spacing, CT normalisation: (dataset root, run dir)."""
    from nifti_datasets import write_thick_slices
    from test_folder_data import TINY_FOLDER

    from train import train

    tmp = tmp_path_factory.mktemp("thick")
    root = write_thick_slices(tmp / "data", modality="CT")
    cfg = compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp / 'cache'}", "data.val_fraction=0.34",
                          "data.normalization=ct"], tmp / "run")
    train(cfg)
    return root, tmp / "run"
