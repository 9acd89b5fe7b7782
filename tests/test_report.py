"""report.py on a real (tiny) sweep: the table, the statistics, figures, failed runs, theory hook."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TINY
from scipy import stats

from biasseg.pipelines.report import main as report_main
from biasseg.reporting.grouping import group_runs, reference_group
from biasseg.reporting.measures import pooled_measures
from biasseg.reporting.runs import Run, find_run_dirs, read_run
from biasseg.reporting.statistics import holm, welch_test
from biasseg.reporting.table import result_rows, subject_rows

SWEEP = [o for o in TINY if not o.startswith("data.num_val")] + [
    "data.num_val=6", "callbacks.validation_figures=null", "logger=csv",
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


@pytest.mark.slow
def test_report_cli_compares_the_losses_of_a_sweep(sweep, tmp_path):
    output = tmp_path / "report"
    result = subprocess.run([sys.executable, str(ROOT / "report.py"), str(sweep), "--output", str(output),
                             "--no-theory"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(output / "report.md")
    rows = {r["loss"]: r for r in read_results(output) if r["class"] == "all"}
    assert set(rows) == {"ce", "softdice"}
    with open(output / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert sorted((h["loss"], h["seed"]) for h in history) == [("ce", "0"), ("ce", "1"), ("softdice", "0"), ("softdice", "1")]
    for entry in history:  # one epoch: the final validation, as in the run's metrics.json
        metrics = json.loads((Path(output) / entry["run"] / "metrics.json").read_text())
        assert float(entry["val/dice"]) == pytest.approx(metrics["val/dice"])
        assert int(entry["step"]) == metrics["global_step"] - 1 or int(entry["step"]) == metrics["global_step"]
    for row in rows.values():
        assert (row["task"], row["n_runs"], row["seeds"], row["n_subjects"]) == ("train", "2", "0 1", "6")
        for column in ("dice_mean", "dice_sd", "volume_bias_ml_mean", "relative_volume_bias_mean",
                       "abs_volume_error_ml_mean", "soft_relative_volume_bias_mean",
                       "relative_soft_expected_volume_bias_mean", "relative_expected_volume_bias_mean"):
            assert math.isfinite(float(row[column])), column
        assert row["theory_relative_soft_bias"] == "nan"  # --no-theory
    for column in ("p_dice_vs_ce", "p_volume_bias_ml_vs_ce", "p_holm_dice_vs_ce", "p_holm_soft_volume_bias_ml_vs_ce"):
        assert 0 <= float(rows["softdice"][column]) <= 1
        assert math.isnan(float(rows["ce"][column]))
    assert float(rows["softdice"]["p_holm_dice_vs_ce"]) >= float(rows["softdice"]["p_dice_vs_ce"])
    assert rows["softdice"]["n_runs_ce"] == "2" and math.isfinite(float(rows["softdice"]["dice_sd"]))  # sd over the 2 seeds
    with open(output / "subjects.csv") as handle:
        subjects = list(csv.DictReader(handle))
    assert len(subjects) == 2 * 2 * 6  # losses × seeds × subjects, one class
    assert {(r["loss"], r["seed"]) for r in subjects} == {("ce", "0"), ("ce", "1"), ("softdice", "0"), ("softdice", "1")}
    pictures = list(output.glob("*.png"))
    assert len(pictures) >= 3 and all(p.stat().st_size > 1000 for p in pictures)
    text = (output / "report.md").read_text()
    assert "**ce** (reference)" in text and "**softdice**: Dice" in text
    assert all(f"]({p.name})" in text for p in pictures)
    assert text.count("| complete |") == 4
    assert "### The volume to quote" in text  # coverage and width per loss and task
    assert "### Lesions" in text and (output / "lesion_bias_vs_radius_train.png").is_file()  # from each run's lesions.csv
    assert 0.0 <= float(rows["ce"]["interval_coverage_mean"]) <= 1.0 and math.isfinite(float(rows["ce"]["quote_relative_volume_bias_mean"]))


REMEDY_WORDS = ("ece", "temperature", "threshold", "rankseg", "calibrated", "platt", "isotonic")


def test_failed_and_incomplete_runs_are_named_and_the_rest_reported(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    (copy / "1" / "metrics.json").unlink()  # ce, seed 1: never validated
    for job in ("0", "1", "2", "3"):  # all planned 3 epochs; softdice seed 0 (job 2) stopped after its first
        config = copy / job / ".hydra" / "config.yaml"
        config.write_text(config.read_text().replace("max_epochs: 1", "max_epochs: 3"))
        if job != "2" and (copy / job / "metrics.json").exists():
            metrics = json.loads((copy / job / "metrics.json").read_text())
            (copy / job / "metrics.json").write_text(json.dumps({**metrics, "epoch": 2}))
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
    assert "no reliability diagram" in text and "Post-hoc remedies" not in text

    assert report_main([str(copy), "--no-theory", "--include-incomplete", "--output", str(tmp_path / "all")]) == 0
    assert {r["loss"]: r["n_runs"] for r in read_results(tmp_path / "all")} == {"ce": "1", "softdice": "2"}

    for job in ("0", "2", "3"):
        (copy / job / "subjects.csv").unlink()
    assert report_main([str(copy)]) == 1
    assert "none of the 4 run(s) found is complete" in capsys.readouterr().err


def fixture_run(task: str, loss: str, seed: int, dice: dict[str, float], soft: dict[str, float]) -> Run:
    """A run with given per-subject Dice and soft volume (reference 10 ml, argmax 10 ml)."""
    subjects = {"dice": dice, "volume_ref_ml": {s: 10.0 for s in dice}, "volume_pred_ml": {s: 10.0 for s in dice},
                "volume_pred_soft_ml": soft}
    return Run(path=ROOT / f"{task}_{loss}_{seed}", task_name=task, loss_name=loss, choices={"loss": loss}, seed=seed,
               data={}, loss={"_target_": "x"}, metrics={"epoch": 0, "val/ece": 0.01 * (seed + 1)}, subjects=subjects)


def test_seeds_are_the_unit_numbers_by_hand():
    """Two tasks × (ce, softdice) × seeds: means and sds over seeds, Welch on run means, Holm
    over the report's four tests, the per-subject rows; all recomputed by hand."""
    runs = [
        fixture_run("a", "ce", 0, {"s1": 0.70, "s2": 0.80}, {"s1": 11.0, "s2": 12.0}),
        fixture_run("a", "ce", 1, {"s1": 0.72, "s2": 0.86}, {"s1": 10.0, "s2": 11.0}),
        fixture_run("a", "ce", 2, {"s1": 0.68, "s2": 0.84}, {"s1": 10.5, "s2": 10.5}),
        fixture_run("a", "softdice", 0, {"s1": 0.80, "s2": 0.90}, {"s1": 13.0, "s2": 14.0}),
        fixture_run("a", "softdice", 1, {"s1": 0.82, "s2": 0.88}, {"s1": 14.0, "s2": 15.0}),
        fixture_run("a", "softdice", 2, {"s1": 0.79, "s2": 0.93}, {"s1": 13.5, "s2": 13.5}),
        fixture_run("b", "ce", 0, {"s1": 0.5}, {"s1": 10.0}),
        fixture_run("b", "ce", 1, {"s1": 0.6}, {"s1": 10.0}),
        fixture_run("b", "softdice", 0, {"s1": 0.55}, {"s1": 10.0}),
        fixture_run("b", "softdice", 1, {"s1": 0.65}, {"s1": 10.0}),
    ]
    rows = {(r["task"], r["loss"]): r for r in result_rows(group_runs(runs))}
    ce_a, sd_a = [0.75, 0.79, 0.76], [0.85, 0.85, 0.86]  # run means of Dice
    row = rows[("a", "softdice")]
    assert row["dice_mean"] == pytest.approx(np.mean(sd_a)) and row["dice_sd"] == pytest.approx(np.std(sd_a, ddof=1))
    assert rows[("a", "ce")]["dice_mean"] == pytest.approx(np.mean(ce_a))
    assert rows[("a", "ce")]["dice_sd"] == pytest.approx(np.std(ce_a, ddof=1))
    # the spread between subjects: each subject averaged over the seeds first
    assert rows[("a", "ce")]["dice_subject_sd"] == pytest.approx(np.std([0.70, 0.8333333333], ddof=1))
    assert row["diff_dice_vs_ce"] == pytest.approx(np.mean(sd_a) - np.mean(ce_a))
    p_dice_a = stats.ttest_ind(sd_a, ce_a, equal_var=False).pvalue
    assert row["p_dice_vs_ce"] == pytest.approx(p_dice_a)
    soft_ce, soft_sd = [1.5, 0.5, 0.5], [3.5, 4.5, 3.5]  # run means of the soft ΔV (ml)
    p_soft_a = stats.ttest_ind(soft_sd, soft_ce, equal_var=False).pvalue
    assert row["p_soft_volume_bias_ml_vs_ce"] == pytest.approx(p_soft_a)
    assert math.isnan(row["p_volume_bias_ml_vs_ce"])  # argmax ΔV is 0 everywhere: no spread, no test
    p_dice_b = stats.ttest_ind([0.55, 0.65], [0.5, 0.6], equal_var=False).pvalue
    assert rows[("b", "softdice")]["p_dice_vs_ce"] == pytest.approx(p_dice_b)
    raw = sorted([p_dice_a, p_soft_a, p_dice_b])  # the family: three tests with a p-value
    holm = [min(1, 3 * raw[0])]
    holm += [max(holm[-1], min(1, 2 * raw[1]))]
    holm += [max(holm[-1], raw[2])]
    adjusted = {rows[("a", "softdice")]["p_holm_dice_vs_ce"], rows[("a", "softdice")]["p_holm_soft_volume_bias_ml_vs_ce"],
                rows[("b", "softdice")]["p_holm_dice_vs_ce"]}
    assert sorted(adjusted) == pytest.approx(sorted(holm))
    assert rows[("a", "ce")]["pooled_ece_mean"] == pytest.approx(0.02) and rows[("a", "ce")]["pooled_ece_sd"] == pytest.approx(0.01)
    per_subject = [r for r in subject_rows(group_runs(runs), ROOT) if r["task"] == "a" and r["loss"] == "softdice"]
    assert len(per_subject) == 6 and {r["seed"] for r in per_subject} == {0, 1, 2}
    assert sorted(r["soft_volume_bias_ml"] for r in per_subject) == pytest.approx([3.0, 3.5, 3.5, 4.0, 4.0, 5.0])


