"""The TorchIO pipeline: queue patches, sampler foreground fraction, whole-volume validation."""

import json

import numpy as np
import pytest
import torch
import torchio as tio

from biasseg.errors import InputError
from datamodules import SyntheticDataModule
from datamodules.segmentation import ShardSampler, resolve_num_workers

SMALL = dict(num_train=4, num_val=2, shape=(32, 32, 16), radius_mm=(4.0, 6.0), num_structures=1,
             num_workers=0, augmentation=None)


def centre_labels(datamodule, epochs: int = 1) -> torch.Tensor:
    torch.manual_seed(0)  # the patch stream's seed derives from torch's (as after seed_everything)
    loader = datamodule.train_dataloader()
    centres = []
    for epoch in range(epochs):
        datamodule.set_epoch(epoch)
        for batch in loader:
            label = batch["label"][tio.DATA]
            w, h, d = (s // 2 for s in label.shape[2:])
            centres.append(label[:, 0, w, h, d])
    return torch.cat(centres)


@pytest.mark.parametrize("probability", [0.33, 0.8])
def test_label_sampler_foreground_fraction(probability):
    dm = SyntheticDataModule(**SMALL, patch_size=(16, 16, 8), samples_per_volume=50, batch_size=10,
                             foreground_probability=probability)
    dm.setup()
    centres = centre_labels(dm, epochs=2)
    assert len(centres) == 2 * 4 * 50
    assert (centres > 0).float().mean().item() == pytest.approx(probability, abs=0.06)


def test_uniform_sampler_follows_the_foreground_share():
    dm = SyntheticDataModule(**SMALL, patch_size=(16, 16, 8), samples_per_volume=50, batch_size=10,
                             sampler="uniform")
    dm.setup()
    centres = centre_labels(dm)
    assert (centres > 0).float().mean().item() < 0.2  # small spheres: rarely hit uniformly


def test_queue_batches_and_epoch_length():
    dm = SyntheticDataModule(**SMALL, patch_size=(16, 16, 8), samples_per_volume=3, batch_size=2)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sum(len(b["image"][tio.DATA]) for b in batches) == 4 * 3
    assert batches[0]["image"][tio.DATA].shape == (2, 1, 16, 16, 8)
    assert batches[0]["label"][tio.DATA].dtype == torch.int64


def test_training_volumes_smaller_than_the_patch_are_padded():
    small = {**SMALL, "shape": (24, 24, 8), "radius_mm": (3.0, 4.0)}
    dm = SyntheticDataModule(**small, patch_size=(32, 32, 16), samples_per_volume=1, batch_size=1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"][tio.DATA].shape == (1, 1, 32, 32, 16)


def test_validation_yields_whole_normalised_subjects():
    dm = SyntheticDataModule(**SMALL, patch_size=(16, 16, 8))
    dm.setup()
    subjects = list(dm.val_dataloader())
    assert [s["subject_index"] for s in subjects] == [0, 1]
    assert [s["name"] for s in subjects] == dm.val_subject_names == ["synthetic_004", "synthetic_005"]
    image = subjects[0]["image"][tio.DATA]
    assert image.shape == (1, 32, 32, 16)  # the whole volume, not a patch
    assert image.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert subjects[0]["label"].spacing == (1.0, 1.0, 2.0)
    assert len(subjects[0]["expected_volume_ml"]) == 1


def test_shard_sampler_covers_every_item_once():
    shards = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="data.sampler"):
        SyntheticDataModule(sampler="weighted")
    with pytest.raises(ValueError, match="foreground_probability"):
        SyntheticDataModule(foreground_probability=1.5)
    with pytest.raises(ValueError, match="uncertainty_kind"):
        SyntheticDataModule(uncertainty_kind="rater")
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1)
    assert resolve_num_workers("auto") >= 0


def stream(datamodule, workers: int) -> list[torch.Tensor]:
    datamodule.num_workers = workers
    torch.manual_seed(3)
    return [b["image"][tio.DATA] for b in datamodule.train_dataloader()]


def test_patch_stream_is_reproducible_and_independent_of_the_worker_count():
    dm = SyntheticDataModule(**{**SMALL, "augmentation": {"flip": tio.RandomFlip(axes=(0, 1, 2))}},
                             patch_size=(16, 16, 8), samples_per_volume=3, batch_size=2, augmentation_context=0.25)
    dm.setup()
    single, again, parallel = stream(dm, 0), stream(dm, 0), stream(dm, 2)
    assert len(single) == len(dm.train_dataloader()) == 6
    assert all(torch.equal(a, b) for a, b in zip(single, again))
    assert all(torch.equal(a, b) for a, b in zip(single, parallel))
    torch.manual_seed(3)
    loader = dm.train_dataloader()
    dm.set_epoch(1)
    assert not torch.equal(next(iter(loader))["image"][tio.DATA], single[0])


