"""evaluate.py on another dataset: the model's preprocessing, every case, nothing it trained on."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_FOLDER, compose_config, evaluation_config, reference_volumes

from biasseg.errors import InputError
from biasseg.generated_folders import annotated_volumes_ml, write_nnunet, write_thick_slices
from biasseg.pipelines.evaluate import evaluate
from biasseg.pipelines.train import train


def test_another_dataset_is_read_as_the_model_was_trained_to_read_it_and_every_case_scored(thick_slice_run, tmp_path):
    root, run = thick_slice_run
    other = write_thick_slices(tmp_path / "other", num_cases=4, modality="CT", start=20)  # its own median spacing
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluate(evaluation_config(ckpt, tmp_path / "out", "data=folder", f"data.root={other}", f"data.cache_dir={tmp_path / 'cache'}"))
    scored = reference_volumes(tmp_path / "out" / "subjects.csv")
    assert scored == pytest.approx(annotated_volumes_ml(other), rel=1e-6)  # all four, each as annotated
    stored = torch.load(ckpt, weights_only=True)["inference_settings"]
    used = json.loads((tmp_path / "out" / "metrics.json").read_text())["preprocessing"]
    assert used == {"target_spacing": stored["target_spacing"], "crop_nonzero": True, "normalization": ["ct"]}
    own_median = np.median([np.abs(np.diag(nib.load(p).affine)[:3]) for p in (other / "labelsTr").glob("*")], 0)
    assert not np.allclose(own_median, stored["target_spacing"], rtol=1e-3)  # the other folder's own plan was not used
    split = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert split == [{"train": [], "val": sorted(scored)}]


def test_a_dataset_with_other_classes_is_refused_in_one_line(thick_slice_run, tmp_path):
    _, run = thick_slice_run
    other = write_nnunet(tmp_path / "three_classes", channels=1)  # background, core, rim
    with pytest.raises(InputError) as error:
        evaluate(evaluation_config(run / "checkpoints" / "last.ckpt", tmp_path / "out", "data=folder", f"data.root={other}",
                                   f"data.cache_dir={tmp_path / 'cache'}"))
    message = str(error.value)
    assert "\n" not in message and str(other / "dataset.json") in message and "['core', 'rim']" in message
    assert "['lesion']" in message and not (tmp_path / "out" / "subjects.csv").exists()


def test_scoring_a_model_on_its_own_training_cases_is_refused(thick_slice_run, tmp_path):
    root, run = thick_slice_run
    trained_on = json.loads((run / "splits.json").read_text())[0]["train"]
    with pytest.raises(InputError, match=rf"case {trained_on[0]} .*is a training case of ckpt_path=.*last.ckpt"):
        evaluate(evaluation_config(run / "checkpoints" / "last.ckpt", tmp_path / "out", "cases=all"))


def test_an_ensemble_of_fold_models_is_not_scored_on_a_fold_it_trained_on(tmp_path):
    root = write_thick_slices(tmp_path / "data", num_cases=6)
    runs = []
    for fold in (0, 1):
        out = tmp_path / f"fold{fold}"
        train(compose_config([*TINY_FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", f"data.fold={fold}",
                              "data.num_folds=3"], out))
        runs.append(out / "checkpoints" / "last.ckpt")
    fold0_val = json.loads((tmp_path / "fold0" / "splits.json").read_text())[0]["val"]
    with pytest.raises(InputError, match=rf"case {fold0_val[0]} .*training case of ckpt_path=.*fold1"):
        evaluate(evaluation_config(f"[{runs[0]},{runs[1]}]", tmp_path / "out"))
    # nnU-Net's cross-validation summary instead: each case by the fold that validated on it, pooled
    evaluate(evaluation_config(f"[{runs[0]},{runs[1]}]", tmp_path / "cv", "cross_validation=true"))
    pooled = rows_by_case(tmp_path / "cv" / "subjects.csv")
    each = {**rows_by_case(tmp_path / "fold0" / "subjects.csv"), **rows_by_case(tmp_path / "fold1" / "subjects.csv")}
    assert sorted(pooled) == sorted(each) and len(pooled) == 4
    for case, row in pooled.items():  # the same numbers as each fold's own validation
        assert float(row["dice"]) == pytest.approx(float(each[case]["dice"]), nan_ok=True)
        assert float(row["volume_pred_soft_ml"]) == pytest.approx(float(each[case]["volume_pred_soft_ml"]), rel=1e-6)
    assert json.loads((tmp_path / "cv" / "metrics.json").read_text())["cross_validation"] is True


def rows_by_case(path) -> dict[str, dict]:
    with open(path) as handle:
        return {row["subject"]: row for row in csv.DictReader(handle)}
