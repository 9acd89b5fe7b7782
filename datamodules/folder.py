"""``data=folder data.root=PATH``: a Decathlon or nnU-Net v2 dataset folder on disk."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from callbacks.results_writer import write_atomically
from datamodules.cases import Case
from datamodules.dataset_layout import DatasetLayout, read_layout
from datamodules.input_checks import DatasetError
from datamodules.preprocessing_cache import PreprocessingCache, median_spacing
from datamodules.segmentation import SegmentationDataModule, distributed_context


def split_cases(names: Sequence[str], seed: int, val_fraction: float, fold: int | None, num_folds: int) -> list[dict]:
    """nnU-Net's ``splits_final.json`` format: ``[{"train": […], "val": […]}, …]``.

    With ``fold`` set, ``num_folds`` folds of a seeded shuffle; otherwise one split holding
    out ``val_fraction`` of the cases (at least one).
    """
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    if fold is None:
        n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
        groups = [order[:n_val]]
    else:
        groups = [list(g) for g in np.array_split(np.asarray(order, dtype=object), num_folds)]
    return [{"train": sorted(n for n in names if n not in set(g)), "val": sorted(g)} for g in groups]


class FolderDataModule(SegmentationDataModule):
    """Cases listed by ``root/dataset.json``, checked, preprocessed once into the cache.

    Args:
        root: the dataset folder (holding ``dataset.json``).
        cache_dir: where preprocessed cases are kept (see :mod:`datamodules.preprocessing_cache`).
        target_spacing: resampling target in mm ``(x, y, z)`` (RAS+), or None for the
            dataset's median spacing (nnU-Net's default).
        crop_nonzero: crop each case to the box of non-zero image voxels.
        val_fraction: share of cases held out for validation when ``fold`` is None.
        fold, num_folds: use fold ``fold`` of a ``num_folds``-fold split instead.
        split_seed: seed of the split (fixed by default so every run sees the same split).
        splits_file: where the split used is written (nnU-Net's ``splits_final.json`` format).
        splits_from: a ``splits.json`` to reuse instead of drawing a split.
        **loader: :class:`SegmentationDataModule` arguments.
    """

    def __init__(
        self,
        root: str,
        cache_dir: str = "~/.cache/biasseg",
        target_spacing: Sequence[float] | None = None,
        crop_nonzero: bool = True,
        val_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        split_seed: int = 0,
        splits_file: str | None = None,
        splits_from: str | None = None,
        **loader,
    ) -> None:
        super().__init__(**loader)
        if self.label_mode == "soft":
            raise ValueError("data.label_mode=soft needs the labels' class probabilities; data=folder has label maps only")
        if root in (None, "", "???"):
            raise DatasetError(["data.root is not set: data=folder needs data.root=PATH (a folder with dataset.json)"])
        if fold is not None and not 0 <= fold < num_folds:
            raise ValueError(f"data.fold must be in [0, {num_folds}), got {fold}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.layout: DatasetLayout = read_layout(root)
        if self.layout.num_classes > 256:
            raise DatasetError([f"{self.layout.root / 'dataset.json'}: more than 256 classes are not supported"])
        self.cache_dir = cache_dir
        self.target_spacing = [float(s) for s in target_spacing] if target_spacing is not None else None
        self.crop_nonzero = bool(crop_nonzero)
        self.val_fraction, self.fold, self.num_folds = float(val_fraction), fold, int(num_folds)
        self.split_seed = int(split_seed)
        self.splits_file, self.splits_from = splits_file, splits_from
        self._cache: PreprocessingCache | None = None

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def in_channels(self) -> int:
        return self.layout.in_channels

    @property
    def class_names(self) -> list[str]:
        return list(self.layout.class_names[1:])

    @property
    def cache(self) -> PreprocessingCache:
        """The cache for this dataset and these settings (resolving the median spacing once)."""
        if self._cache is None:
            spacing = self.target_spacing or median_spacing(self.layout.cases)
            self._cache = PreprocessingCache(self.layout, self.cache_dir, spacing, self.crop_nonzero)
        return self._cache

    def prepare_data(self) -> None:
        """Check, then preprocess, every case not yet cached (once per node)."""
        self.cache.prepare(self.layout.cases, self.num_workers)

    def splits(self) -> list[dict]:
        if self.splits_from:
            return json.loads(Path(self.splits_from).expanduser().read_text())
        return split_cases([c.name for c in self.layout.cases], self.split_seed, self.val_fraction, self.fold, self.num_folds)

    def load_cases(self) -> tuple[list[Case], list[Case]]:
        self.prepare_data()  # a no-op when fresh; makes setup() alone enough outside a Trainer
        splits = self.splits()
        split = splits[self.fold or 0]
        known = {c.name: c for c in self.layout.cases}
        unknown = sorted((set(split["train"]) | set(split["val"])) - set(known))
        if unknown:
            raise DatasetError([f"{self.splits_from}: cases {unknown} are not in {self.layout.root}"])
        if self.splits_file and distributed_context()[0] == 0:
            write_atomically(Path(self.splits_file), json.dumps(splits, indent=2))
        train = [self.cache.load(known[n]) for n in split["train"]]
        val = [self.cache.load(known[n]) for n in split["val"]]
        return train, val

    def inference_settings(self) -> dict:
        """What prediction on new images needs to preprocess them like the training data."""
        return {
            **super().inference_settings(),
            "target_spacing": self.cache.settings["target_spacing_mm"],
            "crop_nonzero": self.crop_nonzero,
        }
