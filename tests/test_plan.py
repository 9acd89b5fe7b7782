"""The plan from a dataset's fingerprint: nnU-Net v2's rules, and nnunetv2's own planner as the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import folder_datamodule as datamodule

from biasseg.generated_folders import write_thick_slices
from datamodules.plan import normalization_schemes, pooling, target_spacing


def test_target_spacing_is_the_median_unless_one_axis_is_both_coarse_and_short():
    iso = np.array([[1.0, 1.0, 1.2], [1.0, 1.0, 1.0], [0.9, 0.9, 1.1]])
    assert target_spacing(iso, np.full((3, 3), 100.0)) == pytest.approx([1.0, 1.0, 1.1])
    thick = np.array([[0.8, 0.8, 5.0], [0.8, 0.8, 3.0], [0.8, 0.8, 4.0], [0.8, 0.8, 2.6], [0.8, 0.8, 6.0]])
    few_slices = np.tile([200.0, 200.0, 30.0], (5, 1))
    assert target_spacing(thick, few_slices) == pytest.approx([0.8, 0.8, np.percentile([5, 3, 4, 2.6, 6], 10)])
    many_slices = np.tile([200.0, 200.0, 150.0], (5, 1))  # coarse but long along z: nnU-Net keeps the median
    assert target_spacing(thick, many_slices) == pytest.approx([0.8, 0.8, 4.0])
    mixed = np.array([[1.0, 1.0, 3.5]] * 3 + [[1.0, 1.0, 0.5]] * 2)  # the 10th percentile would be finer than in-plane
    assert target_spacing(mixed, np.tile([200.0, 200.0, 30.0], (5, 1)))[2] == pytest.approx(1.0 + 1e-5)


def test_pooling_waits_along_the_thick_axis_until_the_in_plane_spacing_has_caught_up():
    # nnunetv2's plan for spacing (2.5, 0.825, 0.825) mm, patch (14, 40, 40) in its (z, y, x) order,
    # here in (x, y, z): strides [1,2,2] [2,2,2] [1,2,2], kernels [1,3,3] then 3s
    strides, kernels, patch = pooling([0.825, 0.825, 2.5], [40, 40, 14])
    assert strides == [[2, 2, 1], [2, 2, 2], [2, 2, 1]]
    assert kernels == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert patch == [40, 40, 14]  # divisible by 8, 8, 2
    assert pooling([1.0, 1.0, 1.0], [20, 20, 20], max_pools=1)[0] == [[2, 2, 2]]
    assert pooling([1.0, 1.0, 1.0], [21, 13, 7])[2] == [22, 14, 7]  # one pooling step along x and y: rounded up to 2, 2, 1


def test_normalisation_follows_the_channel_names():
    assert normalization_schemes(["CT", "T2", "noNorm"], 0.9) == ["ct", "zscore", "none"]
    assert normalization_schemes(["ct", "FLAIR"], 0.6) == ["ct", "zscore_nonzero"]  # the crop removed > 25 %


def test_a_thick_slice_dataset_trains_with_its_plan(thick_slice_run):
    root, run = thick_slice_run
    plan = json.loads((run / "plan.json").read_text())
    assert plan["target_spacing"][2] > 2 * plan["target_spacing"][0]
    assert plan["strides"][0] == [2, 2, 1] and plan["kernel_sizes"][0] == [3, 3, 1]  # no pooling across thick slices at first
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["strides"] == [[2, 2, 1]]  # the two-stage test U-Net takes the first step
    assert checkpoint["inference_settings"]["plan"] == plan


def test_a_key_overrides_its_planned_entry(tmp_path):
    root = write_thick_slices(tmp_path / "data", num_cases=3)
    planned = datamodule(root, tmp_path / "cache", patch_size=None, normalization="auto").plan
    assert planned.normalization == ["zscore"]
    overridden = datamodule(root, tmp_path / "cache", patch_size=(32, 32, 8), normalization="none",
                            target_spacing=[1.0, 1.0, 1.0]).plan
    assert overridden.target_spacing == [1.0, 1.0, 1.0] and overridden.patch_size == [32, 32, 8]
    assert overridden.normalization == ["none"] and overridden.strides[0] == [2, 2, 2]  # 1 mm everywhere: isotropic pooling


ORACLE = """
import json, os, sys
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiment_dataset
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
if __name__ == "__main__":
    extract_fingerprint_dataset(987, num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plans, _ = plan_experiment_dataset(987, ExperimentPlanner)
    print(json.dumps(plans))
"""


@pytest.mark.slow
@pytest.mark.parametrize("modality, border", [("CT", 2), ("MRI", 12)])
def test_the_plan_matches_nnunetv2s_planner(modality, border, tmp_path):
    pytest.importorskip("nnunetv2", reason="test-only oracle: .ci/run installs nnunetv2 (README, Tests)")
    raw = tmp_path / "nnUNet_raw"
    root = write_thick_slices(raw / "Dataset987_Thick", num_cases=6, modality=modality, empty_border=border)
    env = {**os.environ, **{k: str(tmp_path / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    (tmp_path / "oracle.py").write_text(ORACLE)
    result = subprocess.run([sys.executable, str(tmp_path / "oracle.py")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plans = json.loads(result.stdout.strip().splitlines()[-1])
    full = plans["configurations"]["3d_fullres"]
    back = plans["transpose_backward"]  # nnU-Net's axes: SimpleITK's (z, y, x), then sorted by spacing

    def ours(axes: list) -> list:  # one value per axis in nnU-Net's transposed order → RAS (x, y, z)
        return list(reversed([axes[b] for b in back]))

    ours_plan = datamodule(root, tmp_path / "cache", patch_size=None, normalization="auto").plan
    assert ours_plan.target_spacing == pytest.approx(ours(full["spacing"]), abs=1e-6)
    nn_patch = ours(full["patch_size"])
    strides, kernels, patch = pooling(ours_plan.target_spacing, nn_patch)
    nn_strides = [ours(s) for s in full["architecture"]["arch_kwargs"]["strides"]]
    nn_kernels = [ours(k) for k in full["architecture"]["arch_kwargs"]["kernel_sizes"]]
    assert [[1, 1, 1], *strides] == nn_strides and kernels == nn_kernels and patch == nn_patch
    expected = {"CTNormalization": "ct", "ZScoreNormalization": "zscore"}[full["normalization_schemes"][0]]
    if full["use_mask_for_norm"][0]:
        expected = "zscore_nonzero"
    assert ours_plan.normalization == [expected]
    assert expected == ("ct" if modality == "CT" else "zscore_nonzero")  # both of nnU-Net's rules were exercised
    assert ours_plan.strides[0] == [2, 2, 1]  # and a thick-slice plan was compared, not an isotropic one
