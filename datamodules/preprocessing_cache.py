"""Preprocess a dataset once and keep the result, uncompressed, for every later run.

Per case (nnU-Net's order): reorient to RAS+ (``ToCanonical``), resample to the target
spacing (images linear, labels nearest; thick slices in plane and across separately, as
nnU-Net, :mod:`datamodules.resampling`), crop to the bounding box of non-zero image voxels.
Intensity normalisation is *not* baked in: it is cheap per patch, and keeping raw
intensities lets every normalisation setting share one cache.

Layout::

    <cache_dir>/<dataset name>-<hash of its path>/<hash of the settings>/
        settings.json          the settings the hash stands for (human-readable)
        <case>.image.npy       float32 (C, W, H, D), read memory-mapped
        <case>.label.npy       uint8 (W, H, D); with several raters their majority vote
        <case>.raters.npy      uint8 (R, W, H, D), each rater's label (several raters only)
        <case>.probabilities.npy  float32 (C, W, H, D), the raters' mean (several raters only)
        <case>.original_label.npy   uint8, the label as annotated: the file's own grid and axes
        <case>.original_raters.npy  uint8 (R, …), each rater's as annotated (several raters only)
        <case>.sampling.npz    foreground voxel locations per class, foreground intensities
        <case>.meta.json       affine, spacing, statistics and the source files' fingerprint

A case is reused only while its source files keep their size and modification time
(``make``'s rule), the settings are unchanged and its arrays are intact (the sizes and
``.npy`` headers recorded in its ``.meta.json``); anything else is rebuilt. Files are written
under temporary names and renamed into place, the ``.meta.json`` last, so an interrupted run never
leaves an entry that looks complete. Preparing holds a lock on the settings directory
(``.lock``, ``flock``): a second run on the same new cache waits instead of preprocessing the
same cases again, and temporaries left by a killed run are removed under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from tqdm import tqdm

from biasseg.errors import InputError
from biasseg.run_files import write_atomically
from datamodules.cases import Case, class_locations, foreground_samples, majority_vote, rater_mean, rater_volumes_ml
from datamodules.dataset_layout import CaseFiles, DatasetLayout
from datamodules.input_checks import check_cases
from datamodules.original_grid import OriginalGrid
from datamodules.resampling import resample_subject

log = logging.getLogger(__name__)

CACHE_VERSION = 6  # bump when the stored arrays or their .meta.json change meaning
ARRAYS = ("image.npy", "label.npy", "sampling.npz", "original_label.npy")
RATER_ARRAYS = ("raters.npy", "probabilities.npy", "original_raters.npy")  # cases with several raters


def default_cache_dir() -> str:
    """``$BIASSEG_CACHE_DIR``, else ``~/.cache/biasseg`` (as ``configs/data/folder.yaml``)."""
    return os.environ.get("BIASSEG_CACHE_DIR", "~/.cache/biasseg")


def fingerprint(case: CaseFiles) -> list:
    """``[path, size, mtime_ns]`` of each source file."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in case.files]


def load_subject(case: CaseFiles) -> tio.Subject:
    """The case's image (all channels: one 4D file or one file per channel) and label, or with
    several raters ``raters`` (one channel per rater; the input checks made their grids equal)."""
    images = [tio.ScalarImage(p) for p in case.images]
    if len(images) > 1:
        tensor = torch.cat([i.data for i in images])
        image = tio.ScalarImage(tensor=tensor, affine=images[0].affine)
    else:
        image = images[0]
    if case.raters:
        maps = [tio.LabelMap(p) for p in case.raters]
        return tio.Subject(image=image, raters=tio.LabelMap(tensor=torch.cat([m.data for m in maps]), affine=maps[0].affine))
    return tio.Subject(image=image, label=tio.LabelMap(case.label))


