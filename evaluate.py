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

import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from callbacks import ResultsWriter
from input_errors import InputError, exit_on_input_error
from lightning_modules.checkpoints import check_targets, load_trained, read_checkpoint


def data_config(cfg: DictConfig, run_data: dict, source: str) -> DictConfig:
    """``cfg.data`` if given, else the training data stored in the checkpoint (``source``),
    which may only name biasseg's datamodules and TorchIO transforms and writes its cache to
    this user's cache folder, not to one the checkpoint names. Folder data of the training
    dataset reuses the training run's split; the split used is written beside the outputs."""
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        if not isinstance(run_data, dict):
            raise InputError(f"{source}: its stored config has no data section; give data=…")
        if "_target_" not in run_data:
            raise InputError(f"{source}: its stored data config names no datamodule (_target_); give data=…")
        check_targets(run_data, "data", source)
        data = dict(run_data)
        if "cache_dir" in data:
            data["cache_dir"] = os.environ.get("BIASSEG_CACHE_DIR", "~/.cache/biasseg")
    if "splits_file" in data:
        trained_split = run_data.get("splits_file") if isinstance(run_data, dict) else None
        same_dataset = data.get("root") == (run_data or {}).get("root")
        if same_dataset and not data.get("splits_from") and isinstance(trained_split, str) and Path(trained_split).is_file():
            data["splits_from"] = trained_split
        data["splits_file"] = str(Path(cfg.paths.output_dir) / "splits.json")
    return OmegaConf.create(data)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate the checkpoint ``cfg.ckpt_path``; returns the summary (``val/…`` keys)."""
    if not cfg.get("ckpt_path"):
        raise InputError("evaluate.py needs ckpt_path=PATH")
    checkpoint = read_checkpoint(cfg.ckpt_path)
    source = f"ckpt_path={cfg.ckpt_path}"
    datamodule = instantiate(data_config(cfg, checkpoint["run_config"].get("data"), source))
    trained = load_trained(checkpoint, sliding_window=datamodule.sliding_window_settings(), source=source)
    origin = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step"), "ckpt_path": str(cfg.ckpt_path)}
    writer = ResultsWriter(cfg.paths.output_dir, fields=origin)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[writer], logger=False)
    trainer.validate(trained.module, datamodule=datamodule)
    return {f"val/{k}": v for k, v in (trained.module.validation_summary or {}).items()}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_input_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
