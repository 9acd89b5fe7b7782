"""Check a dataset's files before anything is preprocessed or trained.

Every problem of every case is collected (not just the first) and reported at once as a
:class:`DatasetError`, each line naming the file and what is wrong with it. Files are only
read, never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from datamodules.image_files import AFFINE_TOLERANCE, UnreadableImage, read_image, resampled_size_problem
from input_errors import DatasetError

if TYPE_CHECKING:
    from datamodules.dataset_layout import CaseFiles, DatasetLayout

__all__ = ["DatasetError", "check_case", "check_cases"]


def access_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened for reading (missing, permission), or None."""
    try:
        if not path.is_file():
            return f"{path}: missing file"
        with open(path, "rb"):
            return None
    except PermissionError:
        return f"{path}: not readable by you (permission denied)"
    except OSError as error:
        return f"{path}: cannot be opened ({error.strerror or error})"


def check_case(
    case: CaseFiles, in_channels: int, num_classes: int, channels_in_one_file: bool, target_spacing=None
) -> list[str]:
    """All problems of one case (an empty list when it is usable); with ``target_spacing``
    (mm) also whether its resampled arrays fit in memory."""
    problems = [p for p in map(access_problem, case.files) if p]
    if problems:
        return problems
    images = []
    for path in case.images:
        try:
            data, affine = read_image(path)
        except UnreadableImage as error:
            problems.append(f"{path}: {error}")
            continue
        expected = in_channels if channels_in_one_file else 1
        if data.shape[0] != expected:
            problems.append(f"{path}: {data.shape[0]} channel(s), dataset.json declares {expected}")
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(f"{path}: {bad} NaN/inf voxel value(s)")
        problem = resampled_size_problem(data.shape, affine, target_spacing, arrays=3)
        if problem:
            problems.append(f"{path}: {problem}")
        images.append((path, data.shape[1:], affine))
    try:
        label, label_affine = read_image(case.label)
    except UnreadableImage as error:
        return problems + [f"{case.label}: {error}"]
    if label.shape[0] != 1:
        problems.append(f"{case.label}: label maps must have one channel, found {label.shape[0]}")
    if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
        problems.append(f"{case.label}: label values must be integers")
    else:
        undeclared = sorted(set(np.unique(label).astype(int).tolist()) - set(range(num_classes)))
        if undeclared:
            problems.append(f"{case.label}: label value(s) {undeclared} not declared in dataset.json (0 … {num_classes - 1})")
    for path, shape, affine in images:
        if tuple(shape) != tuple(label.shape[1:]):
            problems.append(f"{path}: shape {tuple(shape)} differs from the label {case.label}: {tuple(label.shape[1:])}")
        elif not np.allclose(affine, label_affine, atol=AFFINE_TOLERANCE):
            problems.append(
                f"{path}: affine differs from the label {case.label}'s by up to "
                f"{np.abs(affine - label_affine).max():.4g} (tolerance {AFFINE_TOLERANCE})"
            )
    return problems


def check_cases(layout: DatasetLayout, cases: Sequence[CaseFiles], num_workers: int = 0, target_spacing=None) -> None:
    """Check ``cases`` of ``layout`` (to be resampled to ``target_spacing`` mm); raise
    :class:`DatasetError` listing every problem."""
    if not cases:
        return
    args = [(c, layout.in_channels, layout.num_classes, layout.channels_in_one_file, target_spacing) for c in cases]
    progress = dict(total=len(cases), desc=f"Checking {layout.name}", unit="case", leave=False)
    if num_workers > 0 and len(cases) > 1:
        with ProcessPoolExecutor(min(num_workers, len(cases))) as pool:
            results = list(tqdm(pool.map(check_case, *zip(*args)), **progress))
    else:
        results = [check_case(*a) for a in tqdm(args, **progress)]
    problems = [p for result in results for p in result]
    if problems:
        raise DatasetError(problems)
