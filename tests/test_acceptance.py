"""Acceptance: under strong label uncertainty soft Dice biases the volume, cross-entropy does not.

Trains the small U-Net twice on ``experiment=high_uncertainty`` (independent per-voxel label
noise, sigma 2.5 mm, spheres of 4-6.5 mm radius) and compares each model's soft volume with
the known expected volume. The direction soft Dice must err in is not assumed: it is derived
by numerically minimising the expected per-image soft Dice under the same uncertainty model
on the same validation subjects (theory.predicted_volume_bias).
"""

import json

import numpy as np
import pytest
from helpers import compose_config

from biasseg.pipelines.train import train
from biasseg.theory import predicted_volume_bias

KEY = "val/relative_soft_expected_volume_bias"  # mean over subjects of (Σp − Σq) / Σq


@pytest.mark.slow
def test_soft_dice_biases_volume_and_cross_entropy_stays_calibrated(tmp_path):
    overrides = ["experiment=high_uncertainty", "trainer.max_epochs=60",  # a third of the study's length: CI time
                 "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "logger=none"]
    measured = {}
    for loss in ("ce", "softdice"):
        cfg = compose_config(overrides + [f"loss={loss}"], tmp_path / loss)
        measured[loss] = train(cfg)

    predicted = predicted_volume_bias(cfg)["relative_soft"]  # cfg: the softdice run's
    report = {
        "ce": {k: measured["ce"][k] for k in (KEY, "val/dice", "val/relative_expected_volume_bias")},
        "softdice": {k: measured["softdice"][k] for k in (KEY, "val/dice", "val/relative_expected_volume_bias")},
        "softdice_predicted_relative_bias": predicted,
    }
    print(json.dumps(report, indent=2))
    (tmp_path / "acceptance.json").write_text(json.dumps(report, indent=2))

    assert abs(measured["ce"][KEY]) < 0.10, report
    assert abs(measured["softdice"][KEY]) > 0.10, report
    assert np.sign(measured["softdice"][KEY]) == np.sign(predicted), report
    assert measured["softdice"]["val/dice"] > measured["ce"]["val/dice"], report  # soft Dice wins on Dice
