"""Training batches read patch by patch from each case's (memory-mapped) arrays.

Why not TorchIO's ``Queue``: it loads, normalises and augments *whole* subjects in its
workers and then cuts patches, so a 96³ patch from a 256³ ``.nii.gz`` costs a full
decompression and a whole-volume augmentation. Here a patch reads only its own bytes from
the preprocessing cache (or an in-memory array), is normalised, then augmented with the
configured TorchIO transforms; ``benchmarks/pipeline.py`` measures the difference against a
plain Queue. The semantics follow the Queue's: every epoch each of this process's subjects
contributes ``samples_per_volume`` patches, shuffled across subjects, and subjects (not
patches) are sharded across processes by a ``DistributedSampler``. With ``steps_per_epoch``
(nnU-Net's fixed 250 iterations) an epoch is that many batches whatever the number of
subjects: its ``steps × batch_size`` patches go round this process's subjects in random
order, each subject drawn as often as any other (±1), so a dataset of 10 subjects and one of
1 000 train for the same number of steps.

Patch centres (nnU-Net's oversampling): with probability ``foreground_probability`` on a
voxel of a foreground class chosen uniformly among those present (patches that fit inside
the volume preferred), otherwise uniformly over the volume. Every batch is drawn from its
own seed ``(seed, epoch, rank, batch index)``, so the stream is reproducible and independent
of the number of workers, and different on every rank.

Which epoch a pass serves, and from which batch, is set with :meth:`PatchBatches.set_epoch`
before the pass (the LightningModule does so at every epoch start, the datamodule when a run
resumes) and kept in shared memory, so persistent workers, which hold their own copy of the
stream, read it too. A run resumed in the middle of an epoch therefore continues with
exactly the batches an uninterrupted run would have trained on next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DistributedSampler, IterableDataset, get_worker_info

from datamodules.cases import Case, read_window
from datamodules.transforms import PatchAugmentation


class PatchBatches(IterableDataset):
    """Yields ``{"image": {"data": (B, C, *patch)}, "label": {"data": (B, 1, *patch)}}``, or
    with ``soft_labels`` the class probabilities ``{"label": {"data": (B, num_classes, *patch)}}``.

    Args:
        cases: the training cases (all of them; ``subject_sampler`` picks this rank's).
        patch_size: ``(W, H, D)`` voxels.
        batch_size, samples_per_volume: patches per batch; per subject per epoch.
        steps_per_epoch: batches per epoch whatever the number of subjects (``samples_per_volume``
            is then unused); None = ``samples_per_volume × subjects / batch_size``.
        foreground_probability: share of patches centred on foreground (0 = uniform).
        augmentation: TorchIO transforms applied to each patch, in order.
        context: voxels read on each side of a patch for the resampling transforms (affine,
            elastic; cropped after the last of them), so rotations and zooms see real image
            instead of padding; ignored when no such transform is configured.
        seed: base seed of the stream.
        subject_sampler: this rank's subjects under DDP (``set_epoch`` is forwarded).
        soft_labels: train on the cases' class ``probabilities`` (float) instead of their
            label (SoftSeg, Gros et al. 2021; the rater mean for multi-rater cases); the transforms resample them like a label map
            (nearest neighbour), the background channel is ``1 − Σ foreground`` after them.
        train_rater: for multi-rater cases, the label a patch trains on: ``"random"`` (one
            rater drawn per patch: disagreement seen as label noise), ``"majority"`` (their
            vote) or rater ``k`` (from 1).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        samples_per_volume: int,
        foreground_probability: float,
        augmentation: Sequence[tio.Transform],
        context: int | Sequence[int] = 0,
        seed: int = 0,
        subject_sampler: DistributedSampler | None = None,
        soft_labels: bool = False,
        train_rater: str | int = "random",
        steps_per_epoch: int | None = None,
    ) -> None:
        self.cases = list(cases)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.train_rater = train_rater
        self.soft_labels = bool(soft_labels)
        if self.soft_labels and any(c.probabilities is None for c in self.cases):
            missing = next(c.name for c in self.cases if c.probabilities is None)
            raise ValueError(
                f"data.label_mode=soft needs the label's class probabilities, which case {missing!r} does not have "
                "(data=synthetic and data=mni152 provide them)"
            )
        self.patch_size = np.asarray(patch_size, dtype=int)
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.foreground_probability = float(foreground_probability)
        self.augmentation = PatchAugmentation(augmentation)
        self.context = np.broadcast_to(np.asarray(context, dtype=int), (3,)).copy()
        self.seed = int(seed)
        self.subject_sampler = subject_sampler
        self.rank = subject_sampler.rank if subject_sampler is not None else 0
        # (epoch, first batch) of the next pass, in shared memory: persistent workers see changes
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next passes serve epoch ``epoch`` from its batch ``start_batch`` on (every
        worker, also persistent ones); call it before each epoch's pass."""
        self._position[0], self._position[1] = int(epoch), int(start_batch)

    def subjects(self, epoch: int) -> list[int]:
        """This rank's subject indices in ``epoch``."""
        if self.subject_sampler is not None:
            self.subject_sampler.set_epoch(epoch)
            return list(self.subject_sampler)
        return list(range(len(self.cases)))

    def __len__(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return math.ceil(len(self.subjects(self.epoch)) * self.samples_per_volume / self.batch_size)

    def epoch_subjects(self, epoch: int) -> np.ndarray:
        """The subject of every patch of ``epoch`` on this process, in the order they are drawn."""
        subjects = self.subjects(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        if self.steps_per_epoch is None:
            jobs = np.repeat(subjects, self.samples_per_volume)
            rng.shuffle(jobs)
            return jobs
        # whole rounds over the subjects, each round in its own order, cut to the epoch's patches
        patches = self.steps_per_epoch * self.batch_size
        rounds = math.ceil(patches / len(subjects))
        return np.concatenate([rng.permutation(subjects) for _ in range(rounds)])[:patches]

    def __iter__(self):
        epoch, start = (int(v) for v in self._position)
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        jobs = self.epoch_subjects(epoch)
        # worker w yields batches start + w, start + w + W, …: the DataLoader's round robin over
        # the workers then hands them out in index order
        for index in range(start + worker_id, math.ceil(len(jobs) / self.batch_size), num_workers):
            chunk = jobs[index * self.batch_size : (index + 1) * self.batch_size]
            yield self.batch(chunk, [self.seed, epoch, self.rank, index])

    # --- one batch --------------------------------------------------------------------
    def batch(self, subjects: np.ndarray, seed: list[int]) -> dict:
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):  # TorchIO draws from torch's global generator
            torch.manual_seed(int(rng.integers(2**63)))
            patches = [self.patch(self.cases[int(i)], rng) for i in subjects]
        return {
            "image": {tio.DATA: torch.stack([p[0] for p in patches])},
            "label": {tio.DATA: torch.stack([p[1] for p in patches])},
        }

    def patch_start(self, case: Case, shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Lower corner of the next patch (may be negative where the volume is smaller)."""
        room = shape - self.patch_size
        classes = sorted(case.locations)
        if classes and rng.random() < self.foreground_probability:
            voxels = case.locations[classes[rng.integers(len(classes))]]
            half = self.patch_size // 2
            fits = np.all((room < 0) | ((voxels >= half) & (voxels - half <= room)), axis=1)
            candidates = voxels[fits] if fits.any() else voxels
            start = candidates[rng.integers(len(candidates))] - half
        else:
            start = np.array([rng.integers(r + 1) if r > 0 else 0 for r in room])
        return np.where(room >= 0, np.clip(start, 0, np.maximum(room, 0)), room // 2)

    def patch(self, case: Case, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented ``(image (C, *patch), label (1 or num_classes, *patch))`` pair."""
        image, label = case.arrays()
        shape = np.asarray(label.shape[-3:])
        if self.soft_labels:
            label = case.probability_maps()
        elif case.raters is not None and self.train_rater != "majority":  # the label is the raters' majority vote
            raters = case.rater_maps()
            label = raters[rng.integers(len(raters)) if self.train_rater == "random" else self.train_rater - 1]
        with_context, after_crop = self.augmentation.split(self.augmentation.draw(rng))
        context = self.context if with_context else np.zeros(3, dtype=int)
        start = self.patch_start(case, shape, rng) - context
        size = self.patch_size + 2 * context
        affine = np.diag([*case.spacing, 1.0])
        subject = tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(read_window(image, start, size, case.normalised)), affine=affine),
            label=tio.LabelMap(tensor=self.label_window(label, start, size), affine=affine),
        )
        for transform in with_context:
            subject = transform(subject)
        if context.any():
            inner = tuple(slice(int(c), int(c + p)) for c, p in zip(context, self.patch_size))
            for name in ("image", "label"):
                subject[name].set_data(subject[name].data[(..., *inner)].contiguous())
        for transform in after_crop:
            subject = transform(subject)
        target = subject["label"].data
        if self.soft_labels:  # padding (outside the volume, by the transforms) is background
            target = target.float()
            target[0] = (1 - target[1:].sum(0)).clamp(0, 1)
            return subject["image"].data.float().contiguous(), target.contiguous()
        return subject["image"].data.float().contiguous(), target.long().contiguous()

    def label_window(self, label: np.ndarray, start: np.ndarray, size: np.ndarray) -> torch.Tensor:
        """The label ``(1, *size)`` int64, or the class probabilities ``(num_classes, *size)`` float32."""
        if self.soft_labels:
            return torch.from_numpy(read_window(label, start, size).astype(np.float32))
        return torch.from_numpy(read_window(label, start, size).astype(np.int64))[None]
