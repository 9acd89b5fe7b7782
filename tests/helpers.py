"""What the tests share: tiny, CPU-fast overrides of the real Hydra configs and small readers
of a run's outputs. Fixtures stay in conftest.py; everything a test imports comes from here."""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import DictConfig, open_dict

from biasseg.cli import CONFIGS
from biasseg.cli import compose_config as compose_named
from datamodules import FolderDataModule

ROOT = CONFIGS.parent  # the checkout: entry-point scripts, configs/
CONFIG_DIR = CONFIGS

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
# A tiny run on a generated dataset folder (add data.root and data.cache_dir).
TINY_FOLDER = ["data=folder", "data.patch_size=[16,16,8]", *TINY_RUN, "callbacks.validation_figures=null"]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The train config with ``overrides``, writing into ``output_dir`` (no Hydra run needed)."""
    return with_output_dir(compose_named("train", overrides), output_dir)


def evaluation_config(ckpt: str | Path, output_dir: Path, *overrides: str) -> DictConfig:
    """The evaluate config of checkpoint(s) ``ckpt`` on the CPU, writing into ``output_dir``."""
    cfg = compose_named("evaluate", [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                                     *overrides])
    return with_output_dir(cfg, output_dir)


def with_output_dir(cfg: DictConfig, output_dir: Path | None) -> DictConfig:
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def folder_datamodule(root: Path, cache: Path, **kwargs) -> FolderDataModule:
    """A :class:`FolderDataModule` on ``root`` with tiny, worker-less defaults."""
    return FolderDataModule(root=str(root), cache_dir=str(cache), **{"num_workers": 0, "patch_size": (16, 16, 8), **kwargs})


def reference_volumes(subjects_csv: Path) -> dict[str, float]:
    """``{subject: reference volume (ml)}`` of a run's ``subjects.csv``."""
    with open(subjects_csv) as handle:
        return {row["subject"]: float(row["volume_ref_ml"]) for row in csv.DictReader(handle)}
