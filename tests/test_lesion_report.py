"""report.py's lesion tables and figure (biasseg/reporting/lesion_report.py), numbers by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import ROOT

from biasseg.metrics.lesions import LESION_COLUMNS
from biasseg.reporting.grouping import group_runs
from biasseg.reporting.lesion_report import (
    binned_means,
    f1_by_size,
    lesion_bias_figure,
    lesion_section,
    reference_points,
    theory_rows,
)
from biasseg.reporting.runs import Run
from biasseg.reporting.theory_link import Theory

SPHERE_R2_ML = 4 / 3 * math.pi * 8 / 1000  # a sphere of radius 2 mm
SPHERE_R5_ML = 4 / 3 * math.pi * 125 / 1000


def lesion(kind: str, detected: int, size_bin: str, soft: float, expected: float) -> dict[str, str]:
    return {"kind": kind, "detected": str(detected), "size_bin_ml": size_bin, "volume_pred_soft_ml": str(soft),
            "volume_expected_ml": str(expected)}


def lesion_run(loss: str, seed: int, small_bias: float, large_bias: float, missed: int = 0) -> Run:
    """One reference lesion of radius 2 mm and one of 5 mm with given relative soft biases, plus
    ``missed`` undetected 5 mm lesions (exactly expected) and one false positive."""
    rows = [lesion("reference", 1, "0.01-0.1", SPHERE_R2_ML * (1 + small_bias), SPHERE_R2_ML),
            lesion("reference", 1, "0.1-1", SPHERE_R5_ML * (1 + large_bias), SPHERE_R5_ML),
            *[lesion("reference", 0, "0.1-1", SPHERE_R5_ML, SPHERE_R5_ML) for _ in range(missed)],
            lesion("false_positive", 0, "0.01-0.1", 0.02, math.nan)]
    subjects = {"dice": {"s": 0.8}, "volume_ref_ml": {"s": 1.0}, "volume_pred_ml": {"s": 1.0}, "volume_pred_soft_ml": {"s": 1.0}}
    return Run(path=ROOT / f"{loss}_{seed}", task_name="lesions", loss_name=loss, choices={"loss": loss}, seed=seed,
               loss={"_target_": loss}, metrics={"epoch": 0}, subjects=subjects, lesions=rows)


def test_points_bins_and_f1_by_hand():
    run = lesion_run("softdice", 0, -0.4, 0.05, missed=1)
    radius, bias = reference_points(run.lesions)
    np.testing.assert_allclose(radius, [2.0, 5.0, 5.0])
    np.testing.assert_allclose(bias, [-0.4, 0.05, 0.0])
    np.testing.assert_allclose(binned_means(radius, bias), [math.nan, -0.4, math.nan, 0.025, math.nan, math.nan])
    # 0.01-0.1 ml: 1 TP, 0 FN, 1 FP -> 2/3; 0.1-1 ml: 1 TP, 1 FN -> 2/3
    assert f1_by_size(run.lesions) == pytest.approx({"0.01-0.1": 2 / 3, "0.1-1": 2 / 3})
    rows = np.zeros((2, len(LESION_COLUMNS)))
    rows[:, LESION_COLUMNS.index("reference")] = [1, 0]
    rows[:, LESION_COLUMNS.index("volume_expected_ml")] = [SPHERE_R2_ML, math.nan]
    rows[:, LESION_COLUMNS.index("volume_pred_soft_ml")] = [SPHERE_R2_ML * 0.5, 0.1]
    radius, bias = reference_points(theory_rows(rows))
    np.testing.assert_allclose(radius, [2.0])
    np.testing.assert_allclose(bias, [-0.5])


def test_section_and_figure_mean_and_sd_over_seeds(tmp_path):
    runs = [lesion_run("ce", 0, 0.0, 0.0), lesion_run("ce", 1, 0.02, 0.0),
            lesion_run("softdice", 0, -0.4, 0.04), lesion_run("softdice", 1, -0.2, 0.06, missed=1)]
    groups = group_runs(runs)
    theory = Theory(enabled=False)
    text = "\n".join(lesion_section(groups, theory))
    assert "### Lesions" in text
    # softdice, radius 2-3 mm: -40 % and -20 % -> -30.0 ± 14.1; 0.1-1 ml F1: 1 and 2/3 -> 0.833 ± 0.236
    assert "| lesions | softdice | 2 |" in text and "-30.0 ± 14.1" in text and "0.833 ± 0.236" in text
    assert "+1.0 ± 1.4" in text  # ce at 2-3 mm: 0 % and 2 %
    figure = lesion_bias_figure("lesions", groups, theory, {"ce": "C0", "softdice": "C1"})
    figure.savefig(tmp_path / "lesions.png")
    assert (tmp_path / "lesions.png").stat().st_size > 1000
    no_lesions = [Run(path=r.path, task_name="t", loss_name=r.loss_name, choices=r.choices, seed=r.seed, loss=r.loss,
                      metrics=r.metrics, subjects=r.subjects) for r in runs]
    assert lesion_section(group_runs(no_lesions), theory) == []
    assert lesion_bias_figure("t", group_runs(no_lesions), theory, {}) is None
