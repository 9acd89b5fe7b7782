"""Measured where annotated: probabilities mapped back to each case's own grid, volumes there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from helpers import evaluation_config, reference_volumes

from biasseg.generated_folders import annotated_volumes_ml
from biasseg.pipelines.evaluate import evaluate
from datamodules.original_grid import OriginalGrid


def ellipsoid_on(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A world-space ellipsoid drawn on the grid ``(affine, shape)`` (so every grid sees the same one)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    centre = (affine[:3, :3] @ (np.asarray(shape) - 1) / 2) + affine[:3, 3]
    return (np.linalg.norm((world - centre) / [8, 7, 10], axis=-1) < 1).astype(np.float32)


@pytest.mark.parametrize("crop", [(0, 0, 0, 0, 0, 0), (2, 3, 1, 0, 0, 2)])
def test_mapping_back_equals_torchio_resampling_through_reorientation_resampling_and_crop(crop):
    affine = np.array([[0.0, -0.8, 0, 10], [-0.9, 0, 0, -5], [0, 0, 4.0, 3], [0, 0, 0, 1]])  # axes swapped and flipped
    shape = (30, 28, 8)
    original = tio.ScalarImage(tensor=torch.from_numpy(ellipsoid_on(affine, shape))[None], affine=affine)
    subject = tio.Crop(crop)(tio.Resample((1.0, 1.0, 1.0))(tio.ToCanonical()(tio.Subject(image=original))))
    p = subject["image"].data
    probabilities = torch.cat([1 - p, p])
    back = OriginalGrid(affine, shape).probabilities(probabilities, subject["image"].affine)
    reference = tio.Resample(original)(tio.ScalarImage(tensor=probabilities, affine=subject["image"].affine)).data
    assert back.shape == (2, *shape)
    assert back[1].numpy() == pytest.approx(reference[1].numpy(), abs=1e-5)  # TorchIO/ITK's linear resampling
    assert back.sum(0).numpy() == pytest.approx(np.ones(shape), abs=1e-6)  # still probabilities; background outside the crop
    assert (back.argmax(0).numpy() == original.data[0].numpy()).mean() > 0.99
    labels = OriginalGrid(affine, shape).segmentations(probabilities.argmax(0, keepdim=True).to(torch.uint8), subject["image"].affine)
    assert labels.dtype == torch.uint8 and (labels[0].numpy() == original.data[0].numpy()).mean() > 0.99


def test_the_same_grid_is_left_as_it_is():
    probabilities = torch.rand(3, 5, 6, 7)
    grid = OriginalGrid(np.diag([1.0, 2.0, 3.0, 1.0]), (5, 6, 7))
    assert grid.probabilities(probabilities, np.diag([1.0, 2.0, 3.0, 1.0])) is probabilities
    assert grid.voxel_ml == pytest.approx(0.006) and grid.spacing == (1.0, 2.0, 3.0)


def test_training_and_evaluation_measure_each_case_against_its_annotation(thick_slice_run, tmp_path):
    root, run = thick_slice_run
    annotated = annotated_volumes_ml(root)
    trained = reference_volumes(run / "subjects.csv")
    assert len(trained) == 2
    for name, volume in trained.items():  # the annotation's own voxels and voxel volume, not a resampled copy
        assert volume == pytest.approx(annotated[name], rel=1e-6)
    evaluate(evaluation_config(run / "checkpoints" / "last.ckpt", tmp_path))
    assert reference_volumes(tmp_path / "subjects.csv") == pytest.approx(trained, rel=1e-9)