def test_ratio_of_sums_is_the_bias_of_the_total_volume_numbers_by_hand():
    """Run-level ratios of sums beside the per-subject mean of ratios, which a small, noisy
    reference inflates: subject s1's soft volume is twice its 2 ml expected volume."""
    def run(seed, soft):
        subjects = {"dice": {"s1": 0.5, "s2": 0.9}, "volume_ref_ml": {"s1": 2.0, "s2": 20.0},
                    "volume_expected_ml": {"s1": 2.0, "s2": 20.0}, "volume_pred_ml": {"s1": 1.0, "s2": 18.0},
                    "volume_pred_soft_ml": soft}
        return Run(path=ROOT / f"r{seed}", task_name="t", loss_name="ce", choices={"loss": "ce"}, seed=seed,
                   data={}, loss={"_target_": "x"}, metrics={"epoch": 0}, subjects=subjects)

    runs = [run(0, {"s1": 4.0, "s2": 20.0}), run(1, {"s1": 2.0, "s2": 24.0})]
    row = result_rows(group_runs(runs))[0]
    per_run_mean_of_ratios = [(1.0 + 0.0) / 2, (0.0 + 0.2) / 2]
    per_run_ratio_of_sums = [24 / 22 - 1, 26 / 22 - 1]
    assert row["relative_soft_expected_volume_bias_mean"] == pytest.approx(np.mean(per_run_mean_of_ratios))
    assert row["pooled_relative_soft_expected_volume_bias_mean"] == pytest.approx(np.mean(per_run_ratio_of_sums))
    assert row["pooled_relative_soft_expected_volume_bias_sd"] == pytest.approx(np.std(per_run_ratio_of_sums, ddof=1))
    assert row["pooled_soft_relative_volume_bias_mean"] == pytest.approx(np.mean(per_run_ratio_of_sums))
    assert row["pooled_relative_expected_volume_bias_mean"] == pytest.approx(19 / 22 - 1)  # argmax: both runs alike
    assert row["pooled_relative_expected_volume_bias_sd"] == 0.0
    nan_run = run(2, {"s1": math.nan, "s2": 22.0})  # a subject without a soft volume leaves both sums
    assert pooled_measures(nan_run.subjects)["pooled_relative_soft_expected_volume_bias"] == pytest.approx(22 / 20 - 1)
    zero = {"volume_pred_ml": {"s1": 1.0}, "volume_ref_ml": {"s1": 0.0}}
    assert math.isnan(pooled_measures(zero)["pooled_relative_volume_bias"])


