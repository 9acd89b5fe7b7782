"""End-to-end runs of train.py: output files, resume from last.ckpt, the CLI and multirun."""

import csv
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, TINY, compose_config

from biasseg.errors import InputError
from biasseg.pipelines.train import train

EXPECTED_METRICS = [
    "val/dice", "val/volume_bias_ml", "val/abs_volume_error_ml", "val/relative_volume_bias",
    "val/soft_volume_bias_ml", "val/expected_volume_bias_ml", "val/soft_expected_volume_bias_ml",
    "val/ece", "val/ece_calibrated", "val/temperature", "val/threshold", "val/dice_threshold", "val/dice_rankseg",
    "val/calibrated_soft_volume_bias_ml", "val/threshold_volume_bias_ml", "val/rankseg_volume_bias_ml",
]


def read_subjects(path):
    with open(path / "subjects.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("loss", ["ce", "softdice", "softdice_batch", "ce_softdice"])
def test_run_writes_metrics_and_subjects(loss, tmp_path):
    summary = train(compose_config(TINY + [f"loss={loss}"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in EXPECTED_METRICS:
        assert key in metrics and key in summary
        assert metrics[key] == pytest.approx(summary[key], nan_ok=True)
    assert metrics["num_subjects"] == 2
    rows = read_subjects(tmp_path)
    assert [r["subject"] for r in rows] == ["synthetic_004", "synthetic_005"]
    assert list(rows[0]) == ["subject", "dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml",
                             "volume_pred_soft_near_ml", "volume_expected_ml", "ece", "volume_soft_calibrated_ml",
                             "volume_soft_platt_ml", "volume_soft_isotonic_ml", "dice_threshold",
                             "volume_threshold_ml", "dice_rankseg", "volume_rankseg_ml", "volume_quote_ml", "volume_low_ml",
                             "volume_high_ml", "volume_sd_ml"]
    assert metrics["calibration_verdict"].startswith("calibration: T ") and "val/interval_coverage" in metrics
    bias = sum(float(r["volume_pred_ml"]) - float(r["volume_ref_ml"]) for r in rows) / len(rows)
    assert metrics["val/volume_bias_ml"] == pytest.approx(bias, abs=1e-9)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best-") for p in (tmp_path / "checkpoints").iterdir())
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    with open(tmp_path / "calibration.csv") as handle:
        bins = list(csv.DictReader(handle))
    assert len(bins) == 20 and list(bins[0]) == ["class", "bin", "lower", "upper", "count", "mean_probability", "frequency"]
    assert sum(int(b["count"]) for b in bins) == 2 * 32 * 32 * 16  # every validation voxel once
    with open(tmp_path / "lesions.csv") as handle:  # every reference voxel in one lesion (no size threshold by default)
        lesions = list(csv.DictReader(handle))
    for row in rows:
        own = [float(r["volume_ref_ml"]) for r in lesions if r["subject"] == row["subject"] and r["kind"] == "reference"]
        assert sum(own) == pytest.approx(float(row["volume_ref_ml"]))
        expected = [float(r["volume_expected_ml"]) for r in lesions if r["subject"] == row["subject"]]
        assert sum(expected) == pytest.approx(float(row["volume_expected_ml"]), rel=1e-4)  # q split among the lesions
    assert {"val/lesion_f1", "val/lesion_volume_bias_ml", "val/lesion_volume_bias_ml_smallest"} <= set(metrics)


@pytest.mark.parametrize("loss, supervision", [("ce", "false"), ("softdice", "true")])
def test_training_on_soft_labels(loss, supervision, tmp_path):
    summary = train(compose_config(TINY + ["data.label_mode=soft", "data.num_classes=3", "data.num_structures=2",
                                           "data.radius_mm=[3,4]", f"loss={loss}",
                                           f"model.deep_supervision={supervision}"], tmp_path))
    assert all(math.isfinite(summary[k]) for k in ("val/soft_volume_bias_ml", "val/ece", "val/temperature"))
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)


def test_multiclass_run_reports_per_class(tmp_path):
    train(compose_config(TINY + ["data.num_classes=3", "data.num_structures=2", "data.radius_mm=[3,4]"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/dice/structure1", "val/dice/structure2", "val/volume_bias_ml/structure2"} <= set(metrics)
    assert "dice/structure2" in read_subjects(tmp_path)[0]


@pytest.mark.slow
def test_resume_from_last_checkpoint_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    train(compose_config(TINY + ["trainer.max_epochs=2"], straight))
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    train(compose_config(TINY + ["trainer.max_epochs=1"], first))
    last = first / "checkpoints" / "last.ckpt"
    train(compose_config(TINY + ["trainer.max_epochs=2", f"ckpt_path={last}"], resumed))
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    resumed_metrics = json.loads((resumed / "metrics.json").read_text())
    assert resumed_metrics["epoch"] == straight_metrics["epoch"] == 1
    assert resumed_metrics["global_step"] == straight_metrics["global_step"] == 2 * 4 * 2 // 2
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == straight_metrics["global_step"]
    assert checkpoint["run_config"]["ckpt_path"] == str(last)


@pytest.mark.slow
def test_a_compiled_training_writes_the_same_checkpoint_contents(tmp_path):
    """model.compile=true compiles the training forward pass only: the run trains, its
    checkpoint holds the plain network's weights (loadable without compiling) and no compile flag."""
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    train(compose_config(TINY, plain))
    train(compose_config(TINY + ["model.compile=true"], compiled))
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (plain, compiled))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert "compile" not in b["hyper_parameters"]
    assert b["run_config"]["model"]["compile"] is True
    assert json.loads((compiled / "metrics.json").read_text())["global_step"] == 4


def test_last_checkpoint_is_the_latest_epoch_even_without_improvement(tmp_path):
    # "best" = lowest Dice: after epoch 0 it rarely improves, yet last.ckpt must follow every epoch
    train(compose_config(TINY + ["trainer.max_epochs=3", "callbacks.model_checkpoint.mode=min"], tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (2, 3 * 4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="nope.ckpt: no such file"):
        train(compose_config(TINY + [f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path))


def run_cli(*args, cwd):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cli_run_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, "loss=softdice", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "Dice (argmax)" in result.stdout + result.stderr  # the closing table
    for name in [".hydra/config.yaml", "metrics.json", "subjects.csv", "checkpoints/last.ckpt", "csv/metrics.csv"]:
        assert (run_dir / name).is_file(), name


@pytest.mark.slow
def test_cli_multirun_sweeps_losses(tmp_path):
    run_cli("-m", *TINY, "loss=ce,softdice", "paths.log_dir=" + str(tmp_path / "logs"), cwd=tmp_path)
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "metrics.json").is_file() and (job / "subjects.csv").is_file()


def test_bad_option_on_the_cli_fails_with_the_choices(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "loss=nosuch"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Available options in 'loss'" in result.stderr and "softdice_batch" in result.stderr


@pytest.mark.slow
def test_a_two_trial_optuna_search_reports_its_best_trial(tmp_path):
    sweep = tmp_path / "search"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=dice_optuna", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.sampler.n_startup_trials=2", *TINY, "logger=none", "callbacks.validation_figures=null",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay", "data.batch_size"}
    trials = [json.loads((sweep / str(n) / "metrics.json").read_text())["val/dice"] for n in (0, 1)]
    assert best["best_value"] == pytest.approx(max(trials))


def test_the_objective_weighs_dice_against_volume_bias():
    from omegaconf import OmegaConf

    from biasseg.pipelines.train import objective

    summary = {"val/dice": 0.8, "val/relative_soft_volume_bias": -0.25}
    plain = OmegaConf.create({"optimized_metric": "val/dice", "volume_bias_penalty": 0.0})
    assert objective(summary, plain) == 0.8
    weighted = OmegaConf.create({"optimized_metric": "val/dice", "volume_bias_penalty": 0.4,
                                 "volume_bias_key": "val/relative_soft_volume_bias"})
    assert objective(summary, weighted) == pytest.approx(0.8 - 0.4 * 0.25)
    with pytest.raises(InputError, match="volume_bias_key=val/nothing"):
        objective(summary, OmegaConf.create({**weighted, "volume_bias_key": "val/nothing"}))


@pytest.mark.slow
def test_train_log_holds_what_the_run_printed_with_progress_lines_and_no_noise(tmp_path):
    """Output redirected (no terminal): no progress bar but a line per epoch, the closing
    table and the outputs' paths, in the console and in train.log; Lightning's tips and the
    srun hint are gone."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *[o for o in TINY if "progress_bar" not in o],
                             "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = (run_dir / "train.log").read_text()
    for text in (written, result.stdout + result.stderr):
        assert "task train · loss CrossEntropyLoss" in text or "task train · loss ce" in text
        assert "epoch 1/2 · step" in text and "epoch 2/2 · step" in text and "val Dice" in text
        assert re.search(r"epoch 1/2 · step \d+ · loss \d\.\d{4}", text), text[-2000:]
        assert "Validation after epoch 2" in text and "values in metrics.json" in text
        assert f"outputs in {run_dir}: metrics.json, subjects.csv" in text
        assert "💡" not in text and "srun` command" not in text
    assert "\r" not in result.stderr  # no progress bar redrawing itself into a file


def test_a_finished_run_is_extended_in_its_directory_with_more_epochs(tmp_path):
    """The commonest resume: the same command with a larger trainer.max_epochs (and another
    logger) continues the run; its poly schedule is re-planned for the new length."""
    train(compose_config(TINY + ["trainer.max_epochs=2"], tmp_path))
    first = json.loads((tmp_path / "metrics.json").read_text())
    summary = train(compose_config(TINY + ["trainer.max_epochs=4", "logger=many"], tmp_path))
    extended = json.loads((tmp_path / "metrics.json").read_text())
    assert (first["epoch"], extended["epoch"]) == (1, 3)
    assert extended["global_step"] == 2 * first["global_step"]
    assert summary["val/dice"] == extended["val/dice"]
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle) if r.get("train/loss")] == [0, 1, 2, 3]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    decay = checkpoint["lr_schedulers"][0]["lr_lambdas"][0]  # re-planned for 4 epochs, and ended at 0
    assert decay["total_steps"] == extended["global_step"]
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match="another configuration.*model.features"):
        train(compose_config([o for o in TINY if not o.startswith("model.features")] + ["model.features=[4,8,16]"], tmp_path))
