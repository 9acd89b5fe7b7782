"""DDP on CPU (gloo): subjects sharded across processes, validation exact and counted once."""

import csv
import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from conftest import ROOT, TINY, compose_config
from train import build_model


@pytest.mark.slow
def test_ddp_cpu_training_matches_single_process_validation(tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [o for o in TINY if not o.startswith("data.num_val")] + ["data.num_val=3", "trainer.max_epochs=2"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", "trainer.devices=2", *overrides,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 4 subjects over 2 processes x 2 patches / batch 2 = 2 steps per epoch
    assert (metrics["epoch"], metrics["global_step"], metrics["num_subjects"]) == (1, 4, 3)
    with open(run_dir / "subjects.csv") as handle:
        ddp_rows = list(csv.DictReader(handle))
    assert [r["subject"] for r in ddp_rows] == ["synthetic_004", "synthetic_005", "synthetic_006"]

    # the same checkpoint validated by one process gives the same per-subject numbers
    cfg = compose_config(overrides, tmp_path / "single")
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, datamodule, verbose=False)
    single = model.validation_rows
    assert single["subject_index"].tolist() == [0, 1, 2]
    for i, row in enumerate(ddp_rows):
        for key in ("dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml"):
            assert float(row[key]) == pytest.approx(single[key][i, 0].item(), rel=1e-5, abs=1e-9), (row, key)
    assert metrics["val/dice"] == pytest.approx(model.validation_summary["dice"], rel=1e-6)


def test_batch_dice_pooled_across_processes_equals_the_whole_batch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         str(ROOT / "tests" / "ddp_batch_dice_worker.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env={**os.environ, "RESULT_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        values = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert values["loss_difference"] < 1e-6
        assert values["gradient_difference"] < 1e-7
        assert values["unpooled_loss_difference"] > 1e-3  # without pooling each process sees only its half
