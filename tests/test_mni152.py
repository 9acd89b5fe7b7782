"""data=mni152: deformed MNI152 subjects with labels drawn from nilearn's tissue maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TINY_RUN, compose_config

from biasseg.pipelines.train import train
from datamodules import MNI152DataModule
from datamodules.mni152 import draw_labels

SMALL = dict(num_train=2, num_val=1, resolution_mm=4.0, num_workers=0, patch_size=(16, 16, 16))


def test_label_draws_follow_the_probabilities():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1, 1, 1], size=100_000).T[1:].reshape(2, 100_000, 1, 1).astype(np.float32)
    labels = draw_labels(probabilities, np.random.default_rng(1))
    for k in (1, 2):
        assert (labels == k).mean() == pytest.approx(probabilities[k - 1].mean(), abs=0.005)


def test_subjects_differ_are_seeded_and_know_their_expected_volume():
    dm = MNI152DataModule(**SMALL, tissues=["grey_matter", "white_matter"])
    a, b = dm.generate(0), dm.generate(1)
    again = MNI152DataModule(**SMALL, tissues=["grey_matter", "white_matter"]).generate(0)
    assert np.array_equal(a.arrays()[1], again.arrays()[1])
    assert not np.array_equal(a.arrays()[0], b.arrays()[0])
    assert a.spacing == pytest.approx((4.0, 4.0, 4.0))
    voxel_ml = 4.0**3 / 1000
    for k, expected in enumerate(a.expected_volume_ml, start=1):
        drawn = (a.arrays()[1] == k).sum() * voxel_ml
        assert 300 < expected < 1500  # grey and white matter of the MNI152 brain, in ml
        assert drawn == pytest.approx(expected, rel=0.05)


def test_bad_tissue_names_are_rejected():
    with pytest.raises(ValueError, match="data.tissues"):
        MNI152DataModule(tissues=["csf"])


@pytest.mark.parametrize("label_mode", ["hard", "soft"])
def test_one_epoch_reports_expected_volume_bias(label_mode, tmp_path):
    cfg = compose_config(["data=mni152", "data.num_train=2", "data.num_val=1", "data.resolution_mm=4",
                          "data.patch_size=[16,16,16]", f"data.label_mode={label_mode}", "loss=ce_softdice",
                          *TINY_RUN, "callbacks.validation_figures=null"], tmp_path)
    summary = train(cfg)
    assert math.isfinite(summary["val/soft_expected_volume_bias_ml"])
    assert math.isfinite(summary["val/ece"])
    assert "volume_expected_ml" in (tmp_path / "subjects.csv").read_text()
