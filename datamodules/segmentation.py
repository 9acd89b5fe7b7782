"""The TorchIO datamodule every data source builds on.

Training: ``SubjectsDataset`` (preprocessing + augmentation) → ``Queue`` (patches from a
uniform or label sampler) → ``SubjectsLoader`` (batches of patches, ``num_workers=0`` as a
Queue requires). Validation: whole subjects, one per step, never patches; the
LightningModule runs sliding-window inference on each.

Every subject carries ``image`` (ScalarImage, ``in_channels`` channels), ``label`` (LabelMap,
integers in ``[0, num_classes)``) and the attributes ``name`` (str) and
``expected_volume_ml`` (list of ``num_classes − 1`` floats, NaN where unknown).
Validation subjects also carry ``subject_index`` (their position in the validation list),
which the metrics use to count every subject exactly once across processes.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datamodules.transforms import augmentation as compose_augmentation
from datamodules.transforms import preprocessing

SAMPLERS = ("label", "uniform")


def resolve_num_workers(num_workers: int | str) -> int:
    """``"auto"`` → one worker per CPU core but one (at most 8); an int is used as is."""
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores - 1))
    if int(num_workers) < 0:
        raise ValueError(f"data.num_workers must be >= 0 or 'auto', got {num_workers}")
    return int(num_workers)


def first_item(batch: list[tio.Subject]) -> tio.Subject:
    """Collate for whole-subject loaders: batch size 1, the subject itself."""
    return batch[0]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, …``: every item on exactly one process, no padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SegmentationDataModule(pl.LightningDataModule, abc.ABC):
    """Patch-based training and whole-volume validation on TorchIO subjects.

    Args:
        patch_size: training (and sliding-window) patch size in voxels ``(W, H, D)``.
        batch_size: patches per training step.
        samples_per_volume: patches drawn from a subject each time it enters the queue.
        queue_length: maximum patches held by the queue (raised to ``samples_per_volume``).
        num_workers: worker processes loading and augmenting subjects, or ``"auto"``.
        sampler: ``"label"`` (patch centres drawn by class) or ``"uniform"``.
        foreground_probability: with the label sampler, the probability that a patch is
            centred on a foreground voxel (nnU-Net oversamples 33 %), split evenly over the
            foreground classes.
        augmentation: named TorchIO transforms applied to training subjects, in order.
        normalization: ``"zscore"`` (per subject) or ``"none"``.
        val_patch_overlap: sliding-window overlap as a fraction of the patch (0 ≤ f < 1).
        val_batch_size: patches per forward pass during sliding-window inference.
        val_weighting: sliding-window blending: ``"hann"``, ``"gaussian"`` or ``"constant"``.
        pin_memory: pin training batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        patch_size: Sequence[int] = (32, 32, 32),
        batch_size: int = 2,
        samples_per_volume: int = 8,
        queue_length: int = 64,
        num_workers: int | str = "auto",
        sampler: str = "label",
        foreground_probability: float = 0.33,
        augmentation: Mapping[str, tio.Transform | None] | None = None,
        normalization: str = "zscore",
        val_patch_overlap: float = 0.5,
        val_batch_size: int = 2,
        val_weighting: str = "hann",
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"data.patch_size must be three positive ints, got {list(patch_size)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0.0 <= foreground_probability <= 1.0:
            raise ValueError(f"data.foreground_probability must be in [0, 1], got {foreground_probability}")
        if batch_size < 1 or samples_per_volume < 1:
            raise ValueError("data.batch_size and data.samples_per_volume must be >= 1")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.queue_length = max(int(queue_length), self.samples_per_volume)
        self.num_workers = resolve_num_workers(num_workers)
        self.sampler_name = sampler
        self.foreground_probability = float(foreground_probability)
        self.augmentation = compose_augmentation(augmentation)
        self.normalization = normalization
        self.val_patch_overlap = float(val_patch_overlap)
        self.val_batch_size = int(val_batch_size)
        self.val_weighting = val_weighting
        self.pin_memory = pin_memory
        self.train_subjects: list[tio.Subject] | None = None
        self.val_subjects: list[tio.Subject] | None = None
        self._subject_sampler: DistributedSampler | None = None

    # --- what a data source provides -------------------------------------------------
    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of classes including background."""

    @property
    @abc.abstractmethod
    def in_channels(self) -> int:
        """Image channels."""

    @property
    def class_names(self) -> list[str]:
        """Names of the foreground classes (``num_classes − 1``)."""
        return [f"class{c}" for c in range(1, self.num_classes)]

    @abc.abstractmethod
    def load_subjects(self) -> tuple[list[tio.Subject], list[tio.Subject]]:
        """Training and validation subjects (see the module docstring for their keys)."""

    # --- Lightning hooks --------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_subjects is not None:
            return
        train, val = self.load_subjects()
        if not train or not val:
            raise ValueError(f"need at least one training and one validation subject, got {len(train)} and {len(val)}")
        for index, subject in enumerate(val):
            subject["subject_index"] = index
        self.train_subjects, self.val_subjects = train, val

    def sliding_window_settings(self) -> dict:
        """Keyword arguments of ``lightning_modules.SlidingWindow`` for validation inference."""
        return {
            "patch_size": list(self.patch_size),
            "overlap": self.val_patch_overlap,
            "batch_size": self.val_batch_size,
            "weighting": self.val_weighting,
        }

    @property
    def val_subject_names(self) -> list[str]:
        assert self.val_subjects is not None, "call setup() first"
        return [s["name"] for s in self.val_subjects]

    def label_probabilities(self) -> dict[int, float]:
        """Patch-centre probability per class for the label sampler."""
        foreground = self.foreground_probability / (self.num_classes - 1)
        probabilities = {0: 1.0 - self.foreground_probability}
        probabilities.update({c: foreground for c in range(1, self.num_classes)})
        return probabilities

    def patch_sampler(self) -> tio.data.PatchSampler:
        if self.sampler_name == "uniform":
            return tio.UniformSampler(self.patch_size)
        return tio.LabelSampler(self.patch_size, label_name="label", label_probabilities=self.label_probabilities())

    def train_dataloader(self) -> DataLoader:
        assert self.train_subjects is not None, "call setup() first"
        transform = tio.Compose([preprocessing(self.normalization, self.patch_size), self.augmentation])
        dataset = tio.SubjectsDataset(self.train_subjects, transform=transform)
        rank, world_size = distributed_context()
        self._subject_sampler = None
        if world_size > 1:
            if len(dataset) < world_size:
                raise ValueError(f"{len(dataset)} training subjects cannot be shared by {world_size} processes")
            self._subject_sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, drop_last=True
            )
        queue = tio.Queue(
            dataset,
            max_length=self.queue_length,
            samples_per_volume=self.samples_per_volume,
            sampler=self.patch_sampler(),
            subject_sampler=self._subject_sampler,
            num_workers=self.num_workers,
            shuffle_subjects=self._subject_sampler is None,
            shuffle_patches=True,
            start_background=False,
        )
        pin = self.pin_memory and torch.cuda.is_available()
        return tio.SubjectsLoader(queue, batch_size=self.batch_size, num_workers=0, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        assert self.val_subjects is not None, "call setup() first"
        dataset = tio.SubjectsDataset(self.val_subjects, transform=preprocessing(self.normalization))
        rank, world_size = distributed_context()
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} validation subjects cannot be shared by {world_size} processes")
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=ShardSampler(len(dataset), rank, world_size),
            collate_fn=first_item,
            num_workers=min(self.num_workers, math.ceil(len(dataset) / world_size)),
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the subjects' split across processes (call at each epoch start)."""
        if self._subject_sampler is not None:
            self._subject_sampler.set_epoch(epoch)
