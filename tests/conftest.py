"""Fixtures every test gets (offline, deterministic hashing) and the shared trained runs.
Helpers that tests import live in helpers.py."""

from __future__ import annotations

import os

import pytest
from helpers import TINY_FOLDER, compose_config

from biasseg.generated_folders import write_thick_slices
from biasseg.pipelines.train import train


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
    tmp = tmp_path_factory.mktemp("thick")
    root = write_thick_slices(tmp / "data", modality="CT")
    cfg = compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp / 'cache'}", "data.val_fraction=0.34",
                          "data.normalization=ct"], tmp / "run")
    train(cfg)
    return root, tmp / "run"
