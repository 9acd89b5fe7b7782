"""Thick slices resampled as nnU-Net resamples them; other cases as TorchIO does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from datamodules.resampling import resample_subject, separate_axis


def subject(spacing, shape, seed=0) -> tio.Subject:
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [5.0, -3.0, 2.0]
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    centre = np.asarray(shape) * np.asarray(spacing) / 2
    distance = np.linalg.norm((grid - centre) / [8, 7, 9], axis=-1)
    label = np.select([distance < 0.5, distance < 1], [2, 1], 0).astype(np.float32)
    image = (100 + 50 * label + rng.normal(0, 10, shape)).astype(np.float32)
    return tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image)[None], affine=affine),
                       label=tio.LabelMap(tensor=torch.from_numpy(label)[None], affine=affine))


def test_the_separate_axis_follows_nnunets_rule():
    assert separate_axis([0.5, 0.5, 3.0], [1.0, 1.0, 1.5]) == 2  # the current spacing is anisotropic
    assert separate_axis([1.0, 1.0, 1.0], [0.5, 0.5, 2.0]) == 2  # the target is
    assert separate_axis([1.0, 1.0, 2.0], [1.0, 1.0, 1.0]) is None  # neither: TorchIO's resampling
    assert separate_axis([3.5, 0.5, 3.5], [1.0, 1.0, 1.0]) is None  # two coarsest axes tie


def test_thick_slices_are_resampled_like_nnunet_on_torchios_grid():
    nnunet = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling",
                                 reason="test-only oracle: .ci/run installs nnunetv2 (README, Tests)")
    original = subject((0.5, 0.5, 3.0), (40, 40, 10))
    target = (1.0, 1.0, 1.5)
    ours = resample_subject(original, target)
    torchio = tio.Resample(target)(original)
    assert ours["image"].shape == torchio["image"].shape == (1, 20, 20, 20)
    assert np.allclose(ours["image"].affine, torchio["image"].affine)  # the same grid
    shape = ours["image"].shape[1:]  # the plans pass force_separate_z=None (the function's default is False)
    image = nnunet.resample_data_or_seg_to_shape(original["image"].data.numpy(), shape, [0.5, 0.5, 3.0], list(target),
                                                 is_seg=False, order=3, order_z=0, force_separate_z=None)
    label = nnunet.resample_data_or_seg_to_shape(original["label"].data.numpy().astype(np.int16), shape, [0.5, 0.5, 3.0],
                                                 list(target), is_seg=True, order=1, order_z=0, force_separate_z=None)
    assert ours["image"].data.numpy() == pytest.approx(image, abs=1e-3)  # cubic in plane, nearest across slices
    assert np.array_equal(ours["label"].data.numpy(), label)  # per label value linear in plane, the highest wins, ties to the nearest
    assert not np.allclose(torchio["image"].data.numpy(), image, atol=1e-3)  # TorchIO's linear resampling would differ


def test_other_cases_keep_torchios_resampling():
    original = subject((1.0, 1.0, 2.0), (20, 20, 10))
    ours, torchio = resample_subject(original, (1.0, 1.0, 1.0)), tio.Resample((1.0, 1.0, 1.0))(original)
    assert torch.equal(ours["image"].data, torchio["image"].data) and torch.equal(ours["label"].data, torchio["label"].data)
