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

from biasseg.errors import DatasetError
from datamodules.image_files import AFFINE_TOLERANCE, UnreadableImage, read_image, resampled_size_problem

if TYPE_CHECKING:
    from datamodules.dataset_layout import CaseFiles, DatasetLayout

__all__ = ["DatasetError", "check_case", "check_cases", "image_problems"]


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


def image_problems(paths: Sequence[Path], in_channels: int, expected_by: str, target_spacing=None,
                   arrays: int | None = None) -> tuple[list[str], list[tuple[Path, tuple, np.ndarray]]]:
    """The problems of one case's image files — all channels in one file, or one file per
    channel — read safely (the header's declared size first, see :mod:`datamodules.image_files`):
    the channel count (``in_channels``, as ``expected_by`` says), finite values (TorchIO's ITK
    reader would turn NaN into 0), one grid across the channel files, and with ``target_spacing``
    (mm) whether ``arrays`` arrays of the resampled grid fit in memory (default 3 per channel:
    preprocessing's copies). Also ``(path, spatial shape, affine)`` of each file that reads (the
    training check compares them with the label's)."""
    problems = [p for p in map(access_problem, paths) if p]
    if problems:
        return problems, []
    images = []
    for path, data, affine in _readable(paths, problems):
        expected = in_channels if len(paths) == 1 else 1
        if data.shape[0] != expected:
            problems.append(f"{path}: {data.shape[0]} channel(s), {expected_by} {expected}")
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(f"{path}: {bad} NaN/inf voxel value(s)")
        images.append((path, data.shape[1:], affine))
    if len(paths) > 1 and len(paths) != in_channels:
        problems.append(f"{paths[0]}: {len(paths)} channel file(s), {expected_by} {in_channels}")
    for path, shape, affine in images[1:]:
        problems += geometry_problems(path, shape, affine, images[0], "channel file")
    if images and not problems:
        problem = resampled_size_problem((1, *images[0][1]), images[0][2], target_spacing, arrays=arrays or 3 * in_channels)
        if problem:
            problems.append(f"{images[0][0]}: {problem}")
    return problems, images


def check_case(
    case: CaseFiles, in_channels: int, label_values: Sequence[int], target_spacing=None
) -> list[str]:
    """All problems of one case (an empty list when it is usable); with ``target_spacing``
    (mm) also whether its resampled arrays fit in memory."""
    problems = [p for p in map(access_problem, case.files) if p]
    if problems:
        return problems
    problems, images = image_problems(case.images, in_channels, "dataset.json declares", target_spacing)
    reference = None  # the first label's (path, shape, affine): images and the other raters must match it
    for path, label, label_affine in _readable(case.labels, problems):
        problems += label_problems(path, label, label_values)
        if reference is None:
            reference = (path, label.shape[1:], label_affine)
        else:
            problems += geometry_problems(path, label.shape[1:], label_affine, reference, "rater 1's label")
    if reference is not None:
        for path, shape, affine in images:
            problems += geometry_problems(path, shape, affine, reference, "the label")
    return problems


def _readable(paths, problems: list[str]):
    """``(path, data, affine)`` of each file that reads; an unreadable one adds its problem to ``problems``."""
    for path in paths:
        try:
            data, affine = read_image(path)
        except UnreadableImage as error:
            problems.append(f"{path}: {error}")
            continue
        yield path, data, affine


def label_problems(path: Path, label: np.ndarray, label_values: Sequence[int]) -> list[str]:
    """What is wrong with a label map ``(1, W, H, D)`` read from ``path``, whose values must be
    among ``label_values`` (those ``dataset.json`` declares)."""
    if label.shape[0] != 1:
        return [f"{path}: label maps must have one channel, found {label.shape[0]}"]
    if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
        return [f"{path}: label values must be integers"]
    undeclared = sorted(set(np.unique(label).astype(int).tolist()) - set(label_values))
    if undeclared:
        return [f"{path}: label value(s) {undeclared} not declared in dataset.json ({_values(label_values)})"]
    return []


def _values(values: Sequence[int]) -> str:
    """``0 … 3`` for a range, else the list."""
    values = sorted(values)
    return f"{values[0]} … {values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)


def geometry_problems(path: Path, shape, affine: np.ndarray, reference: tuple, what: str) -> list[str]:
    """``path``'s grid against ``reference`` = (its path, shape, affine), called ``what``."""
    reference_path, reference_shape, reference_affine = reference
    if tuple(shape) != tuple(reference_shape):
        return [f"{path}: shape {tuple(shape)} differs from {what} {reference_path}: {tuple(reference_shape)}"]
    if not np.allclose(affine, reference_affine, atol=AFFINE_TOLERANCE):
        return [f"{path}: affine differs from {what} {reference_path}'s by up to "
                f"{np.abs(affine - reference_affine).max():.4g} (tolerance {AFFINE_TOLERANCE})"]
    return []


def check_cases(layout: DatasetLayout, cases: Sequence[CaseFiles], num_workers: int = 0, target_spacing=None) -> None:
    """Check ``cases`` of ``layout`` (to be resampled to ``target_spacing`` mm); raise
    :class:`DatasetError` listing every problem."""
    if not cases:
        return
    args = [(c, layout.in_channels, layout.label_values, target_spacing) for c in cases]
    progress = dict(total=len(cases), desc=f"Checking {layout.name}", unit="case", leave=False)
    if num_workers > 0 and len(cases) > 1:
        with ProcessPoolExecutor(min(num_workers, len(cases))) as pool:
            results = list(tqdm(pool.map(check_case, *zip(*args)), **progress))
    else:
        results = [check_case(*a) for a in tqdm(args, **progress)]
    problems = [p for result in results for p in result]
    if problems:
        raise DatasetError(problems)