def test_holm_and_welch_edge_cases():
    assert holm([0.01, math.nan, 0.04, 0.03]) == pytest.approx([0.03, math.nan, 0.06, 0.06], nan_ok=True)
    assert math.isnan(welch_test([0.5], [0.4, 0.6]).p_value)  # one run: no test
    assert welch_test([0.5], [0.4, 0.6]).difference == pytest.approx(0.0)
    # each subject is averaged over the seeds before the spread between subjects; NaNs (no Dice) are skipped
    runs = [fixture_run("t", "ce", 0, {"a": 1.0, "b": 2.0}, {"a": 10.0, "b": 10.0}),
            fixture_run("t", "ce", 1, {"a": 3.0, "b": math.nan, "c": 5.0}, {"a": 10.0, "b": 10.0, "c": 10.0})]
    row = result_rows(group_runs(runs))[0]
    assert row["dice_subject_sd"] == pytest.approx(np.std([2.0, 2.0, 5.0], ddof=1)) and row["n_subjects"] == 3
    assert row["dice_mean"] == pytest.approx(np.mean([1.5, 4.0])) and row["dice_sd"] == pytest.approx(np.std([1.5, 4.0], ddof=1))


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


def test_settings_that_differ_beyond_the_first_keys_are_never_pooled():
    """Six settings of one task that differ in six different keys (an ablation study): each
    gets its own row and a label that tells it apart, however many keys that takes."""
    def run(seed, **changes):
        data = {"a_aug": 1, "b_aug": 1, "c_aug": 1, "d_aug": 1, "e_aug": 1, **changes}
        subjects = {"dice": {"s": 0.5}, "volume_ref_ml": {"s": 1.0}, "volume_pred_ml": {"s": 1.5},
                    "volume_pred_soft_ml": {"s": 1.2}}
        return Run(path=ROOT, task_name="high", loss_name="ce", choices={"loss": "ce"}, seed=seed, data=data,
                   loss={"_target_": "x"}, metrics={"epoch": 0}, subjects=subjects,
                   added_keys=[f"data.{k}" for k in changes if k not in data_defaults])

    data_defaults = ("a_aug", "b_aug", "c_aug", "d_aug", "e_aug")
    # z_decay is not in the config: the command line added it (+data.z_decay=0)
    settings = [{}, {"a_aug": 0}, {"b_aug": 0}, {"c_aug": 0}, {"d_aug": 0}, {"e_aug": 0}, {"z_decay": 0}]
    groups = group_runs([run(seed, **change) for change in settings for seed in (0, 1)])
    assert len(groups) == len(settings) and all(len(g.runs) == 2 for g in groups)
    assert len({g.task for g in groups}) == len(settings)
    assert {tuple(sorted(r.data.items())) for g in groups for r in g.runs[:1]} == {
        tuple(sorted({"a_aug": 1, "b_aug": 1, "c_aug": 1, "d_aug": 1, "e_aug": 1, **c}.items())) for c in settings}


