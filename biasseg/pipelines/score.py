"""Score the predictions of any tool (nnU-Net, MONAI, …) for Dice and volume bias.

    python score.py predictions=nnunet_out/ labels=Dataset001/labelsTs/
    python score.py predictions=masks/ labels=labels/ expected=probability_maps/

Every ``<case>.nii.gz`` label in ``labels`` is matched with the prediction of the same case,
the first found of: nnU-Net's probability file ``<case>.npz`` (``nnUNetv2_predict
--save_probabilities``: the array ``probabilities``, classes first, in SimpleITK's axis order);
biasseg's ``<case>_probabilities.nii.gz`` (``predict.py save_probabilities=true``: one channel
per class, on the label's grid); a label map ``<case>.nii.gz`` / ``.nii`` (hard masks, taken
as probabilities 0 and 1). Soft volumes and calibration are meaningful only from the first two. The
scores are training's validation measures, from the same code: per subject Dice, reference,
argmax, soft and near-structure soft volume (ml, from the label's spacing), calibration and
the post-hoc remedies, and lesion by lesion (``lesions=…``, :mod:`biasseg.metrics.lesions`); written
as ``metrics.json``, ``subjects.csv``, ``lesions.csv``, ``calibration.csv`` and ``figures/`` into ``logs/score/runs/<timestamp>/``. Class names come from the ``dataset.json``
beside ``labels`` (nnU-Net or Decathlon) where there is one; a broken one is refused, naming it.
Where it declares nnU-Net region labels (``labels`` with lists, ``regions_class_order``), every
case is scored per region, as training scores a region model: soft maps hold one independent
probability per region (nnU-Net's sigmoid ``.npz``, predict.py's region channels), a label map's
region is the voxels whose value it covers (nnU-Net's export).

Where ``predictions`` holds predict.py's ``volumes.csv`` with intervals, they are scored too:
``interval_coverage`` (the share of cases whose label volume lies in ``[volume_low_ml,
volume_high_ml]``), ``interval_width_ml``, ``interval_relative_width`` and the quoted
volume's bias (``quote_…``, from ``volume_ml``), per class in the file's order.

Everything is read as untrusted input: labels and NIfTI predictions through the input
checks (size, geometry, values), ``.npz`` files without unpickling and with the declared
array shape checked against the label before anything is loaded; nnU-Net's ``.pkl`` files
are never opened.
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig

from biasseg.callbacks.validation_figures import reliability_figure, volumes_figure
from biasseg.cli import CONFIGS, check_command_line
from biasseg.errors import DatasetError, InputError, exit_on_input_error
from biasseg.metrics import SubjectSegmentationMetrics, per_subject, summarize
from biasseg.metrics.lesion_metrics import LesionMetrics, lesion_epoch_summary, lesion_table
from biasseg.metrics.lesions import lesion_settings
from biasseg.metrics.region_metrics import RegionMetrics, per_region_subject, region_masks
from biasseg.run_files import write_results
from datamodules.dataset_layout import LabelScheme, case_name, read_label_scheme
from datamodules.image_files import AFFINE_TOLERANCE, NIFTI_ENDINGS, UnreadableImage, read_image


def label_scheme(labels: Path) -> LabelScheme | None:
    """The classes or regions the ``dataset.json`` beside ``labels`` declares (read strictly:
    a broken one is refused, naming it), or None where there is none."""
    description = labels.parent / "dataset.json"
    return read_label_scheme(description) if description.is_file() else None


def npz_shape(path: Path) -> tuple[int, ...]:
    """The declared shape of ``probabilities`` in an ``.npz``, read from its header only."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("probabilities.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise UnreadableImage(f"not an nnU-Net probability file (an .npz holding 'probabilities': {error})") from None
    if dtype.kind != "f":
        raise UnreadableImage(f"'probabilities' are {dtype}, not floating point")
    return tuple(int(s) for s in shape)


def check_unit_range(probabilities: np.ndarray, what: str) -> None:
    """Refuse NaN and values outside [0, 1] (with float rounding)."""
    if not np.isfinite(probabilities).all() or probabilities.min() < -1e-4 or probabilities.max() > 1 + 1e-4:
        raise UnreadableImage(f"{what} hold values outside [0, 1] (or NaN)")


def check_label_grid(shape: tuple[int, ...], affine: np.ndarray, label_shape: tuple[int, ...], label_affine: np.ndarray) -> None:
    """Refuse a prediction whose voxel grid is not the label's."""
    if tuple(shape) != tuple(label_shape) or not np.allclose(affine, label_affine, atol=AFFINE_TOLERANCE):
        raise UnreadableImage(f"its grid {tuple(shape)} or affine differs from the label's {tuple(label_shape)}")


