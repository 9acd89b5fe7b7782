"""Lesion-wise measures (biasseg/metrics/lesions.py, lesion_metrics.py): components, BraTS 2023
and IoU matching, per-lesion volumes, the epoch summary; cross-checked against panoptica."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose_config

from biasseg.errors import InputError
from biasseg.metrics.lesion_metrics import (
    ROW_COLUMNS,
    LesionMetrics,
    argmax_masks,
    lesion_epoch_summary,
    lesion_table,
    subject_lesion_rows,
)
from biasseg.metrics.lesions import LESION_COLUMNS, LesionSettings, lesion_rows, lesion_settings, lesion_summary
from biasseg.pipelines.train import train


def cube(mask, corner, size):
    mask[tuple(slice(c, c + size) for c in corner)] = True


def as_dicts(rows):
    return [dict(zip(LESION_COLUMNS, row)) for row in rows]


@pytest.fixture
def scene():
    """Reference: lesions A (4³), B (5³), C (2³ at 20) and D (2³ at 23, a voxel gap from C).
    Prediction: A shifted one voxel, C exact, a false positive far from all."""
    reference = np.zeros((40, 40, 40), bool)
    prediction = np.zeros_like(reference)
    cube(reference, (2, 2, 2), 4), cube(reference, (12, 12, 12), 5)
    cube(reference, (30, 20, 20), 2), cube(reference, (30, 23, 20), 2)
    cube(prediction, (2, 2, 3), 4), cube(prediction, (30, 20, 20), 2), cube(prediction, (2, 35, 35), 2)
    return prediction, reference


def test_iou_matching_counts_and_dice(scene):
    prediction, reference = scene
    rows = as_dicts(lesion_rows(prediction, reference, prediction.astype(float), (1, 1, 1), LesionSettings(match="iou")))
    lesions = [r for r in rows if r["reference"] == 1]
    assert len(lesions) == 4 and len(rows) == 5  # C and D stay apart without dilation
    assert [r["detected"] for r in lesions] == [1, 0, 1, 0]
    assert lesions[0]["dice"] == pytest.approx(2 * 48 / 128)  # 4³ cubes sharing 3 of 4 slices
    assert lesions[2]["dice"] == 1.0 and lesions[1]["dice"] == 0.0
    assert lesions[0]["volume_ref_ml"] == pytest.approx(64e-3) and lesions[1]["volume_pred_ml"] == 0
    summary = lesion_summary(lesion_rows(prediction, reference, prediction.astype(float), (1, 1, 1), LesionSettings(match="iou")))
    assert summary["lesion_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert summary["lesion_sensitivity"] == 0.5 and summary["lesions_false_positive"] == 1
    assert summary["lesion_count_difference"] == 1  # 3 predicted components, 4 reference lesions
    assert summary["lesion_dice"] == pytest.approx((0.75 + 1.0) / 5)  # BraTS: Σ Dice / (reference + false positives)


def test_overlap_rule_merges_close_reference_pieces_and_matches_by_dilation(scene):
    prediction, reference = scene
    rows = as_dicts(lesion_rows(prediction, reference, prediction.astype(float), (1, 1, 1), LesionSettings(dilation_voxels=1)))
    lesions = [r for r in rows if r["reference"] == 1]
    assert len(lesions) == 3  # C and D are one lesion: their dilations touch
    merged = lesions[2]
    assert merged["volume_ref_ml"] == pytest.approx(16e-3) and merged["dice"] == pytest.approx(2 * 8 / 24)
    # a prediction next to (not on) a reference lesion matches it once dilated
    near = np.zeros_like(reference)
    cube(near, (6, 2, 2), 2)
    alone = as_dicts(lesion_rows(near, reference, near.astype(float), (1, 1, 1), LesionSettings(dilation_voxels=1)))
    assert alone[0]["detected"] == 1 and alone[0]["dice"] == 0.0 and len(alone) == 3  # matched, no false positive
    strict = as_dicts(lesion_rows(near, reference, near.astype(float), (1, 1, 1), LesionSettings(dilation_voxels=0)))
    assert strict[0]["detected"] == 0 and strict[-1]["reference"] == 0  # without dilation: missed, and a false positive


def test_connectivity_and_size_threshold():
    diagonal = np.zeros((6, 6, 6), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True
    empty = np.zeros_like(diagonal)
    count = {c: len(lesion_rows(empty, diagonal, empty.astype(float), (1, 1, 1), LesionSettings(connectivity=c, dilation_voxels=0)))
             for c in (6, 18, 26)}
    assert count == {6: 2, 18: 2, 26: 1}
    big = np.zeros((10, 10, 10), bool)
    cube(big, (1, 1, 1), 3)
    big[8, 8, 8] = True
    kept = lesion_rows(np.zeros_like(big), big, np.zeros(big.shape), (2, 2, 2), LesionSettings(min_volume_ml=0.01))
    assert len(kept) == 1 and kept[0, LESION_COLUMNS.index("volume_ref_ml")] == pytest.approx(27 * 8e-3)


def test_soft_volume_goes_to_the_nearest_lesion_within_the_margin():
    reference = np.zeros((30, 10, 10), bool)
    cube(reference, (2, 4, 4), 2), cube(reference, (20, 4, 4), 2)
    probability = np.full(reference.shape, 0.01)
    spacing = (1.0, 2.0, 2.0)
    rows = as_dicts(lesion_rows(reference, reference, probability, spacing, LesionSettings(margin_mm=100.0, dilation_voxels=0)))
    voxel_ml = 4e-3
    # margin beyond the volume: every voxel belongs to one lesion, split at the midpoint x = 11.5
    assert sum(r["volume_pred_soft_ml"] for r in rows) == pytest.approx(probability.sum() * voxel_ml)
    assert rows[0]["volume_pred_soft_ml"] == pytest.approx(12 * 100 * 0.01 * voxel_ml)
    narrow = as_dicts(lesion_rows(reference, reference, probability, spacing, LesionSettings(margin_mm=1.0, dilation_voxels=0)))
    # 1 mm: the lesion and its x-neighbours only (the other axes' spacing is 2 mm)
    assert narrow[0]["volume_pred_soft_ml"] == pytest.approx(16 * 0.01 * voxel_ml)
    expected = as_dicts(lesion_rows(reference, reference, probability, spacing, LesionSettings(margin_mm=1.0, dilation_voxels=0),
                                    expected=reference.astype(float)))
    assert expected[0]["volume_expected_ml"] == pytest.approx(8 * voxel_ml)


def test_no_lesions_anywhere_gives_no_rows_and_nan_scores():
    empty = np.zeros((8, 8, 8), bool)
    rows = lesion_rows(empty, empty, np.zeros(empty.shape), (1, 1, 1), LesionSettings())
    assert rows.shape == (0, len(LESION_COLUMNS))
    summary = lesion_summary(rows)
    assert math.isnan(summary["lesion_f1"]) and summary["lesion_count_difference"] == 0


def test_metric_keeps_each_subject_once_and_summarises(scene):
    prediction, reference = (torch.from_numpy(a) for a in scene)
    probabilities = torch.stack([1 - prediction.float(), prediction.float()])  # two classes, softmax-like
    metric = LesionMetrics(LesionSettings(match="iou"))
    for index in (3, 1, 3):  # subject 3 twice: DDP padding repeats a subject
        metric.update(probabilities, reference.long(), (1, 1, 1), index)
    metric.update(torch.stack([torch.ones(prediction.shape), torch.zeros(prediction.shape)]), torch.zeros(prediction.shape), (1, 1, 1), 7)
    rows = metric.compute()
    assert rows.shape == (10, len(ROW_COLUMNS)) and rows[:, 0].tolist() == [1] * 5 + [3] * 5
    summary = lesion_epoch_summary(rows, metric.settings, subjects=[1, 3, 7])
    assert summary["lesion_f1"] == pytest.approx(4 / 7) and summary["lesion_false_positives_per_scan"] == pytest.approx(2 / 3)
    # by size: A (0.064 ml) found, B (0.125 ml) missed, of C and D (0.008 ml each) one found
    assert [summary[f"lesion_sensitivity/{b}ml"] for b in ("0-0.01", "0.01-0.1", "0.1-1")] == [0.5, 1.0, 0.0]
    assert summary["lesion_volume_bias_ml_smallest"] == pytest.approx(summary["lesion_volume_bias_ml/0-0.01ml"])
    table = lesion_table(rows, [f"s{i}" for i in range(8)], ["tumour"], metric.settings)
    assert table[0]["subject"] == "s1" and table[0]["class"] == "tumour" and table[4]["kind"] == "false_positive"
    assert table[0]["size_bin_ml"] == "0.01-0.1"


def test_settings_are_checked():
    assert lesion_settings({"enabled": False, "match": "iou"}, 10) is None and lesion_settings(None, 10) is None
    assert lesion_settings({"enabled": True, "size_bins_ml": [1, 5]}, 4).size_bins_ml == (1.0, 5.0)
    for bad, message in (({"connectivity": 8}, "connectivity"), ({"match": "hungarian"}, "match"),
                         ({"size_bins_ml": [5, 1]}, "increasing"), ({"dilate": 3}, "unknown keys")):
        with pytest.raises(InputError, match=message):
            lesion_settings({"enabled": True, **bad}, 10)


def random_lesions(rng, shape, count, radius):
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    mask = np.zeros(shape, bool)
    for _ in range(count):
        centre, r = rng.uniform(3, np.array(shape) - 3), rng.uniform(*radius)
        mask |= (((grid - centre) / r) ** 2).sum(-1) <= 1
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_matching_equals_panoptica(seed):
    panoptica = pytest.importorskip("panoptica")  # test-only, installed by .ci/run
    rng = np.random.default_rng(seed)
    reference = random_lesions(rng, (48, 48, 32), 8, (1.5, 5))
    prediction = np.roll(reference, 1, axis=0) & ~random_lesions(rng, (48, 48, 32), 3, (2, 4)) | random_lesions(rng, (48, 48, 32), 3, (1, 3))
    evaluator = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.SEMANTIC, instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
        instance_matcher=panoptica.NaiveThresholdMatching(), verbose=False)
    theirs = evaluator.evaluate(prediction.astype(np.uint8), reference.astype(np.uint8), verbose=False)["ungrouped"]
    rows = lesion_rows(prediction, reference, prediction.astype(float), (1, 1, 1), LesionSettings(match="iou"))
    ours = lesion_summary(rows)
    lesions = as_dicts(rows)
    assert (ours["lesions_detected"], ours["lesions_false_positive"]) == (theirs.tp, theirs.fp)
    assert ours["lesions_reference"] == theirs.n_ref_instances and ours["lesions_reference"] - ours["lesions_detected"] == theirs.fn
    assert ours["lesion_f1"] == pytest.approx(theirs.rq)
    matched = [r["dice"] for r in lesions if r["detected"]]
    if matched:
        assert np.mean(matched) == pytest.approx(theirs.sq_dsc)


def test_regions_are_measured_on_their_sigmoid_maps():
    label = torch.zeros((20, 20, 20), dtype=torch.long)
    label[2:8, 2:8, 2:8] = 1
    label[4:6, 4:6, 4:6] = 2  # core inside the whole tumour
    label[12:15, 12:15, 12:15] = 2
    whole, core = torch.isin(label, torch.tensor([1, 2])).float(), (label == 2).float()
    rows = subject_lesion_rows(torch.stack([whole, core]), label, (1, 1, 1), LesionSettings(dilation_voxels=0), regions=[[1, 2], [2]])
    by_region = {k: as_dicts(rows[rows[:, 0] == k]) for k in (1, 2)}
    assert [r["volume_ref_ml"] for r in by_region[1]] == pytest.approx([216e-3, 27e-3])
    assert [r["volume_ref_ml"] for r in by_region[2]] == pytest.approx([8e-3, 27e-3])
    assert all(r["dice"] == 1.0 for r in rows_of(by_region))
    prediction_only = as_dicts(subject_lesion_rows(torch.stack([whole, core]), None, (1, 1, 1), LesionSettings(), regions=[[1, 2], [2]]))
    assert len(prediction_only) == 4 and all(r["reference"] == 0 and r["volume_pred_ml"] > 0 for r in prediction_only)


def rows_of(by_region):
    return [r for rows in by_region.values() for r in rows]


def test_argmax_masks_equal_argmax_ties_included():
    probabilities = torch.softmax(torch.randn(4, 6, 7, 8), 0)
    probabilities[:, 0, 0, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # a tie: the lowest class, background
    probabilities[:, 0, 0, 1] = torch.tensor([0.1, 0.4, 0.4, 0.1])
    expected = probabilities.argmax(0)[None] == torch.arange(1, 4).view(-1, 1, 1, 1)
    assert torch.equal(argmax_masks(probabilities), expected)


@pytest.mark.parametrize("option, expected", [("default", ("overlap", 3, 0.0)), ("brats", ("overlap", 3, 0.05)),
                                              ("iou", ("iou", 0, 0.0)), ("none", None)])
def test_every_lesions_option_composes_into_settings(option, expected, tmp_path):
    cfg = compose_config([f"lesions={option}"], tmp_path)
    settings = lesion_settings(cfg.lesions, 10.0)  # the DictConfig as the pipelines pass it
    assert (None if settings is None else (settings.match, settings.dilation_voxels, settings.min_volume_ml)) == expected


def test_short_multi_lesion_training_writes_lesions_csv_and_logs_lesion_keys(tmp_path):
    """experiment=multi_lesion as a user runs it, cut to a few steps: lesions.csv has the
    documented columns, every reference lesion its expected volume, and the lesion keys are
    in metrics.json and the logged history."""
    cfg = compose_config(["experiment=multi_lesion", "data.num_train=2", "data.num_val=2", *TINY_RUN,
                          "trainer.check_val_every_n_epoch=1", "logger=csv", "callbacks.validation_figures=null"], tmp_path)
    train(cfg)
    with open(tmp_path / "lesions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["subject", "class", "lesion", "kind", "detected", "components", "dice", "volume_ref_ml",
                             "volume_pred_ml", "volume_pred_soft_ml", "volume_expected_ml", "size_bin_ml",
                             "centre_x", "centre_y", "centre_z"]
    references = [row for row in rows if row["kind"] == "reference"]
    assert len({row["subject"] for row in references}) == 2
    assert len(references) >= 8 and all(float(row["volume_expected_ml"]) > 0 for row in references)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/lesion_f1", "val/lesion_volume_bias_ml", "val/lesion_volume_bias_ml_smallest",
                "val/lesion_count_difference"):
        assert key in metrics
    history = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()[0].split(",")
    assert "val/lesion_f1" in history