def test_a_setting_a_later_version_added_does_not_split_a_study_that_grew_across_versions():
    """Runs of one task from two versions of biasseg: the later one's config holds keys the
    earlier lacked (data.raters: 0, its default). They share the task, and the new loss is
    compared with the old runs' cross-entropy; a key the command line added, or one that
    takes two values, still splits."""
    def run(loss, seed, added=(), **new_keys):
        subjects = {"dice": {"s": 0.5}, "volume_ref_ml": {"s": 1.0}, "volume_pred_ml": {"s": 1.5},
                    "volume_pred_soft_ml": {"s": 1.2}}
        return Run(path=ROOT, task_name="high", loss_name=loss, choices={"loss": loss}, seed=seed,
                   data={"uncertainty": 2.5, **new_keys}, loss={"_target_": loss}, metrics={"epoch": 0},
                   subjects=subjects, added_keys=list(added))

    old = [run("ce", 0), run("ce", 1), run("softdice", 0)]
    groups = group_runs([*old, run("calibrated_dice", 0, raters=0), run("calibrated_dice", 1, raters=0)])
    assert [(g.task, g.loss, len(g.runs)) for g in groups] == [
        ("high", "ce", 2), ("high", "calibrated_dice", 2), ("high", "softdice", 1)]
    assert reference_group(groups, "high").loss == "ce"
    by_command_line = group_runs([*old, run("calibrated_dice", 0, added=["data.raters"], raters=0)])
    assert sorted({g.task for g in by_command_line}) == ["high [raters=0]", "high [raters=unset]"]
    two_values = group_runs([*old, run("calibrated_dice", 0, raters=0), run("calibrated_dice", 1, raters=3)])
    assert len({g.task for g in two_values}) == 3


