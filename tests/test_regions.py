"""nnU-Net region labels: sigmoid outputs per region, binary losses, every measure per region."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_FOLDER, compose_config
from omegaconf import OmegaConf

from biasseg.generated_folders import REGIONS, annotated_region_volumes_ml, write_nested_regions
from biasseg.losses import CrossEntropyLoss, SoftDiceLoss
from biasseg.losses.regions import region_loss
from biasseg.pipelines.predict import predict
from biasseg.pipelines.score import score
from biasseg.pipelines.train import train
from datamodules import DatasetError
from datamodules.dataset_layout import read_layout

VALUES = [[1, 2, 3], [2, 3], [3]]


def test_dataset_json_regions_are_read_and_bad_ones_refused(tmp_path):
    root = write_nested_regions(tmp_path / "data", num_cases=2)
    layout = read_layout(root)
    assert layout.class_names == ("background", *REGIONS) and layout.regions == ((1, 2, 3), (2, 3), (3,))
    assert layout.regions_class_order == (1, 2, 3) and layout.label_values == (0, 1, 2, 3)
    description = json.loads((root / "dataset.json").read_text())
    del description["regions_class_order"]
    (root / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError, match="regions_class_order"):
        read_layout(root)


def test_a_region_loss_is_the_binary_loss_of_each_region():
    monai = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4)
    label = torch.randint(0, 4, (2, 1, 6, 5, 4))
    masks = torch.stack([torch.isin(label[:, 0], torch.tensor(v)) for v in VALUES], dim=1).float()
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    assert region_loss(CrossEntropyLoss(), logits, label, VALUES) == pytest.approx(bce.item(), rel=1e-5)
    dice = monai.DiceLoss(sigmoid=True, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, masks)
    assert region_loss(SoftDiceLoss(), logits, label, VALUES) == pytest.approx(dice.item(), rel=1e-5)


def test_a_nested_region_dataset_trains_and_reports_each_regions_volume_bias(tmp_path):
    root = write_nested_regions(tmp_path / "data")
    out = tmp_path / "run"
    summary = train(compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                    "data.val_fraction=0.4", "loss=ce_softdice"], out))
    for region in REGIONS:
        assert f"val/dice/{region}" in summary and f"val/soft_relative_volume_bias/{region}" in summary
    annotated = annotated_region_volumes_ml(root)
    with open(out / "subjects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:  # each region's reference volume, as annotated on the case's own grid
        for region in REGIONS:
            assert float(row[f"volume_ref_ml/{region}"]) == pytest.approx(annotated[(row["subject"], region)], rel=1e-6)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["regions"] == VALUES
    assert checkpoint["state_dict"]["net.heads.0.weight"].shape[0] == 3  # one sigmoid output per region, no background

    predictions = tmp_path / "pred"
    predict(OmegaConf.create({"ckpt_path": str(out / "checkpoints" / "last.ckpt"), "input": str(root / "imagesTr"),
                              "output": str(predictions), "save_probabilities": True, "device": "cpu", "overlap": None,
                              "batch_size": None, "overwrite": False, "alpha": None}))
    exported = np.asarray(nib.load(predictions / "case_000.nii.gz").dataobj)
    assert set(np.unique(exported)) <= {0, 1, 2, 3}
    probabilities = np.asarray(nib.load(predictions / "case_000_probabilities.nii.gz").dataobj)
    assert probabilities.shape[-1] == 3
    whole = probabilities[..., 0] > 0.5
    assert ((exported > 0) == (whole | (probabilities[..., 1] > 0.5) | (probabilities[..., 2] > 0.5))).all()
    with open(predictions / "volumes.csv") as handle:
        predicted = list(csv.DictReader(handle))
    assert {r["class"] for r in predicted} == set(REGIONS)

    # score.py reads the region maps (dataset.json beside labelsTr declares the regions) and the
    # exported label maps, and gives predict.py's volumes per region
    def scored(folder, name):
        score(OmegaConf.create({"predictions": str(folder), "labels": str(root / "labelsTr"), "num_classes": None,
                                "soft_volume_margin_mm": 10.0, "paths": {"output_dir": str(tmp_path / name)}}))
        with open(tmp_path / name / "subjects.csv") as handle:
            return {r["subject"]: r for r in csv.DictReader(handle)}

    soft = scored(predictions, "scored_soft")
    masks = tmp_path / "masks"
    masks.mkdir()
    for row in predicted:
        (masks / f"{row['case']}.nii.gz").write_bytes((predictions / f"{row['case']}.nii.gz").read_bytes())
    hard = scored(masks, "scored_hard")
    assert sorted(soft) == sorted(hard) == sorted({r["case"] for r in predicted})
    for row in predicted:
        region = row["class"]
        assert float(soft[row["case"]][f"volume_pred_soft_ml/{region}"]) == pytest.approx(float(row["soft_volume_ml"]), rel=1e-4)
        # an exported map's region is every voxel whose value it covers (a later region's voxel
        # counts for the earlier ones, as nnU-Net reads its exports), not predict's p > 0.5 mask
        exported = nib.load(predictions / f"{row['case']}.nii.gz")
        voxel_ml = abs(np.linalg.det(exported.affine[:3, :3])) / 1000
        values = REGIONS[region] if isinstance(REGIONS[region], list) else [REGIONS[region]]
        in_region = np.isin(np.asarray(exported.dataobj), values).sum() * voxel_ml
        assert float(hard[row["case"]][f"volume_pred_ml/{region}"]) == pytest.approx(in_region, rel=1e-6)
        assert float(soft[row["case"]][f"volume_ref_ml/{region}"]) == pytest.approx(annotated[(row["case"], region)], rel=1e-6)
