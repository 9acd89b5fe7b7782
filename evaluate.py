"""Evaluate a trained checkpoint on whole validation volumes.

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/best-….ckpt
    python evaluate.py ckpt_path=… data=folder data.root=/data/Task04_Hippocampus

Writes ``metrics.json``, ``subjects.csv`` and ``calibration.csv`` (the format of training's
validation) into ``logs/evaluate/runs/<timestamp>/``; the post-hoc remedies' temperature
and threshold are fitted on the evaluated subjects, as in training's validation. Without ``data=…`` the checkpoint's own data config
is used, with its split (``splits.json`` of the training run, when it still exists).
``epoch`` and ``global_step`` in ``metrics.json`` are the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks import ResultsWriter
from lightning_modules.checkpoints import load_trained, read_checkpoint
from train import exit_on_dataset_error


def data_config(cfg: DictConfig, run_config: DictConfig) -> DictConfig:
    """``cfg.data`` if given, else the training data. Folder data of the training dataset
    reuses the training run's split; the split used is written beside the outputs."""
    data = cfg.data if cfg.get("data") is not None else run_config.data
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
    if "splits_file" in data:
        with open_dict(data):
            trained_split = run_config.data.get("splits_file")
            same_dataset = data.get("root") == run_config.data.get("root")
            if same_dataset and not data.get("splits_from") and trained_split and Path(trained_split).is_file():
                data.splits_from = trained_split
            data.splits_file = str(Path(cfg.paths.output_dir) / "splits.json")
    return data


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate the checkpoint ``cfg.ckpt_path``; returns the summary (``val/…`` keys)."""
    if not cfg.get("ckpt_path"):
        raise ValueError("evaluate.py needs ckpt_path=PATH")
    checkpoint = read_checkpoint(cfg.ckpt_path)
    datamodule = instantiate(data_config(cfg, OmegaConf.create(checkpoint["run_config"])))
    trained = load_trained(checkpoint, sliding_window=datamodule.sliding_window_settings())
    source = {"epoch": checkpoint["epoch"], "global_step": checkpoint["global_step"], "ckpt_path": str(cfg.ckpt_path)}
    writer = ResultsWriter(cfg.paths.output_dir, fields=source)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[writer], logger=False)
    trainer.validate(trained.module, datamodule=datamodule)
    return {f"val/{k}": v for k, v in (trained.module.validation_summary or {}).items()}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_dataset_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