def probabilities_from_npz(path: Path, label_shape: tuple[int, int, int]) -> np.ndarray:
    """``(C, W, H, D)`` class probabilities on the label's voxel grid."""
    shape = npz_shape(path)
    if len(shape) != 4 or shape[1:] != tuple(reversed(label_shape)):
        raise UnreadableImage(f"'probabilities' have the shape {shape}; the label needs (classes, {', '.join(map(str, reversed(label_shape)))})")
    with np.load(path, allow_pickle=False) as stored:
        probabilities = np.asarray(stored["probabilities"], dtype=np.float32)
    check_unit_range(probabilities, "'probabilities'")
    return np.ascontiguousarray(probabilities.transpose(0, 3, 2, 1))  # SimpleITK (z, y, x) → the label's (x, y, z)


PROBABILITY_ENDING = "_probabilities.nii.gz"  # predict.py's soft maps


def probabilities_from_nifti(path: Path, label_shape: tuple[int, int, int], label_affine: np.ndarray,
                             exclusive: bool = True) -> np.ndarray:
    """``(C, W, H, D)`` probabilities from a 4D NIfTI file (channels last: predict.py's
    ``<case>_probabilities.nii.gz``) on the label's grid: exclusive classes (background first,
    summing to 1), or with ``exclusive=False`` one independent probability per region."""
    data, affine = read_image(path)
    check_label_grid(data.shape[1:], affine, label_shape, label_affine)
    if exclusive and data.shape[0] < 2:
        raise UnreadableImage("a probability map needs one channel per class (background first), found one")
    probabilities = np.asarray(data, dtype=np.float32)
    check_unit_range(probabilities, "probabilities")
    if exclusive and np.abs(probabilities.sum(0) - 1).max() > 1e-3:
        raise UnreadableImage("the class probabilities do not sum to 1 in every voxel")
    return np.ascontiguousarray(probabilities)


def one_hot(segmentation: np.ndarray, num_classes: int) -> np.ndarray:
    return (segmentation[None] == np.arange(num_classes).reshape(-1, 1, 1, 1)).astype(np.float32)


def label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(integer map (W, H, D), affine)`` of a label or predicted segmentation file."""
    data, affine = read_image(path)
    if data.shape[0] != 1 or not np.array_equal(data, np.round(data)) or data.min() < 0:
        raise UnreadableImage("a label map needs one channel of non-negative integers")
    return data[0].astype(np.int64), affine


def score_case(prediction: Path, label_path: Path, num_classes: int | None,
               regions: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(probabilities (C, W, H, D), label (W, H, D), affine)`` of one case (with ``regions``:
    ``(R, W, H, D)``, each region's probability; a label map's regions are the voxels whose value
    the region covers, as nnU-Net exports them); an :class:`UnreadableImage` whose message starts
    with the file it is about."""
    def named(path: Path, read):
        try:
            return read()
        except UnreadableImage as error:
            raise UnreadableImage(f"{path}: {error}") from None

    label, affine = named(label_path, lambda: label_map(label_path))
    if prediction.name.endswith(".npz"):
        return named(prediction, lambda: probabilities_from_npz(prediction, label.shape)), label, affine
    if prediction.name.endswith(PROBABILITY_ENDING):
        read = lambda: probabilities_from_nifti(prediction, label.shape, affine, exclusive=regions is None)  # noqa: E731
        return named(prediction, read), label, affine
    segmentation, predicted_affine = named(prediction, lambda: label_map(prediction))
    named(prediction, lambda: check_label_grid(segmentation.shape, predicted_affine, label.shape, affine))
    if regions is not None:
        return region_masks(torch.from_numpy(segmentation), regions).float().numpy(), label, affine
    classes = num_classes or int(max(segmentation.max(), label.max())) + 1
    return one_hot(segmentation, max(classes, 2)), label, affine


