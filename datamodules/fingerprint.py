"""A dataset's fingerprint (nnU-Net's ``DatasetFingerprintExtractor``, the part a plan needs).

Per case, read as untrusted input (:func:`datamodules.image_files.read_image`): its voxel
spacing and its size after the non-zero crop, both in RAS+ axis order (the order the
preprocessing reorients to), and the share of its voxels the crop keeps. Kept beside the
dataset's preprocessing cache in ``fingerprint.json`` and reused while each case's files keep
their size and modification time; a case that cannot be read is left out here (the input
checks name it before anything is trained).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from biasseg.run_files import write_atomically
from datamodules.dataset_layout import CaseFiles, DatasetLayout
from datamodules.image_files import UnreadableImage, read_image
from datamodules.plan import Fingerprint
from datamodules.preprocessing_cache import fingerprint as file_fingerprint
from datamodules.preprocessing_cache import nonzero_crop

log = logging.getLogger(__name__)


def case_fingerprint(case: CaseFiles) -> dict | None:
    """``{"spacing", "size_after_crop", "relative_size"}`` of one case (RAS+ axis order), or None
    when a file cannot be read."""
    try:
        channels = [read_image(path) for path in case.images]
    except (UnreadableImage, OSError):
        return None
    data = np.concatenate([d for d, _ in channels])
    affine = channels[0][1]
    ras_axis = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # voxel axis v lies along RAS axis ras_axis[v]
    spacing = np.round(np.linalg.norm(affine[:3, :3], axis=0), 6)  # a float32 header's 1.2 is 1.2000000477
    shape = np.asarray(data.shape[1:])
    bounds = nonzero_crop(data)  # the preprocessing's own crop (None: nothing to crop)
    size = shape if bounds is None else shape - np.asarray(bounds).reshape(3, 2).sum(1)
    ras_spacing, ras_size = np.empty(3), np.empty(3)
    ras_spacing[ras_axis], ras_size[ras_axis] = spacing, size
    return {"spacing": ras_spacing.tolist(), "size_after_crop": ras_size.tolist(),
            "relative_size": float(np.prod(size) / np.prod(shape))}


def dataset_fingerprint(layout: DatasetLayout, directory: Path, num_workers: int = 0) -> tuple[Fingerprint, Callable[[], None]]:
    """The fingerprint of ``layout``'s cases, read from ``directory / "fingerprint.json"`` where
    it is fresh, and a function that keeps it there (call it once the input checks have passed:
    nothing is written for a dataset that is refused)."""
    path = directory / "fingerprint.json"
    try:
        stored = json.loads(path.read_text())
        stored = stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        stored = {}
    cases = {case.name: case for case in layout.cases}
    files = {name: file_fingerprint(case) for name, case in cases.items() if all(p.is_file() for p in case.files)}
    entries = {name: stored[name] for name in files if isinstance(stored.get(name), dict) and stored[name].get("files") == files[name]}
    stale = [cases[name] for name in files if name not in entries]
    if stale:
        progress = dict(total=len(stale), desc=f"Fingerprinting {layout.name}", unit="case", leave=False)
        if num_workers > 0 and len(stale) > 1:
            with ProcessPoolExecutor(min(num_workers, len(stale))) as pool:
                found = list(tqdm(pool.map(case_fingerprint, stale), **progress))
        else:
            found = [case_fingerprint(case) for case in tqdm(stale, **progress)]
        entries.update({case.name: {**result, "files": files[case.name]} for case, result in zip(stale, found) if result})

    def keep() -> None:
        if not stale:
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(entries))
        except OSError as error:  # a read-only cache: plan anyway, fingerprint again next time
            log.warning(f"could not keep the fingerprint in {path} ({error})")

    usable = [entries[name] for name in files if name in entries]
    return fingerprint_of([e["spacing"] for e in usable], [e["size_after_crop"] for e in usable],
                          [e["relative_size"] for e in usable], layout.channel_names), keep


def fingerprint_of(spacings: Sequence, sizes: Sequence, relative_sizes: Sequence[float], channel_names: Sequence[str]) -> Fingerprint:
    """A :class:`~datamodules.plan.Fingerprint` from per-case values (one unit spacing when there is none)."""
    if not spacings:
        spacings, sizes, relative_sizes = [[1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0]], [1.0]
    return Fingerprint(np.asarray(spacings, dtype=np.float64), np.asarray(sizes, dtype=np.float64),
                       float(np.median(relative_sizes)), tuple(channel_names))
