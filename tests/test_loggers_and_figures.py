"""Pictures and loggers: PNG figures, TensorBoard images, an offline wandb run."""

import csv
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, compose_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_files import config, history, run_record, summary

from biasseg.callbacks.wandb_dashboard import COLUMNS
from biasseg.metrics.lesion_metrics import LESION_TABLE_COLUMNS
from biasseg.pipelines.train import train


def test_figures_are_written_and_sent_to_tensorboard(tmp_path):
    train(compose_config(TINY + ["logger=many", "trainer.max_epochs=2", "callbacks.validation_figures.every_n_epochs=1"],
                         tmp_path))
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == ["reliability_epoch000.png", "reliability_epoch001.png", "slices_epoch000.png",
                     "slices_epoch001.png", "volumes_epoch000.png", "volumes_epoch001.png"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/slices", "val/volumes", "val/reliability"} <= set(events.Tags()["images"])
    assert {"val/dice", "val/ece"} <= set(events.Tags()["scalars"])


def _train_with_offline_wandb(output_dir) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    train(compose_config(TINY + ["logger=wandb"], output_dir))


def test_offline_wandb_run_holds_the_dashboard(tmp_path):
    # in a fresh process: wandb's service is process-wide, and what earlier tests left in it
    # once lost this run's table row (a full CI run; never reproduced alone)
    child = multiprocessing.get_context("spawn").Process(target=_train_with_offline_wandb, args=(tmp_path,))
    child.start()
    child.join(600)
    assert child.exitcode == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = history(runs[0])
    scalars = {k for row in logged for k in row}
    assert {"val/dice", "val/volume_bias_ml", "val/relative_soft_expected_volume_bias", "val/ece_top_label"} <= scalars
    # the subject table: one row per validation subject, the documented columns, in a table file
    final = [row for row in logged if "val/subjects/path" in row][-1]
    table = json.loads((runs[0] / "files" / final["val/subjects/path"]).read_text())
    assert table["columns"] == list(COLUMNS)
    assert [row[0] for row in table["data"]] == ["synthetic_004", "synthetic_005"]
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["delta_v_ml"] == pytest.approx(row["volume_pred_ml"] - row["volume_ref_ml"])
    subjects = {r["subject"]: r for r in csv.DictReader(open(tmp_path / "subjects.csv"))}
    assert row["dice"] == pytest.approx(float(subjects["synthetic_004"]["dice"]))
    # the lesion table: lesions.csv's rows
    final = [row for row in logged if "val/lesions/path" in row][-1]
    lesions = json.loads((runs[0] / "files" / final["val/lesions/path"]).read_text())
    assert lesions["columns"] == list(LESION_TABLE_COLUMNS)
    assert len(lesions["data"]) == len(list(csv.DictReader(open(tmp_path / "lesions.csv"))))
    # the interactive charts and the overlays: two mask layers per image
    assert any("val/volume_scatter_table/path" in r or "val/volume_scatter_table" in str(r) for r in logged)
    overlays = [row for row in logged if "val/overlays/all_masks" in row][-1]
    assert overlays["val/overlays/count"] == 4  # 2 subjects × (axial, coronal)
    assert all(set(masks) == {"reference", "prediction"} for masks in overlays["val/overlays/all_masks"])
    assert all((runs[0] / "files" / m["path"]).is_file() for masks in overlays["val/overlays/all_masks"] for m in masks.values())
    # the grouping fields and the run's identity as top-level config (composed without Hydra's
    # command line the loss and data are named by their classes; train.py names them by option)
    record = run_record(runs[0])
    assert (record.run_group, record.display_name) == ("train", "train/CrossEntropyLoss/seed42")
    assert set(record.tags) == {"train", "CrossEntropyLoss", "SyntheticDataModule", "seed42"}
    logged_config = config(runs[0])
    assert (logged_config["task"], logged_config["loss_name"], logged_config["seed"]) == ("train", "CrossEntropyLoss", 42)
    # the calibration verdict, where a user looks first
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert summary(runs[0])["calibration_verdict"] == metrics["calibration_verdict"]


@pytest.mark.slow
def test_a_wandb_sweep_groups_its_runs(tmp_path):
    """A multirun of two losses: both runs in one group named after the sweep, told apart by tags."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "loss=ce,softdice", *TINY, "logger=wandb",
         "callbacks.validation_figures=null", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [run_record(run) for run in sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))]
    assert len(records) == 2
    assert {r.run_group for r in records} == {"train/sweep"}
    assert [r.display_name for r in records] == ["train/ce/seed42", "train/softdice/seed42"]
    assert ["ce" in r.tags for r in records] == [True, False]