def find_predictions(predictions: Path, labels: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """``{case: (prediction, label)}`` (``.npz`` preferred), and a problem per label without
    its prediction."""
    if not labels.is_dir() or not predictions.is_dir():
        raise InputError(f"labels={labels} and predictions={predictions} must be folders")
    label_files = sorted(p for p in labels.iterdir() if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))
    if not label_files:
        raise DatasetError([f"{labels}: no .nii/.nii.gz label files"])
    pairs, problems = {}, []
    for label in label_files:
        name = case_name(label)
        candidates = [predictions / f"{name}{ending}" for ending in (".npz", PROBABILITY_ENDING, *NIFTI_ENDINGS)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            problems.append(f"{predictions}: no prediction for case {name} ({name}.npz, {name}{PROBABILITY_ENDING} or {name}.nii.gz)")
        else:
            pairs[name] = (found, label)
    return pairs, problems


def score(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.predictions`` against ``cfg.labels``; returns the summary (``val/…`` keys)."""
    for key in ("predictions", "labels"):
        if not cfg.get(key):
            raise InputError(f"score.py needs {key}=DIR")
    predictions, labels = Path(cfg.predictions).expanduser().resolve(), Path(cfg.labels).expanduser().resolve()
    pairs, problems = find_predictions(predictions, labels)
    output = Path(cfg.paths.output_dir)
    scheme = label_scheme(labels)
    regions = scheme.regions if scheme is not None else None
    num_classes = cfg.get("num_classes") or (len(scheme.class_names) if scheme is not None else None)
    channels = None if num_classes is None else num_classes - (regions is not None)  # regions have no background channel
    what = "regions" if regions is not None else "classes"
    metric, cases = None, []
    settings = lesion_settings(cfg.get("lesions"),
                               float(cfg.soft_volume_margin_mm))
    lesions = None if settings is None else LesionMetrics(settings, regions)
    for index, (name, (prediction, label_path)) in enumerate(pairs.items()):
        try:
            probabilities, label, affine = score_case(prediction, label_path, num_classes, regions)
        except UnreadableImage as error:
            problems.append(str(error))
            continue
        channels = channels or probabilities.shape[0]
        if probabilities.shape[0] != channels:
            problems.append(f"{prediction}: {probabilities.shape[0]} {what}, {channels} expected "
                            f"({'dataset.json declares them' if scheme is not None else 'as the others; set num_classes=…'})")
            continue
        if metric is None:
            margin = float(cfg.soft_volume_margin_mm)
            metric = RegionMetrics(regions, margin) if regions is not None else SubjectSegmentationMetrics(channels, margin)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        metric.update(torch.from_numpy(probabilities), torch.from_numpy(label), spacing, index)
        if lesions is not None:
            lesions.update(torch.from_numpy(probabilities), torch.from_numpy(label), spacing, index)
        cases.append(name)
    if problems:
        raise DatasetError(problems)
    foreground = channels if regions is not None else channels - 1
    names = list(scheme.class_names[1:]) if scheme is not None else [f"class{c}" for c in range(1, foreground + 1)]
    rows, fitted = per_region_subject(metric) if regions is not None else per_subject(metric)
    quoted = quoted_volumes(predictions / "volumes.csv", cases, foreground)
    if quoted is not None:  # predict.py's volumes to quote and their intervals
        rows.update(quoted)
    summary = summarize(rows, names, fitted)
    lesion_rows = None
    if lesions is not None:
        table = lesions.compute()
        summary.update(lesion_epoch_summary(table, settings, list(range(len(cases)))))
        lesion_rows = lesion_table(table, cases, names, settings)
    metrics = {"num_subjects": len(cases), "predictions": str(predictions), "labels": str(labels),
               **{f"val/{k}": v for k, v in summary.items()}}
    write_results(output, metrics, rows, cases, names, fitted["reliability"], lesion_rows)
    (output / "figures").mkdir(exist_ok=True)
    for figure_name, figure in (("volumes", volumes_figure(rows)), ("reliability", reliability_figure(fitted["reliability"].numpy(), names))):
        figure.savefig(output / "figures" / f"{figure_name}.png", dpi=80)
        plt.close(figure)
    print(f"scored {len(cases)} case(s) into {output}: metrics.json, subjects.csv, {'lesions.csv, ' if lesions is not None else ''}calibration.csv, figures/")
    return {f"val/{k}": v for k, v in summary.items()}


QUOTED = {"volume_quote_ml": "volume_ml", "volume_low_ml": "volume_low_ml", "volume_high_ml": "volume_high_ml"}


def quoted_volumes(path: Path, cases: list[str], classes: int) -> dict[str, torch.Tensor] | None:
    """predict.py's quoted volumes and intervals ``(S, K)`` for ``cases`` from its ``volumes.csv``
    (classes in the file's order), or None where there is no such file or it has no intervals;
    a :class:`DatasetError` naming the file for a case or value it lacks."""
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as handle:
            table = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError([f"{path}: not a readable volumes table ({type(error).__name__})"]) from None
    if not table or not set(QUOTED.values()) <= set(table[0]) or not all(r.get("volume_low_ml") for r in table):
        return None  # a table without intervals (no stored calibration): nothing to score
    per_case: dict[str, list[dict]] = {}
    for row in table:
        per_case.setdefault(str(row.get("case")), []).append(row)
    problems = [f"{path}: case {name!r} has {len(per_case.get(name, []))} rows, {classes} expected (one per class)"
                for name in cases if len(per_case.get(name, [])) != classes]
    values = {key: torch.full((len(cases), classes), math.nan, dtype=torch.float64) for key in QUOTED}
    for i, name in enumerate(cases):
        for k, row in enumerate(per_case.get(name, [])[:classes]):
            for key, column in QUOTED.items():
                try:
                    values[key][i, k] = float(row[column])
                except (TypeError, ValueError):
                    problems.append(f"{path}: case {name!r}, {column} {row.get(column)!r} is not a number")
    if problems:
        raise DatasetError(problems)
    return values


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="score")
def main(cfg: DictConfig) -> None:
    exit_on_input_error(lambda: score(cfg))


def cli() -> None:
    """``python score.py …`` and the console script ``biasseg-score``: misspelt keys and ``--help`` first, then Hydra."""
    check_command_line("score")
    main()