def test_the_keys_a_command_line_added_are_read_from_hydras_overrides(tmp_path):
    from biasseg.reporting.runs import _added_keys

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- loss=ce\n- +data.z_decay=0\n- ++model.depth=3\n- seed=1\n")
    assert _added_keys(tmp_path) == ["data.z_decay", "model.depth"]
    assert _added_keys(tmp_path / "missing") == []


def test_a_hypernetwork_is_a_method_of_its_task_not_another_task():
    def run(loss, model, seed, hypernet=False):
        subjects = {"dice": {"s": 0.5}, "volume_ref_ml": {"s": 1.0}, "volume_pred_ml": {"s": 1.5},
                    "volume_pred_soft_ml": {"s": 1.2}}
        model_config = {"features": [8, 16], **({"hypernet": {"alpha_range": [0.05, 0.95]}} if hypernet else {})}
        return Run(path=ROOT, task_name="high", loss_name=f"{loss}_hypernet" if hypernet else loss,
                   choices={"loss": loss, "model": model}, seed=seed, data={"uncertainty": 2.5}, model=model_config,
                   loss={"_target_": "x"}, metrics={"epoch": 0}, subjects=subjects)

    groups = group_runs([run("ce", "unet", 0), run("tversky", "tversky_hypernet", 0, True), run("tversky", "tversky_hypernet", 1, True)])
    assert [(g.task, g.loss, len(g.runs)) for g in groups] == [("high", "ce", 1), ("high", "tversky_hypernet", 2)]


def test_theory_prediction_is_computed_once_per_configuration(sweep, tmp_path, monkeypatch):
    from biasseg import theory

    calls = []

    def predicted_volume_bias(config):
        calls.append(config.loss["_target_"])
        return None if "CrossEntropy" in config.loss["_target_"] else {"relative_soft": 0.3, "relative_hard": 0.1}

    def run_bias_curve(config):
        return {"sigma": [0.0, 1.0, 2.0], "relative_soft": [0.0, 0.1, 0.3], "relative_hard": [0.0, 0.05, 0.1]}

    monkeypatch.setattr(theory, "predicted_volume_bias", predicted_volume_bias, raising=False)
    monkeypatch.setattr(theory, "run_bias_curve", run_bias_curve, raising=False)
    from biasseg.reporting.plots import theory_vs_measured
    from biasseg.reporting.theory_link import Theory

    link = Theory(log=lambda message: None)
    groups = group_runs([read_run(path) for path in find_run_dirs([sweep])])
    rows = {r["loss"]: r for r in result_rows(groups, link)}
    assert sorted(calls) == ["biasseg.losses.CrossEntropyLoss", "biasseg.losses.SoftDiceLoss"]  # 4 runs, 2 configurations
    assert (rows["softdice"]["theory_relative_soft_bias"], rows["softdice"]["theory_relative_hard_bias"]) == (0.3, 0.1)
    assert math.isnan(rows["ce"]["theory_relative_soft_bias"])
    by_key = {(r["task"], r["loss"]): r for r in rows.values()}
    figure, kind = theory_vs_measured("train", groups, by_key, link, {id(g): link.curve(g) for g in groups})
    figure.savefig(tmp_path / "theory.png")
    assert kind == "curve" and (tmp_path / "theory.png").stat().st_size > 1000
    assert link.notes == []