def preprocess_subject(subject: tio.Subject, target_spacing: Sequence[float] | None, crop_nonzero: bool) -> tio.Subject:
    """Canonical orientation, target spacing (mm, RAS+ axes; None keeps the image's; thick
    slices resampled as nnU-Net does, :mod:`datamodules.resampling`), non-zero crop: training
    and prediction alike."""
    subject = tio.ToCanonical()(subject)
    if target_spacing is not None and not np.allclose(subject["image"].spacing, target_spacing, rtol=1e-3):
        subject = resample_subject(subject, target_spacing)
    if crop_nonzero:
        bounds = nonzero_crop(subject["image"].data.numpy())
        if bounds is not None:
            subject = tio.Crop(bounds)(subject)
    return subject


def nonzero_crop(image: np.ndarray) -> tuple[int, ...] | None:
    """TorchIO ``Crop`` bounds ``(w0, w1, h0, h1, d0, d1)`` to the non-zero box, None if empty/full."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return None
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bounds += [int(hits[0]), int(mask.shape[axis] - 1 - hits[-1])]
    return tuple(bounds) if any(bounds) else None


def nonzero_statistics(flat: np.ndarray) -> dict:
    """Mean and sd per channel over the voxels where any channel is non-zero (nnU-Net's mask
    for masked z-scores), from the image ``(C, N)``; the whole image when none is."""
    mask = np.any(flat != 0, axis=0)
    inside = flat[:, mask] if mask.any() else flat
    return {"nonzero_mean": inside.mean(1, dtype=np.float64).tolist(), "nonzero_std": inside.std(1, dtype=np.float64).tolist()}


def dataset_directory(layout: DatasetLayout, cache_dir: str | Path) -> Path:
    """The cache folder of one dataset (all its settings; its fingerprint)."""
    dataset_key = hashlib.sha1(str(layout.root).encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser() / f"{layout.safe_name}-{dataset_key}"


class PreprocessingCache:
    """The cache directory of one dataset under one set of preprocessing settings."""

    def __init__(self, layout: DatasetLayout, cache_dir: str | Path, target_spacing: Sequence[float], crop_nonzero: bool) -> None:
        self.layout = layout
        self.settings = {
            "version": CACHE_VERSION,
            "dataset": str(layout.root),
            "target_spacing_mm": [float(s) for s in target_spacing],
            "crop_nonzero": bool(crop_nonzero),
        }
        settings_key = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.cache_dir = Path(cache_dir).expanduser()
        self.directory = dataset_directory(layout, cache_dir) / settings_key

    def meta_path(self, name: str) -> Path:
        return self.directory / f"{name}.meta.json"  # no case name can make this settings.json

    def array_path(self, name: str, kind: str) -> Path:
        return self.directory / f"{name}.{kind}"

    def is_fresh(self, case: CaseFiles) -> bool:
        """Whether an intact entry built from the current source files exists."""
        meta_path = self.meta_path(case.name)
        try:
            if not meta_path.is_file() or not all(p.is_file() for p in case.files):
                return False
            meta = json.loads(meta_path.read_text())
            return meta.get("fingerprint") == fingerprint(case) and self.intact(case.name, meta)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, zipfile.BadZipFile):
            return False  # a damaged entry is rebuilt

    def intact(self, name: str, meta: dict) -> bool:
        """The entry's arrays have the sizes, shapes and types recorded when they were written."""
        sizes = meta.get("sizes", {})
        raters = int(meta.get("raters", 0))
        for kind in (*ARRAYS, *(RATER_ARRAYS if raters else ())):
            path = self.array_path(name, kind)
            if not path.is_file() or path.stat().st_size != sizes.get(kind):
                return False
        shapes = {"image.npy": (meta["channels"], *meta["shape"]), "label.npy": tuple(meta["shape"]),
                  "raters.npy": (raters, *meta["shape"]), "probabilities.npy": (self.layout.num_classes, *meta["shape"]),
                  "original_label.npy": tuple(meta["original_shape"]), "original_raters.npy": (raters, *meta["original_shape"])}
        for kind, dtype in (("image.npy", "float32"), ("label.npy", "uint8"), ("original_label.npy", "uint8"),
                            *((("raters.npy", "uint8"), ("probabilities.npy", "float32"), ("original_raters.npy", "uint8"))
                              if raters else ())):
            with open(self.array_path(name, kind), "rb") as file:
                version = np.lib.format.read_magic(file)
                if version not in ((1, 0), (2, 0)):
                    return False
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, stored = read_header(file)
            if tuple(shape) != tuple(shapes[kind]) or stored != np.dtype(dtype):
                return False
        with zipfile.ZipFile(self.array_path(name, "sampling.npz")) as archive:  # reads the index only
            return all(info.filename.endswith(".npy") for info in archive.infolist())

    def not_writable(self, error: PermissionError) -> InputError:
        return InputError(
            f"data.cache_dir={self.cache_dir}: {error.filename or self.directory} is not writable by you "
            "(another user's cache?); set data.cache_dir=… or BIASSEG_CACHE_DIR to a folder of yours"
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the settings directory's lock (created if needed; a read-only handle is enough)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = os.fdopen(os.open(self.directory / ".lock", os.O_RDONLY | os.O_CREAT, 0o666))
        except PermissionError as error:
            raise self.not_writable(error) from None
        except OSError as error:  # e.g. a file where a folder should be
            raise InputError(f"data.cache_dir={self.cache_dir}: cannot create {self.directory} ({error.strerror or error})") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info(f"Waiting for another process preprocessing into {self.directory}")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def prepare(self, cases: Sequence[CaseFiles], num_workers: int = 0) -> None:
        """Check and preprocess every case without a fresh entry (checks first, all of them)."""
        stale = [c for c in cases if not self.is_fresh(c)]
        if not stale:
            return
        check_cases(self.layout, stale, num_workers, self.settings["target_spacing_mm"])  # before anything is written
        with self.locked():
            for orphan in self.directory.glob(".*.tmp"):  # left by a killed run: nobody else writes while we hold the lock
                orphan.unlink(missing_ok=True)
            stale = [c for c in stale if not self.is_fresh(c)]  # another process may have built them meanwhile
            if not stale:
                return
            try:
                write_atomically(self.directory / "settings.json", json.dumps(self.settings, indent=2))
            except PermissionError as error:
                raise self.not_writable(error) from None
            progress = dict(total=len(stale), desc=f"Preprocessing {self.layout.name} → {self.directory}", unit="case")
            if num_workers > 0 and len(stale) > 1:
                with ProcessPoolExecutor(min(num_workers, len(stale))) as pool:
                    for _ in tqdm(pool.map(self.build, stale), **progress):
                        pass
            else:
                for case in tqdm(stale, **progress):
                    self.build(case)

    def build(self, case: CaseFiles) -> None:
        """Preprocess one case and write its entry atomically."""
        torch.set_num_threads(1)
        source = fingerprint(case)
        original = load_subject(case)
        annotated = original["raters" if case.raters else "label"]  # the annotation's own grid, kept for measuring
        original_grid = OriginalGrid(annotated.affine, tuple(annotated.shape[1:]))
        original_maps = np.ascontiguousarray(np.rint(annotated.data.numpy()), dtype=np.uint8)  # (1 or R, W, H, D)
        subject = preprocess_subject(original, self.settings["target_spacing_mm"], self.settings["crop_nonzero"])
        image = np.ascontiguousarray(subject["image"].data.numpy(), dtype=np.float32)
        extra: dict = {}
        if case.raters:
            raters = np.ascontiguousarray(np.rint(subject["raters"].data.numpy()), dtype=np.uint8)
            label = majority_vote(raters, self.layout.num_classes).astype(np.uint8)
            probabilities = rater_mean(raters, self.layout.num_classes)
            original_label = majority_vote(original_maps, self.layout.num_classes).astype(np.uint8)
            write_atomically(self.array_path(case.name, "raters.npy"), lambda h: np.save(h, raters))
            write_atomically(self.array_path(case.name, "probabilities.npy"), lambda h: np.save(h, probabilities))
            write_atomically(self.array_path(case.name, "original_raters.npy"), lambda h: np.save(h, original_maps))
            extra = {"raters": len(raters),  # their mean volume as annotated, each voxel its own size
                     "expected_volume_ml": rater_volumes_ml(original_maps, self.layout.num_classes,
                                                            original_grid.voxel_ml).mean(0).tolist()}
        else:
            original_label = original_maps[0]
            label = np.ascontiguousarray(np.rint(subject["label"].data.numpy()[0]), dtype=np.uint8)
        rng = np.random.default_rng(0)
        locations = class_locations(label, self.layout.num_classes, rng, self.layout.regions)
        flat = image.reshape(len(image), -1)
        arrays = {f"class_{c}": v for c, v in locations.items()}
        arrays["foreground_samples"] = foreground_samples(image, label, rng)
        write_atomically(self.array_path(case.name, "image.npy"), lambda h: np.save(h, image))
        write_atomically(self.array_path(case.name, "label.npy"), lambda h: np.save(h, label))
        write_atomically(self.array_path(case.name, "sampling.npz"), lambda h: np.savez(h, **arrays))
        write_atomically(self.array_path(case.name, "original_label.npy"), lambda h: np.save(h, original_label))
        meta = {
            "name": case.name,
            "fingerprint": source,
            "affine": subject["image"].affine.tolist(),
            "shape": list(label.shape),
            "original_affine": np.asarray(original_grid.affine).tolist(),
            "original_shape": list(original_grid.shape),
            "channels": len(image),
            "sizes": {kind: self.array_path(case.name, kind).stat().st_size
                      for kind in (*ARRAYS, *(RATER_ARRAYS if case.raters else ()))},
            "channel_mean": flat.mean(1, dtype=np.float64).tolist(),
            "channel_std": flat.std(1, dtype=np.float64).tolist(),
            **nonzero_statistics(flat),
            **extra,  # several raters: their number and mean volume per foreground class (ml)
        }
        write_atomically(self.meta_path(case.name), json.dumps(meta))

    def load(self, case: CaseFiles) -> Case:
        """The cached case (arrays memory-mapped on use); it must be fresh."""
        if not self.is_fresh(case):  # changed since prepare() (an edited source, another run): build it again
            self.prepare([case])
        meta = json.loads(self.meta_path(case.name).read_text())
        with np.load(self.array_path(case.name, "sampling.npz")) as sampling:
            locations = {int(k.split("_")[1]): sampling[k] for k in sampling.files if k.startswith("class_")}
            samples = sampling["foreground_samples"]
        return Case(
            name=case.name,
            image=self.array_path(case.name, "image.npy"),
            label=self.array_path(case.name, "label.npy"),
            affine=np.asarray(meta["affine"]),
            locations=locations,
            channel_mean=np.asarray(meta["channel_mean"]),
            channel_std=np.asarray(meta["channel_std"]),
            nonzero_mean=np.asarray(meta["nonzero_mean"]),
            nonzero_std=np.asarray(meta["nonzero_std"]),
            foreground_samples=samples,
            original_grid=OriginalGrid(np.asarray(meta["original_affine"], dtype=np.float64), tuple(meta["original_shape"])),
            original_label=self.array_path(case.name, "original_label.npy"),
            **({"raters": self.array_path(case.name, "raters.npy"), "probabilities": self.array_path(case.name, "probabilities.npy"),
                "original_raters": self.array_path(case.name, "original_raters.npy"),
                "expected_volume_ml": [float(v) for v in meta["expected_volume_ml"]]} if meta.get("raters") else {}),
        )
