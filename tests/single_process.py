"""Validate a checkpoint in this process, one subject after the other: the reference that
distributed runs (DDP, srun, several nodes) must reproduce."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_config
from hydra.utils import instantiate

from biasseg.pipelines.train import build_model

COMPARED = ("dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml")


def single_process_validation(checkpoint: Path, overrides: list[str], scratch: Path):
    """The module after validating ``checkpoint`` (its ``validation_rows``/``_summary`` set)."""
    cfg = compose_config(overrides, scratch)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, datamodule, verbose=False)
    return model


def assert_distributed_run_matches_one_process(run_dir: Path, overrides: list[str], scratch: Path, subjects: list[str]) -> None:
    """The run's final validation (metrics.json, subjects.csv) lists each of ``subjects`` once
    and equals one process validating its last.ckpt: per subject to 1e-5 relative (the same
    arithmetic on the same weights; only the order of the cross-process gather differs), the
    mean Dice to 1e-6."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "subjects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["subject"] for r in rows] == subjects and metrics["num_subjects"] == len(subjects)
    model = single_process_validation(run_dir / "checkpoints" / "last.ckpt", overrides, scratch)
    single = model.validation_rows
    assert single["subject_index"].tolist() == list(range(len(subjects)))
    for i, row in enumerate(rows):
        for key in COMPARED:
            assert float(row[key]) == pytest.approx(single[key][i, 0].item(), rel=1e-5, abs=1e-9), (row, key)
    assert metrics["val/dice"] == pytest.approx(model.validation_summary["dice"], rel=1e-6)
