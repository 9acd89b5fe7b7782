"""report.py on a real (tiny) sweep: the table, the statistics, figures, failed runs, theory hook."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import ROOT, TINY
from report import main as report_main
from reporting.grouping import group_runs
from reporting.runs import Run, find_run_dirs, read_run
from reporting.statistics import paired_wilcoxon, subject_means
from reporting.table import result_rows

SWEEP = [o for o in TINY if not o.startswith("data.num_val")] + [
    "data.num_val=6", "callbacks.validation_figures=null", "logger=none",
]  # 6 validation subjects: enough pairs for the Wilcoxon test


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real multirun: loss=ce,softdice × seed=0,1 (jobs 0..3), one tiny epoch each."""
    folder = tmp_path_factory.mktemp("sweep")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "loss=ce,softdice", "seed=0,1", *SWEEP,
                             f"hydra.sweep.dir={folder}"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def read_results(path):
    with open(path / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_report_cli_compares_the_losses_of_a_sweep(sweep, tmp_path):
    output = tmp_path / "report"
    result = subprocess.run([sys.executable, str(ROOT / "report.py"), str(sweep), "--output", str(output),
                             "--no-theory"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(output / "report.md")
    rows = {r["loss"]: r for r in read_results(output) if r["class"] == "all"}
    assert set(rows) == {"ce", "softdice"}
    for row in rows.values():
        assert (row["task"], row["n_runs"], row["seeds"], row["n_subjects"]) == ("train", "2", "0 1", "6")
        for column in ("dice_mean", "dice_sd", "volume_bias_ml_mean", "relative_volume_bias_mean",
                       "abs_volume_error_ml_mean", "soft_relative_volume_bias_mean",
                       "relative_soft_expected_volume_bias_mean", "relative_expected_volume_bias_mean"):
            assert math.isfinite(float(row[column])), column
        assert row["theory_relative_soft_bias"] == "nan"  # --no-theory
    for column in ("p_dice_vs_ce", "p_volume_bias_ml_vs_ce"):
        assert 0 <= float(rows["softdice"][column]) <= 1
        assert math.isnan(float(rows["ce"][column]))
    assert rows["softdice"]["n_pairs_vs_ce"] == "6"
    pictures = list(output.glob("*.png"))
    assert len(pictures) >= 3 and all(p.stat().st_size > 1000 for p in pictures)
    text = (output / "report.md").read_text()
    assert "**ce** (reference)" in text and "**softdice**: Dice" in text
    assert all(f"]({p.name})" in text for p in pictures)
    assert text.count("| complete |") == 4


REMEDY_WORDS = ("ece", "temperature", "threshold", "rankseg", "calibrated")


def test_failed_and_incomplete_runs_are_named_and_the_rest_reported(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    (copy / "1" / "metrics.json").unlink()  # ce, seed 1: never validated
    config = copy / "2" / ".hydra" / "config.yaml"  # softdice, seed 0: stopped after 1 of 3 epochs
    config.write_text(config.read_text().replace("max_epochs: 1", "max_epochs: 3"))
    for job in ("0", "3"):  # runs written before calibration and the post-hoc remedies existed
        (copy / job / "calibration.csv").unlink(missing_ok=True)
        metrics = json.loads((copy / job / "metrics.json").read_text())
        (copy / job / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()
                                                              if not any(w in k for w in REMEDY_WORDS)}))
        with open(copy / job / "subjects.csv") as handle:
            table = list(csv.DictReader(handle))
        with open(copy / job / "subjects.csv", "w", newline="") as handle:
            keep = ["subject", "dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml"]
            writer = csv.DictWriter(handle, fieldnames=keep, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)
    assert report_main([str(copy), "--no-theory"]) == 0
    err = capsys.readouterr().err
    assert f"left out {copy / '1'}: no metrics.json" in err
    assert f"left out {copy / '2'}: incomplete: last validation after epoch 1 of 3" in err
    rows = {r["loss"]: r for r in read_results(copy / "report")}
    assert (rows["ce"]["n_runs"], rows["softdice"]["n_runs"]) == ("1", "1")
    assert math.isnan(float(rows["ce"]["ece_mean"])) and math.isnan(float(rows["ce"]["threshold_dice_mean"]))
    assert math.isnan(float(rows["softdice"]["relative_soft_expected_volume_bias_mean"]))
    text = (copy / "report" / "report.md").read_text()
    assert "2 run(s) left out" in text and "excluded: no metrics.json" in text
    assert "No reliability diagram" in text and "Post-hoc remedies" not in text

    assert report_main([str(copy), "--no-theory", "--include-incomplete", "--output", str(tmp_path / "all")]) == 0
    assert {r["loss"]: r["n_runs"] for r in read_results(tmp_path / "all")} == {"ce": "1", "softdice": "2"}

    for job in ("0", "2", "3"):
        (copy / job / "subjects.csv").unlink()
    assert report_main([str(copy)]) == 1
    assert "none of the 4 run(s) found is complete" in capsys.readouterr().err


def test_paired_wilcoxon_matches_scipy_and_pairs_subjects_by_name():
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(9)]
    reference = dict(zip(names, rng.normal(0.8, 0.05, 9)))
    values = {s: reference[s] + d for s, d in zip(names, rng.normal(0.03, 0.02, 9))}
    expected = stats.wilcoxon([values[s] - reference[s] for s in names]).pvalue
    test = paired_wilcoxon(dict(reversed(values.items())), {**reference, "other": 0.1})
    assert (test.pairs, test.p_value) == (9, pytest.approx(expected))
    assert test.mean_difference == pytest.approx(np.mean([values[s] - reference[s] for s in names]))
    assert math.isnan(paired_wilcoxon(dict(list(values.items())[:4]), reference).p_value)  # < 5 pairs
    assert math.isnan(paired_wilcoxon(reference, reference).p_value)  # all differences zero
    # each subject is averaged over the seeds before pairing; NaNs (no Dice) are skipped
    seeds = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": math.nan, "c": 5.0}]
    assert subject_means(seeds) == {"a": 2.0, "b": 2.0, "c": 5.0}


def test_tasks_of_one_name_with_different_data_get_their_own_rows():
    def run(uncertainty, loss, seed):
        subjects = {"dice": {"s": 0.5}, "volume_ref_ml": {"s": 1.0}, "volume_pred_ml": {"s": 1.5},
                    "volume_pred_soft_ml": {"s": 1.2}}
        return Run(path=ROOT, task_name="train", loss_name=loss, choices={"loss": loss, "data": "synthetic"},
                   seed=seed, data={"uncertainty": uncertainty, "num_workers": seed}, loss={"_target_": "x"},
                   metrics={"epoch": 0}, subjects=subjects)

    groups = group_runs([run(1.0, "ce", 0), run(1.0, "ce", 1), run(2.5, "softdice", 0), run(2.5, "ce", 0)])
    assert [(g.task, g.loss, len(g.runs)) for g in groups] == [
        ("train [uncertainty=1.0]", "ce", 2), ("train [uncertainty=2.5]", "ce", 1),
        ("train [uncertainty=2.5]", "softdice", 1)]


def test_theory_prediction_is_computed_once_per_configuration(sweep, tmp_path, monkeypatch):
    import theory

    calls = []

    def predicted_volume_bias(config):
        calls.append(config.loss["_target_"])
        return None if "CrossEntropy" in config.loss["_target_"] else {"relative_soft": 0.3, "relative_hard": 0.1}

    def run_bias_curve(config):
        return {"sigma": [0.0, 1.0, 2.0], "relative_soft": [0.0, 0.1, 0.3], "relative_hard": [0.0, 0.05, 0.1]}

    monkeypatch.setattr(theory, "predicted_volume_bias", predicted_volume_bias, raising=False)
    monkeypatch.setattr(theory, "run_bias_curve", run_bias_curve, raising=False)
    from reporting.plots import theory_vs_measured
    from reporting.theory_link import Theory

    link = Theory(log=lambda message: None)
    groups = group_runs([read_run(path) for path in find_run_dirs([sweep])])
    rows = {r["loss"]: r for r in result_rows(groups, link)}
    assert sorted(calls) == ["losses.CrossEntropyLoss", "losses.SoftDiceLoss"]  # 4 runs, 2 configurations
    assert (rows["softdice"]["theory_relative_soft_bias"], rows["softdice"]["theory_relative_hard_bias"]) == (0.3, 0.1)
    assert math.isnan(rows["ce"]["theory_relative_soft_bias"])
    caption = theory_vs_measured(groups, list(rows.values()), link, tmp_path / "theory.png")
    assert caption.startswith("lines: the theory's bias against σ") and (tmp_path / "theory.png").stat().st_size > 1000
    assert link.notes == []