def test_the_theory_predicts_nothing_for_a_hypernetwork():
    """Its map is a marginal over α, not the optimum of its loss config's Tversky α (report.py
    had quoted the α = 0.3 optimum for it: the model section did not reach the theory)."""
    from biasseg.reporting.grouping import Group
    from biasseg.reporting.theory_link import Theory

    loss = {"_target_": "losses.SoftDiceLoss", "alpha": 0.3, "beta": 0.7}
    hypernet = Run(path=ROOT, task_name="high", loss_name="tversky_hypernet", seed=0, max_epochs=1,
                   data={"_target_": "datamodules.SyntheticDataModule", "uncertainty": 2.5}, loss=loss,
                   model={"hypernet": {"alpha_range": [0.05, 0.95]}})
    link = Theory(log=lambda message: None)
    assert link.prediction(Group("high", "tversky_hypernet", [hypernet])) is None and link.notes == []


def test_the_report_goes_to_wandb_beside_the_runs(sweep, tmp_path, monkeypatch):
    import wandb
    from wandb_files import history, run_record

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "report"
    assert report_main([str(sweep), "--output", str(output), "--no-theory", "logger=wandb"]) == 0
    # run.finish() may return before wandb's service process has flushed the offline run's file
    # (seen once under heavy load: a .wandb file without its records); report.py's process exit
    # tears the service down, which waits for it; in this process the test does so itself
    wandb.teardown()
    runs = list((output / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert run_record(runs[0]).job_type == "report"
    logged = history(runs[0])
    results = next(row for row in logged if "results/path" in row)
    table = json.loads((runs[0] / "files" / results["results/path"]).read_text())
    with open(output / "results.csv") as handle:
        expected = list(csv.DictReader(handle))
    assert table["columns"] == list(expected[0]) and len(table["data"]) == len(expected)
    assert any(key.startswith("figures/bland_altman") for row in logged for key in row)


def test_runs_and_checkpoints_from_before_the_package_read_under_current_names(tmp_path):
    """A run or checkpoint written when the losses were the top-level package ``losses`` names
    ``losses.SoftDiceLoss``: report.py and checkpoint loading read it as ``biasseg.losses``."""
    from biasseg.losses import SoftDiceLoss
    from lightning_modules.checkpoint_contents import instantiate_section

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "task_name: high\nseed: 0\nloss:\n  _target_: losses.SoftDiceLoss\n  batch_dice: true\n"
        "data:\n  _target_: datamodules.SyntheticDataModule\n")
    assert read_run(tmp_path).loss == {"_target_": "biasseg.losses.SoftDiceLoss", "batch_dice": True}
    built = instantiate_section({"_target_": "losses.SoftDiceLoss", "batch_dice": True}, "loss", "old.ckpt")
    assert isinstance(built, SoftDiceLoss) and built.batch_dice


def test_old_class_paths_and_the_replaced_poly_schedule_read_as_current():
    from biasseg.renamed_targets import current_targets

    old = {"_target_": "losses.SoftDiceLoss", "scheduler": {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "power": 0.9}}
    assert current_targets(old) == {"_target_": "biasseg.losses.SoftDiceLoss",
                                    "scheduler": {"_target_": "lightning_modules.poly_schedule.poly_lr", "power": 0.9}}