def test_patches_are_the_arrays_own_voxels():
    """Without augmentation a patch is an exact window of the normalised volume."""
    dm = SyntheticDataModule(**SMALL, patch_size=(16, 16, 8), samples_per_volume=1, batch_size=1)
    dm.setup()
    patch = next(iter(dm.train_dataloader()))["image"][tio.DATA][0]
    found = False
    for case in dm.train_cases:
        volume = torch.from_numpy(case.normalised(case.arrays()[0]))
        windows = volume.unfold(1, 16, 1).unfold(2, 16, 1).unfold(3, 8, 1)  # (C, nW, nH, nD, 16, 16, 8)
        found |= bool(((windows - patch[:, None, None, None]).abs().amax(dim=(0, 4, 5, 6)) < 1e-6).any())
    assert found


def test_patch_augmentation_leaves_the_configured_transforms_alone():
    affine = tio.RandomAffine(p=0.2)
    dm = SyntheticDataModule(**{**SMALL, "augmentation": {"affine": affine}}, patch_size=(16, 16, 8))
    dm.setup()
    dm.train_dataloader(), dm.train_dataloader()
    assert affine.probability == 0.2 and affine.copy is True


def test_soft_labels_are_the_class_probabilities_of_the_patch():
    """label_mode=soft: (B, C, *patch) probabilities summing to 1; without augmentation they are
    the case's own probability window, and background fills the padding."""
    dm = SyntheticDataModule(**{**SMALL, "shape": (12, 12, 8), "radius_mm": (2.0, 3.0)}, patch_size=(16, 16, 8), samples_per_volume=2,
                             batch_size=2, label_mode="soft")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    target = batch["label"][tio.DATA]
    assert target.dtype == torch.float32 and target.shape == (2, 2, 16, 16, 8)
    torch.testing.assert_close(target.sum(1), torch.ones(2, 16, 16, 8))
    assert target[:, 0, :2].eq(1).all()  # (16 − 12) / 2 = 2 voxels of padding on each side of W
    windows = [torch.from_numpy(c.probabilities) for c in dm.train_cases]
    assert any(torch.allclose(w, target[0, :, 2:14, 2:14]) for w in windows)
    assert ((target > 0) & (target < 1)).any()  # really soft


def test_soft_labels_survive_augmentation():
    affine = tio.RandomAffine(p=1.0, degrees=20)
    dm = SyntheticDataModule(**{**SMALL, "augmentation": {"flip": tio.RandomFlip(axes=(0, 1, 2)), "affine": affine}},
                             patch_size=(16, 16, 8), samples_per_volume=2, batch_size=2, label_mode="soft",
                             augmentation_context=0.25)
    dm.setup()
    target = next(iter(dm.train_dataloader()))["label"][tio.DATA]
    assert target.shape == (2, 2, 16, 16, 8)
    torch.testing.assert_close(target.sum(1), torch.ones(2, 16, 16, 8))
    assert target.min() >= 0 and target.max() <= 1


def test_soft_labels_need_known_probabilities():
    dm = SyntheticDataModule(**SMALL, label_mode="soft")
    dm.setup()
    dm.train_cases[1].probabilities = None  # as for data=folder, whose labels are plain maps
    with pytest.raises(ValueError, match="label_mode=soft.*synthetic_001"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="label_mode"):
        SyntheticDataModule(**SMALL, label_mode="fuzzy")


@pytest.mark.parametrize("subjects", [3, 12, 24])
def test_a_fixed_epoch_length_draws_every_subject_equally_often(subjects):
    dm = SyntheticDataModule(**{**SMALL, "num_train": subjects}, patch_size=(16, 16, 8), batch_size=2, steps_per_epoch=10)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == 10
    batches = list(loader)
    assert len(batches) == 10 and all(len(b["image"][tio.DATA]) == 2 for b in batches)
    drawn = np.bincount(dm._patches.epoch_subjects(0), minlength=subjects)
    assert drawn.sum() == 20 and drawn.max() - drawn.min() <= 1  # balanced: 20 patches over the subjects
    assert not np.array_equal(dm._patches.epoch_subjects(0), dm._patches.epoch_subjects(1))  # reshuffled each epoch


def test_without_a_fixed_length_the_epoch_is_samples_per_volume_per_subject():
    dm = SyntheticDataModule(**{**SMALL, "num_train": 12}, patch_size=(16, 16, 8), batch_size=2, samples_per_volume=3)
    dm.setup()
    assert len(dm.train_dataloader()) == 12 * 3 // 2


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "many"])
def test_steps_per_epoch_must_be_a_positive_whole_number(value):
    with pytest.raises(InputError, match="data.steps_per_epoch must be a whole number >= 1 or null"):
        SyntheticDataModule(**SMALL, steps_per_epoch=value)


@pytest.mark.parametrize("subjects", [12, 24])
def test_a_12_subject_dataset_trains_as_long_as_a_24_subject_one(subjects, tmp_path):
    """A real Lightning run: with data.steps_per_epoch the step count does not depend on the
    number of training subjects (without it, the 12-subject run would train half as long)."""
    from helpers import TINY, compose_config

    from biasseg.pipelines.train import train

    cfg = compose_config([*TINY, f"data.num_train={subjects}", "data.steps_per_epoch=7", "trainer.max_epochs=2",
                          "callbacks.validation_figures=null", "logger=csv"], tmp_path)
    train(cfg)
    steps = json.loads((tmp_path / "metrics.json").read_text())["global_step"]
    assert steps == 14
