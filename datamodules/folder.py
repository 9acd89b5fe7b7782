"""``data=folder data.root=PATH``: a Decathlon or nnU-Net v2 dataset folder on disk."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from biasseg.errors import DatasetError, InputError
from biasseg.run_files import write_atomically
from datamodules.cases import Case
from datamodules.dataset_layout import DatasetLayout, read_layout
from datamodules.fingerprint import dataset_fingerprint
from datamodules.plan import Plan, make_plan, pooling
from datamodules.preprocessing_cache import PreprocessingCache, dataset_directory
from datamodules.segmentation import SegmentationDataModule, distributed_context

log = logging.getLogger(__name__)


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


def read_splits(path: Path, known: set[str]) -> list[dict]:
    """A ``splits.json`` someone gave us: a list of ``{"train": [names], "val": [names]}`` whose
    names are cases of the dataset (:class:`DatasetError` naming the file otherwise)."""
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise DatasetError([f"{path}: cannot be read as JSON splits ({str(error)[:200] or type(error).__name__})"]) from None
    shape_ok = isinstance(splits, list) and splits and all(
        isinstance(s, dict) and all(isinstance(s.get(k), list) and all(isinstance(n, str) for n in s[k]) for k in ("train", "val"))
        for s in splits
    )
    if not shape_ok:
        raise DatasetError([f"{path}: not a splits file (a non-empty list of {{\"train\": [case names], \"val\": [case names]}})"])
    repeated = sorted({n for s in splits for k in ("train", "val") for n in s[k] if s[k].count(n) > 1})
    if repeated:
        raise DatasetError([f"{path}: cases {repeated[:5]} are listed more than once in one split"])
    unknown = sorted({n for s in splits for k in ("train", "val") for n in s[k]} - known)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetError([f"{path}: cases {shown} are not in the dataset"])
    return splits


def chosen_split(splits: list[dict], fold: int | None, where: str) -> dict:
    """Fold ``fold`` of ``splits`` (the only one when None), with cases to train and validate on."""
    index = fold or 0
    if not 0 <= index < len(splits):
        raise InputError(f"data.fold={fold}, but {where} has {len(splits)} fold(s)")
    split = splits[index]
    if not split["train"] or not split["val"]:
        raise InputError(f"{where}, fold {index}: {len(split['train'])} training and {len(split['val'])} validation cases; both need one")
    overlap = sorted(set(split["train"]) & set(split["val"]))
    if overlap:
        raise DatasetError([f"{where}, fold {index}: cases {overlap[:5]} are both training and validation cases"])
    return split


class FolderDataModule(SegmentationDataModule):
    """Cases listed by ``root/dataset.json``, checked, preprocessed once into the cache.

    Args:
        root: the dataset folder (holding ``dataset.json``).
        cache_dir: where preprocessed cases are kept (see :mod:`datamodules.preprocessing_cache`).
        target_spacing: resampling target in mm ``(x, y, z)`` (RAS+), or None: planned from
            the dataset's fingerprint (:mod:`datamodules.plan`: nnU-Net's median, the 10th
            percentile along a thick-slice axis). ``patch_size`` None and ``normalization``
            ``"auto"`` (loader arguments) are planned too, and the U-Net's strides
            (:meth:`network_plan`).
        plan_patch_voxels: the planned patch's size in voxels (its shape follows the spacing).
        plan_file: where the plan is written (JSON), or None.
        crop_nonzero: crop each case to the box of non-zero image voxels.
        val_fraction: share of cases held out for validation when ``fold`` is None.
        fold, num_folds: use fold ``fold`` of a ``num_folds``-fold split instead.
        split_seed: seed of the split (fixed by default so every run sees the same split).
        splits_file: where the split used is written (nnU-Net's ``splits_final.json`` format).
        splits_from: a ``splits.json`` to reuse instead of drawing a split.
        allow_outside_root: accept files that ``dataset.json`` places outside ``root`` (``..``,
            absolute paths, symbolic links out of it); refused by default.
        validate: ``"split"``: validate on the split's validation cases (training); ``"all"``:
            on every case, or a list: on those cases, with no training cases (a trained model
            scored on a dataset: ``evaluate.py``).
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
        allow_outside_root: bool = False,
        validate: str = "split",
        plan_patch_voxels: int = 32768,
        plan_file: str | None = None,
        **loader,
    ) -> None:
        planned_patch = loader.get("patch_size") is None
        super().__init__(**{**loader, "patch_size": (1, 1, 1) if planned_patch else loader["patch_size"]})
        self.patch_size: tuple[int, ...] | None = None if planned_patch else self.patch_size  # None until planned
        if int(plan_patch_voxels) < 8:
            raise InputError(f"data.plan_patch_voxels must be >= 8, got {plan_patch_voxels}")
        self.plan_patch_voxels, self.plan_file = int(plan_patch_voxels), plan_file
        self._plan: Plan | None = None
        self._keep_fingerprint: Callable[[], None] = lambda: None
        if root in (None, "", "???"):
            raise DatasetError(["data.root is not set: data=folder needs data.root=PATH (a folder with dataset.json)"])
        if splits_from is None and fold is not None and not 0 <= fold < num_folds:
            raise InputError(f"data.fold must be in [0, {num_folds}) (data.num_folds), got {fold}")
        if not 0.0 < val_fraction < 1.0:
            raise InputError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if not (validate in ("split", "all") or (isinstance(validate, (list, tuple)) and validate)):
            raise InputError(f"data.validate must be split, all or a list of case names, got {validate!r}")
        self.evaluation_only = validate != "split"
        if int(num_folds) < 2:
            raise InputError(f"data.num_folds must be >= 2, got {num_folds}")
        self.layout: DatasetLayout = read_layout(root, allow_outside_root=bool(allow_outside_root))
        if self.label_mode == "soft" and not self.layout.num_raters:
            raise InputError("data.label_mode=soft needs the labels' class probabilities: data=folder has them only "
                             "where several raters annotated each case (their mean); this dataset has one label per case")
        if self.layout.regions is not None and self.layout.num_raters:
            raise DatasetError([f"{self.layout.root / 'dataset.json'}: region labels with several raters are not supported"])
        if self.layout.num_classes > 256:
            raise DatasetError([f"{self.layout.root / 'dataset.json'}: more than 256 classes are not supported"])
        self.cache_dir = cache_dir
        self.target_spacing = [float(s) for s in target_spacing] if target_spacing is not None else None
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise InputError(f"data.target_spacing must be three positive numbers (mm), got {list(target_spacing)}")
        self.crop_nonzero = bool(crop_nonzero)
        self.val_fraction, self.fold, self.num_folds = float(val_fraction), fold, int(num_folds)
        self.split_seed = int(split_seed)
        self.splits_file, self.splits_from = splits_file, splits_from
        self._cache: PreprocessingCache | None = None
        if self.evaluation_only:
            names = [c.name for c in self.layout.cases]
            chosen = names if validate == "all" else [str(n) for n in validate]
            unknown = sorted(set(chosen) - set(names))
            if unknown:
                raise DatasetError([f"{self.layout.root / 'dataset.json'}: cases {unknown[:5]} to validate on are not in the dataset"])
            chosen = set(chosen)
            self.all_splits = [{"train": [], "val": [n for n in names if n in chosen]}]
            self.split = self.all_splits[0]
        else:
            self.all_splits = self.splits()  # checked now, before any preprocessing
            self.split = chosen_split(self.all_splits, fold, self.splits_from or "the drawn split")

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def in_channels(self) -> int:
        return self.layout.in_channels

    @property
    def num_raters(self) -> int:
        return self.layout.num_raters

    @property
    def class_names(self) -> list[str]:
        return list(self.layout.class_names[1:])

    @property
    def channel_names(self) -> list[str]:
        return list(self.layout.channel_names)

    @property
    def regions(self) -> list[list[int]] | None:
        return None if self.layout.regions is None else [list(r) for r in self.layout.regions]

    @property
    def regions_class_order(self) -> list[int] | None:
        return None if self.layout.regions_class_order is None else list(self.layout.regions_class_order)

    @property
    def description(self) -> str:
        return f"{self.layout.root / 'dataset.json'}"

    def adopt_preprocessing(self, settings, source: str) -> None:
        """As :meth:`SegmentationDataModule.adopt_preprocessing`, and the model's target spacing
        and non-zero crop (this dataset's own median spacing is not used)."""
        super().adopt_preprocessing(settings, source)
        if settings.get("target_spacing") is not None:
            self.target_spacing = [float(s) for s in settings["target_spacing"]]
        self.crop_nonzero = bool(settings.get("crop_nonzero", self.crop_nonzero))
        self._cache = None

    def split_record(self) -> dict:
        """Which cases of which dataset the model trains and validates on (stored in checkpoints,
        so that an evaluation never scores a model on a case it trained on)."""
        return {"dataset": str(self.layout.root), "train": list(self.split["train"]), "val": list(self.split["val"])}

    @property
    def plan(self) -> Plan:
        """The dataset's plan (:mod:`datamodules.plan`), made once from its fingerprint; the
        entries set by keys replace the planned ones, which fill what is not set."""
        if self._plan is None:
            fingerprint, self._keep_fingerprint = dataset_fingerprint(
                self.layout, dataset_directory(self.layout, self.cache_dir), self.num_workers)
            plan = make_plan(fingerprint, self.plan_patch_voxels)
            spacing = self.target_spacing or plan.target_spacing
            patch = list(self.patch_size) if self.patch_size is not None else plan.patch_size
            strides, kernels, _ = pooling(spacing, patch)
            normalization = plan.normalization if self.normalization == "auto" else self.channel_schemes
            self._plan = Plan(spacing, patch, strides, kernels, normalization, plan.median_size, self.batch_size,
                              self.steps_per_epoch)
            self.patch_size = tuple(patch)
            log.info(f"Plan for {self.layout.name} ({len(fingerprint.spacings)} cases; data.* and model.strides keys override it):\n"
                     f"{self._plan.table()}")
            if self.plan_file and distributed_context()[0] == 0:
                Path(self.plan_file).parent.mkdir(parents=True, exist_ok=True)
                write_atomically(Path(self.plan_file), json.dumps(self._plan.as_dict(), indent=2))
        return self._plan

    @property
    def channel_schemes(self) -> list[str]:
        if self.normalization == "auto":
            return list(self.plan.normalization)
        return super().channel_schemes

    def network_plan(self, stages: int) -> dict:
        """The U-Net's planned ``strides`` and ``kernel_sizes`` for ``stages`` stages (the first
        pooling steps of the plan; stride-1 stages where the patch allows no more)."""
        strides, kernels = self.plan.strides[: stages - 1], self.plan.kernel_sizes[: stages - 1]
        strides = strides + [[1, 1, 1]] * (stages - 1 - len(strides))
        kernels = kernels + [[3, 3, 3]] * (stages - len(kernels))
        return {"strides": strides, "kernel_sizes": kernels}

    def sliding_window_settings(self) -> dict:
        self.plan  # noqa: B018 (the patch size may be planned)
        return super().sliding_window_settings()

    @property
    def cache(self) -> PreprocessingCache:
        """The cache for this dataset and these settings (planning the target spacing once)."""
        if self._cache is None:
            spacing = self.target_spacing or self.plan.target_spacing
            self._cache = PreprocessingCache(self.layout, self.cache_dir, spacing, self.crop_nonzero)
        return self._cache

    def prepare_data(self) -> None:
        """Check, then preprocess, every case not yet cached (once per node)."""
        self.cache.prepare(self.layout.cases, self.num_workers)
        self._keep_fingerprint()  # the checks passed

    def splits(self) -> list[dict]:
        """Every split: the reused ``splits_from`` file, or drawn from the cases."""
        names = [c.name for c in self.layout.cases]
        if self.splits_from:
            return read_splits(Path(self.splits_from).expanduser(), set(names))
        if len(names) < 2:
            raise DatasetError([f"{self.layout.root / 'dataset.json'}: {len(names)} case(s); a training and a validation case are needed"])
        if self.fold is not None and len(names) < self.num_folds:
            raise InputError(f"data.num_folds={self.num_folds} folds need at least as many cases; {self.layout.root} has {len(names)}")
        return split_cases(names, self.split_seed, self.val_fraction, self.fold, self.num_folds)

    def load_cases(self) -> tuple[list[Case], list[Case]]:
        self.prepare_data()  # a no-op when fresh; makes setup() alone enough outside a Trainer
        known = {c.name: c for c in self.layout.cases}
        if self.splits_file and distributed_context()[0] == 0:
            Path(self.splits_file).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(Path(self.splits_file), json.dumps(self.all_splits, indent=2))
        train = [self.cache.load(known[n]) for n in self.split["train"]]
        val = [self.cache.load(known[n]) for n in self.split["val"]]
        return train, val

    def inference_settings(self) -> dict:
        """What prediction on new images needs to preprocess them like the training data (the
        data of a model that was itself scored only, ``validate=all``, keeps the model's)."""
        settings = {
            **super().inference_settings(),
            "target_spacing": self.cache.settings["target_spacing_mm"],
            "crop_nonzero": self.crop_nonzero,
        }
        if self._plan is not None:
            settings["plan"] = self._plan.as_dict()
        return settings
