"""The datamodule every data source builds on.

A data source provides :class:`~datamodules.cases.Case` objects (arrays in memory or in the
preprocessing cache). Training: :class:`~datamodules.patch_stream.PatchBatches` reads,
normalises and augments patches in ``num_workers`` processes (subjects sharded across DDP
ranks). Validation: whole subjects as TorchIO ``Subject`` objects, one per step, never
patches; the LightningModule runs sliding-window inference on each.

Validation subjects carry ``image`` (ScalarImage, ``in_channels`` channels, normalised),
``label`` (LabelMap, integers in ``[0, num_classes)``) and the attributes ``name`` (str),
``expected_volume_ml`` (``num_classes − 1`` floats, NaN where unknown) and ``subject_index``
(their position in the validation list), which the metrics use to count every subject
exactly once across processes.
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torchio as tio
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from biasseg.errors import InputError
from datamodules.cases import NORMALISATION_SCHEMES, Case, Intensity, channel_intensity
from datamodules.patch_stream import PatchBatches
from datamodules.transforms import augmentation as compose_augmentation

# PatchBatches gives every worker its own batches, so its __len__ is exact; Lightning's
# generic warning about IterableDataset lengths does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

SAMPLERS = ("label", "uniform")
NORMALISATIONS = ("zscore", "ct", "none")  # one scheme for every channel; a list gives one per channel (NORMALISATION_SCHEMES)
LABEL_MODES = ("hard", "soft")


def resolve_num_workers(num_workers: int | str) -> int:
    """``"auto"`` → one worker per CPU core but one (at most 8); an int is used as is."""
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores - 1))
    if int(num_workers) < 0:
        raise InputError(f"data.num_workers must be >= 0 or 'auto', got {num_workers}")
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


def ct_intensity(cases: Sequence[Case]) -> Intensity:
    """nnU-Net's CT scheme (``CTNormalization``): clip to the 0.5–99.5 percentiles of the
    training foreground intensities, then z-score with their mean and standard deviation
    (per channel; the statistics of the unclipped foreground, as nnU-Net's fingerprint)."""
    samples = [c.foreground_samples for c in cases if c.foreground_samples is not None and c.foreground_samples.size]
    if not samples:
        raise InputError("data.normalization=ct needs foreground voxels in the training labels; none found")
    pooled = np.concatenate(samples, axis=1).astype(np.float64)
    lower, upper = np.percentile(pooled, [0.5, 99.5], axis=1)
    return Intensity(pooled.mean(1), np.maximum(pooled.std(1), 1e-8), lower, upper)


class SubjectList(Dataset):
    """Whole validation subjects, built from their cases when loaded."""

    def __init__(self, cases: Sequence[Case], num_classes: int) -> None:
        self.cases, self.num_classes = list(cases), num_classes

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tio.Subject:
        subject = self.cases[index].to_subject(self.num_classes)
        subject["subject_index"] = index
        return subject


class SegmentationDataModule(pl.LightningDataModule, abc.ABC):
    """Patch-based training and whole-volume validation.

    Args:
        patch_size: training (and sliding-window) patch size in voxels ``(W, H, D)``.
        batch_size: patches per training step.
        samples_per_volume: patches drawn from each subject per epoch.
        steps_per_epoch: training steps per epoch whatever the number of subjects (nnU-Net:
            250), so that a small and a large dataset train as long; None = ``samples_per_volume
            × subjects / batch_size`` (TorchIO's ``Queue``), which shrinks with the dataset.
        num_workers: processes reading and augmenting patches, or ``"auto"``.
        sampler: ``"label"`` (nnU-Net's foreground oversampling) or ``"uniform"``.
        foreground_probability: with the label sampler, the probability that a patch is
            centred on a foreground voxel (nnU-Net: 33 %), the class chosen uniformly among
            those present; other patches are placed uniformly.
        augmentation: named TorchIO transforms applied to training patches, in order.
        augmentation_context: extra context read on each side of a training patch before
            augmentation, as a fraction of the patch, cropped afterwards (so rotations and
            zooms see image, not padding).
        normalization: ``"zscore"`` (per subject and channel, nnU-Net's MRI scheme), ``"ct"``
            (clip + z-score with training-foreground statistics) or ``"none"`` for every channel;
            or a list with one of :data:`~datamodules.cases.NORMALISATION_SCHEMES` per channel
            (``zscore_nonzero``: inside the non-zero mask); ``data=folder`` plans it (``"auto"``).
        val_patch_overlap: sliding-window overlap as a fraction of the patch (0 ≤ f < 1).
        val_batch_size: patches per forward pass during sliding-window inference.
        val_weighting: sliding-window blending: ``"hann"``, ``"gaussian"`` or ``"constant"``.
        val_mirror_axes: test-time mirroring: the probabilities of every flip over these axes
            (0, 1, 2 = W, H, D) are averaged (nnU-Net: all three, 8 passes); empty = none.
        val_accumulate: where sliding-window inference sums the probability map: ``"auto"``
            (the device, the CPU when the device cannot hold it), ``"device"`` or ``"cpu"``.
        pin_memory: pin training batches for faster host-to-GPU copies.
        label_mode: ``"hard"`` trains on the (drawn) label map; ``"soft"`` on the label's class
            probabilities where the source knows them (synthetic, MNI152), as SoftSeg (Gros et
            al. 2021). Validation always scores against the label map.
    """

    def __init__(
        self,
        patch_size: Sequence[int] = (32, 32, 32),
        batch_size: int = 2,
        samples_per_volume: int = 8,
        steps_per_epoch: int | None = None,
        num_workers: int | str = "auto",
        sampler: str = "label",
        foreground_probability: float = 0.33,
        augmentation: Mapping[str, tio.Transform | None] | None = None,
        augmentation_context: float = 0.0,
        normalization: str | Sequence[str] = "zscore",
        val_patch_overlap: float = 0.5,
        val_batch_size: int = 2,
        val_weighting: str = "hann",
        val_mirror_axes: Sequence[int] = (),
        val_accumulate: str = "auto",
        pin_memory: bool = True,
        label_mode: str = "hard",
        train_rater: str | int = "random",
    ) -> None:
        super().__init__()
        if label_mode not in LABEL_MODES:
            raise InputError(f"data.label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if train_rater not in ("random", "majority") and not (isinstance(train_rater, int) and not isinstance(train_rater, bool) and train_rater >= 1):
            raise InputError(f"data.train_rater must be random, majority or a rater number from 1, got {train_rater!r}")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise InputError(f"data.patch_size must be three positive ints, got {list(patch_size)}")
        if sampler not in SAMPLERS:
            raise InputError(f"data.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0.0 <= foreground_probability <= 1.0:
            raise InputError(f"data.foreground_probability must be in [0, 1], got {foreground_probability}")
        if batch_size < 1 or samples_per_volume < 1:
            raise InputError("data.batch_size and data.samples_per_volume must be >= 1")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool)
                                            or steps_per_epoch < 1):
            raise InputError(f"data.steps_per_epoch must be a whole number >= 1 or null, got {steps_per_epoch!r}")
        if not (normalization in (*NORMALISATIONS, "auto") if isinstance(normalization, str) else
                all(n in NORMALISATION_SCHEMES for n in normalization)):
            raise InputError(f"data.normalization must be one of {NORMALISATIONS} or a list of {NORMALISATION_SCHEMES} "
                             f"(one per channel), got {normalization!r}")
        if augmentation_context < 0:
            raise InputError(f"data.augmentation_context must be >= 0, got {augmentation_context}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.num_workers = resolve_num_workers(num_workers)
        self.sampler_name = sampler
        self.foreground_probability = float(foreground_probability) if sampler == "label" else 0.0
        self.augmentation = compose_augmentation(augmentation)
        self.augmentation_context = float(augmentation_context)
        self.normalization = normalization if isinstance(normalization, str) else [str(n) for n in normalization]
        self.val_patch_overlap = float(val_patch_overlap)
        self.val_batch_size = int(val_batch_size)
        self.val_weighting = val_weighting
        self.val_mirror_axes = [int(a) for a in val_mirror_axes]
        self.val_accumulate = val_accumulate  # checked by lightning_modules.SlidingWindow
        if not set(self.val_mirror_axes) <= {0, 1, 2} or len(set(self.val_mirror_axes)) != len(self.val_mirror_axes):
            raise InputError(f"data.val_mirror_axes must be distinct axes among 0, 1, 2, got {list(val_mirror_axes)}")
        self.pin_memory = pin_memory
        self.label_mode = label_mode
        self.train_rater = train_rater
        self.train_cases: list[Case] | None = None
        self.val_cases: list[Case] | None = None
        self.intensity: Intensity | None = None  # dataset-wide mapping (ct), None = per subject
        self._patches: PatchBatches | None = None
        self._resume_point: tuple[int, int] | None = None

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
    def num_raters(self) -> int:
        """Label maps per subject where several raters annotated it; 0 = one label."""
        return 0

    @property
    def class_names(self) -> list[str]:
        """Names of the foreground classes (``num_classes − 1``)."""
        return [f"class{c}" for c in range(1, self.num_classes)]

    @property
    def regions(self) -> list[list[int]] | None:
        """nnU-Net region labels: the label values each foreground class (a region, its own
        sigmoid output) covers; None = mutually exclusive classes (softmax)."""
        return None

    @property
    def regions_class_order(self) -> list[int] | None:
        """With regions: the label value each region writes when a segmentation is exported."""
        return None

    def network_plan(self, stages: int) -> dict:
        """U-Net settings this data plans for ``stages`` stages (``strides``, ``kernel_sizes``);
        none here: the model's defaults."""
        return {}

    @property
    def channel_names(self) -> list[str]:
        """Names of the image channels, in the order the model reads them."""
        return [f"channel{c}" for c in range(self.in_channels)]

    evaluation_only = False  # True: validation cases only (a trained model scored on a dataset), no training cases

    def adopt_preprocessing(self, settings: Mapping, source: str) -> None:
        """Read the data as the model of ``source`` (a checkpoint, named in errors) was trained
        to: its ``inference_settings``' normalisation, with its training statistics for ``ct``
        (subclasses also take its spacing and crop). Refuses, in one line, data whose channels
        or classes differ from the model's. Call before :meth:`setup`."""
        model_channels = list(settings.get("channel_names") or [])
        channels_differ = int(settings.get("in_channels", self.in_channels)) != self.in_channels or (
            model_channels and model_channels != self.channel_names)
        classes_differ = list(settings.get("class_names") or self.class_names) != self.class_names
        if channels_differ or classes_differ:
            raise InputError(
                f"{self.description}: channels {self.channel_names} and classes {self.class_names}; {source} was trained on "
                f"channels {model_channels or settings.get('in_channels')} and classes {settings.get('class_names')}: "
                "it cannot segment this data")
        self.normalization = settings.get("normalization") or self.normalization
        if "ct" in self.channel_schemes:
            self.intensity = Intensity(**{k: np.asarray(v, dtype=np.float64) for k, v in settings["intensity"].items()})

    @property
    def description(self) -> str:
        """What this data is, for messages (the dataset folder, the generator)."""
        return type(self).__name__

    @abc.abstractmethod
    def load_cases(self) -> tuple[list[Case], list[Case]]:
        """Training and validation cases."""

    # --- Lightning hooks --------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_cases is not None:
            return
        train, val = self.load_cases()
        if not val or not (train or self.evaluation_only):
            raise InputError(f"need at least one training and one validation subject, got {len(train)} and {len(val)}")
        if train and not any(case.locations for case in train):
            warnings.warn(
                f"every training label of this {type(self).__name__} is empty (background only): "
                "the model can only learn to predict background",
                stacklevel=2,
            )
        if isinstance(self.train_rater, int) and self.train_rater > max(self.num_raters, 1):
            raise InputError(f"data.train_rater={self.train_rater}, but the subjects have {self.num_raters or 'one label, no'} raters")
        if "ct" in self.channel_schemes and self.intensity is None:  # a model's own statistics stay (adopt_preprocessing)
            self.intensity = ct_intensity(train)
        for case in [*train, *val]:
            case.intensity = self.case_intensity(case)
        self.train_cases, self.val_cases = train, val

    @property
    def channel_schemes(self) -> list[str]:
        """The normalisation scheme of each channel (:data:`~datamodules.cases.NORMALISATION_SCHEMES`)."""
        if isinstance(self.normalization, list):
            if len(self.normalization) != self.in_channels:
                raise InputError(f"data.normalization lists {len(self.normalization)} schemes for {self.in_channels} channels")
            return list(self.normalization)
        if self.normalization == "auto":
            raise InputError(f"data.normalization=auto (planned from the channels' names) needs data=folder, not {type(self).__name__}")
        return [self.normalization] * self.in_channels

    def case_intensity(self, case: Case) -> Intensity:
        """The intensity mapping of ``case`` under this module's normalisation."""
        schemes = self.channel_schemes
        assert "ct" not in schemes or self.intensity is not None, "call setup() first"
        return channel_intensity(schemes, case.channel_mean, case.channel_std, case.nonzero_mean, case.nonzero_std, self.intensity)

    def sliding_window_settings(self) -> dict:
        """Keyword arguments of ``lightning_modules.SlidingWindow`` for validation inference."""
        return {
            "patch_size": list(self.patch_size),
            "overlap": self.val_patch_overlap,
            "batch_size": self.val_batch_size,
            "weighting": self.val_weighting,
            "mirror_axes": list(self.val_mirror_axes),
            "accumulate": self.val_accumulate,
        }

    def inference_settings(self) -> dict:
        """How new images must be preprocessed for this data's model (stored in checkpoints)."""
        return {
            "target_spacing": None,  # mm; None = use images at their own spacing
            "crop_nonzero": False,
            "normalization": self.channel_schemes,
            "intensity": None if self.intensity is None else
            {k: np.asarray(getattr(self.intensity, k)).tolist() for k in ("shift", "scale", "lower", "upper")},
            "in_channels": self.in_channels,
            "channel_names": self.channel_names,
            "class_names": self.class_names,
        }

    @property
    def val_subject_names(self) -> list[str]:
        assert self.val_cases is not None, "call setup() first"
        return [c.name for c in self.val_cases]

    def train_dataloader(self) -> DataLoader:
        assert self.train_cases is not None, "call setup() first"
        rank, world_size = distributed_context()
        subject_sampler = None
        if world_size > 1:
            if len(self.train_cases) < world_size:
                raise InputError(f"{len(self.train_cases)} training subjects cannot be shared by {world_size} processes")
            subject_sampler = DistributedSampler(
                range(len(self.train_cases)), num_replicas=world_size, rank=rank, shuffle=True, drop_last=True
            )
        self._patches = PatchBatches(
            self.train_cases,
            patch_size=self.patch_size,
            batch_size=self.batch_size,
            samples_per_volume=self.samples_per_volume,
            foreground_probability=self.foreground_probability,
            augmentation=self.augmentation,
            context=[math.ceil(self.augmentation_context * p) for p in self.patch_size],
            seed=torch.initial_seed() % 2**32,
            subject_sampler=subject_sampler,
            soft_labels=self.label_mode == "soft",
            train_rater=self.train_rater,
            steps_per_epoch=self.steps_per_epoch,
        )
        epoch, start = (self.trainer.current_epoch if self.trainer is not None else 0), 0
        if self._resume_point is not None:  # a restored run: continue where its checkpoint stopped
            (epoch, start), self._resume_point = self._resume_point, None
            if start >= len(self._patches):  # saved at the end of an epoch: the next one starts afresh
                epoch, start = epoch + 1, 0
        self._patches.set_epoch(epoch, start)
        return DataLoader(
            self._patches,
            batch_size=None,  # PatchBatches yields whole batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # no worker start-up per epoch; set_epoch reaches them (shared memory)
            prefetch_factor=4 if self.num_workers > 0 else None,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_cases is not None, "call setup() first"
        rank, world_size = distributed_context()
        if len(self.val_cases) < world_size:
            raise InputError(f"{len(self.val_cases)} validation subjects cannot be shared by {world_size} processes")
        dataset = SubjectList(self.val_cases, self.num_classes)
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=ShardSampler(len(dataset), rank, world_size),
            collate_fn=first_item,
            num_workers=min(self.num_workers, math.ceil(len(dataset) / world_size)),
        )

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """A checkpoint is being restored that was saved in ``epoch`` after ``batches_done`` of
        its batches: the training loader's first pass continues there. (Lightning creates
        the loader, and its workers copy the patch stream, before it restores its loops, so
        the position is taken from the checkpoint itself.)"""
        self._resume_point = (int(epoch), int(batches_done))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reshuffle patches and the subjects' split across processes (each epoch start);
        ``start_batch`` > 0 continues an interrupted epoch after the batches it trained on."""
        if self._patches is not None:
            self._patches.set_epoch(epoch, start_batch)
