"""Lesion-wise measures: connected components found, matched, counted and measured one by one.

For one subject and one foreground class, on the model's hard mask ``P``, the reference ``R``
and the class's soft map ``p`` (all ``(W, H, D)``, same grid, ``spacing_mm`` in mm):

* **Components**: ``scipy.ndimage.label`` with a 6-, 18- or 26-voxel neighbourhood
  (``connectivity``). scipy rather than ``connected-components-3d``: it is already a dependency
  (through TorchIO), labels the same components for the same neighbourhood, and the labelling is
  a small share of the per-lesion work on validation grids (``benchmarks/lesions.py``).
* **Reference lesions** (BraTS 2023's lesion-wise rule): reference components whose
  ``dilation_voxels``-fold dilations touch are one lesion (one tumour seen in pieces is one
  lesion; dilated with the 18-neighbourhood, as BraTS does). Components, reference and predicted, smaller than ``min_volume_ml`` are ignored
  (BraTS 2023 uses 50 voxels of 1 mm³ for gliomas: 0.05 ml).
* **Matching**, ``match``:

  - ``overlap`` (BraTS 2023): every predicted component that touches the reference lesion
    dilated by ``dilation_voxels`` belongs to it; the lesion's Dice is between the lesion and
    the union of those components (whole components). A reference lesion with none is missed
    (Dice 0); a predicted component that touches no dilated reference lesion is a false
    positive (Dice 0). A component touching n lesions belongs to each (all of its volume) and
    counts 1/n in each one's ``components``: a split lesion shows 2, a merged pair 0.5 and 0.5.
  - ``iou`` (Metrics Reloaded / panoptica's naive threshold matching): a predicted component and
    a reference lesion are a pair when their IoU is at least ``iou_threshold`` (panoptica's
    ``>=``), best IoU first, one-to-one; no merging by dilation.

* **Volumes per lesion** (ml): the reference volume, the hard volume (its matched components),
  the soft volume ``Σ p × voxel volume`` over the lesion's *region* — the voxels nearer to the
  lesion (its reference and matched components) than to any other lesion or false positive,
  within ``margin_mm`` of it — and, where the label distribution ``q`` is known (generated
  data), the expected volume ``Σ q × voxel volume`` over the same region. A false positive has
  a hard and soft volume and no reference.

Per subject (:func:`lesion_summary`): lesion-wise sensitivity (detected / reference lesions),
false positives, lesion F1 ``2 TP / (2 TP + FN + FP)`` (ISLES'22), the absolute lesion-count
difference ``|#predicted − #reference|`` (ISLES'22: predicted components against reference
lesions, after the size threshold) and BraTS 2023's lesion-wise Dice ``Σ Dice / (#reference + #false positives)``.
Size bins (``size_bins_ml``, edges in ml) group lesions by their reference volume (false
positives by their hard volume).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from biasseg.errors import InputError

CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}  # neighbourhood size → ndimage.generate_binary_structure's rank
# BraTS 2023 dilates the reference with the 18-neighbourhood whatever the components' connectivity
DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)
MATCH_RULES = ("overlap", "iou")
# one row per reference lesion and per false positive; numeric, so DDP can gather them as a tensor
LESION_COLUMNS = ("class", "lesion", "reference", "detected", "components", "dice", "volume_ref_ml", "volume_pred_ml",
                  "volume_pred_soft_ml", "volume_expected_ml", "size_bin", "centre_x", "centre_y", "centre_z")


@dataclass(frozen=True)
class LesionSettings:
    """How lesions are found and matched (see the module docstring); volumes in ml, margin in mm."""

    connectivity: int = 26
    dilation_voxels: int = 3
    min_volume_ml: float = 0.0
    match: str = "overlap"
    iou_threshold: float = 0.5
    size_bins_ml: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if self.connectivity not in CONNECTIVITY_RANK:
            raise InputError(f"lesions.connectivity must be 6, 18 or 26, got {self.connectivity}")
        if self.match not in MATCH_RULES:
            raise InputError(f"lesions.match must be one of {', '.join(MATCH_RULES)}, got {self.match!r}")
        if self.dilation_voxels < 0 or self.min_volume_ml < 0 or self.margin_mm < 0:
            raise InputError("lesions.dilation_voxels, lesions.min_volume_ml and lesions.margin_mm must be >= 0")
        if not 0 < self.iou_threshold <= 1:
            raise InputError(f"lesions.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        edges = [float(e) for e in self.size_bins_ml]
        if any(b <= a for a, b in zip(edges, edges[1:])) or any(e <= 0 for e in edges):
            raise InputError(f"lesions.size_bins_ml must be increasing positive edges in ml, got {list(self.size_bins_ml)}")
        object.__setattr__(self, "size_bins_ml", tuple(edges))

    @property
    def structure(self) -> np.ndarray:
        return ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[self.connectivity])

    def bin_names(self) -> list[str]:
        """``0-a``, ``a-b``, …, ``z+`` for the size bins, in ml."""
        edges = ["0", *(f"{e:g}" for e in self.size_bins_ml)]
        return [*(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f"{edges[-1]}+"]

    def size_bin(self, volume_ml: float) -> int:
        return int(np.searchsorted(self.size_bins_ml, volume_ml, side="right"))


def lesion_settings(config: Mapping | None, margin_mm: float) -> LesionSettings | None:
    """The checked ``lesions`` config (configs/lesions/; a DictConfig or plain mapping), or None
    where it is absent or ``enabled: false``; the regions' margin is the near-structure margin
    (``margin_mm``)."""
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config or {})
    if not config.pop("enabled", bool(config)):
        return None
    known = {f.name for f in fields(LesionSettings)} - {"margin_mm"}
    unknown = set(config) - known
    if unknown:
        raise InputError(f"lesions: unknown keys {sorted(unknown)}; it takes enabled, {', '.join(sorted(known))}")
    if "size_bins_ml" in config:
        config["size_bins_ml"] = tuple(config["size_bins_ml"] or ())
    return LesionSettings(**config, margin_mm=float(margin_mm))


def components(mask: np.ndarray, settings: LesionSettings, voxel_ml: float) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` at least ``min_volume_ml`` large: labels ``1..n`` (int32)."""
    labels, count = ndimage.label(mask, structure=settings.structure)
    if count and settings.min_volume_ml > 0:
        keep = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml >= settings.min_volume_ml
        lookup = np.zeros(count + 1, dtype=np.int32)
        lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels, count = lookup[labels], int(keep.sum())
    return labels.astype(np.int32, copy=False), count


def reference_lesions(reference: np.ndarray, settings: LesionSettings, voxel_ml: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(lesions, zones, n)``: reference lesions (components merged where their dilations touch)
    labelled ``1..n``, and each lesion's dilated zone labelled alike (the lesion itself when
    ``dilation_voxels`` is 0)."""
    lesions, count = components(reference, settings, voxel_ml)
    if not count or settings.dilation_voxels == 0:
        return lesions, lesions, count
    dilated = ndimage.binary_dilation(lesions > 0, structure=DILATION_STRUCTURE, iterations=settings.dilation_voxels)
    zones, merged = ndimage.label(dilated, structure=settings.structure)
    # each lesion takes its zone's label; zones are numbered in scan order of their first voxel,
    # as the lesions are, so the numbering stays that of the components where nothing merges
    lesions = np.where(lesions > 0, zones, 0).astype(np.int32)
    return lesions, zones.astype(np.int32), merged


def _intersections(lesions: np.ndarray, predicted: np.ndarray, n_ref: int, n_pred: int) -> np.ndarray:
    """``(n_ref + 1, n_pred + 1)`` voxel counts shared by each reference lesion and predicted component."""
    both = (lesions > 0) & (predicted > 0)
    pairs = lesions[both].astype(np.int64) * (n_pred + 1) + predicted[both]
    return np.bincount(pairs, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)


def _pairs(zones: np.ndarray, predicted: np.ndarray, intersections: np.ndarray, sizes: tuple[np.ndarray, np.ndarray],
           settings: LesionSettings) -> list[set[int]]:
    """For each reference lesion (index k − 1), the predicted components matched to it."""
    n_ref, n_pred = intersections.shape[0] - 1, intersections.shape[1] - 1
    matched: list[set[int]] = [set() for _ in range(n_ref)]
    if not n_ref or not n_pred:
        return matched
    if settings.match == "overlap":
        touching = (zones > 0) & (predicted > 0)
        for code in np.unique(zones[touching].astype(np.int64) * (n_pred + 1) + predicted[touching]):
            matched[int(code) // (n_pred + 1) - 1].add(int(code) % (n_pred + 1))
        return matched
    union = sizes[0][:, None] + sizes[1][None, :] - intersections
    iou = np.where(union > 0, intersections / np.maximum(union, 1), 0.0)[1:, 1:]
    taken: set[int] = set()
    for k, j in sorted(zip(*np.nonzero(iou >= settings.iou_threshold)), key=lambda kj: -iou[kj]):
        if not matched[k] and j + 1 not in taken:  # one-to-one, best IoU first
            matched[k].add(int(j) + 1)
            taken.add(int(j) + 1)
    return matched


def _regions(units: np.ndarray, spacing_mm: Sequence[float], margin_mm: float) -> np.ndarray:
    """Each voxel's nearest unit (label of ``units``; 0 beyond ``margin_mm`` of every unit; a
    tie goes to the lower label). One distance transform per unit, in its box grown by the
    margin, so the cost grows with the lesions' number and size, not with the scan's."""
    regions = np.zeros_like(units)
    best = np.full(units.shape, np.inf, dtype=np.float32)
    grow = [int(math.ceil(margin_mm / s)) for s in spacing_mm]
    for unit, box in enumerate(ndimage.find_objects(units), start=1):
        if box is None:
            continue
        box = tuple(slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box, grow, units.shape))
        distance = ndimage.distance_transform_edt(units[box] != unit, sampling=spacing_mm).astype(np.float32)
        closer = (distance <= margin_mm) & (distance < best[box])
        best[box][closer] = distance[closer]
        regions[box][closer] = unit
    return regions


def _centres(units: np.ndarray, count: int) -> np.ndarray:
    """``(count, 3)`` centroids of units ``1..count`` in voxel coordinates."""
    where = np.nonzero(units)
    labels = units[where]
    size = np.maximum(np.bincount(labels, minlength=count + 1)[1:], 1)
    return np.stack([np.bincount(labels, weights=axis, minlength=count + 1)[1:] / size for axis in where], axis=1)


def lesion_rows(prediction: np.ndarray, reference: np.ndarray, probability: np.ndarray, spacing_mm: Sequence[float],
                settings: LesionSettings, expected: np.ndarray | None = None, class_index: int = 1) -> np.ndarray:
    """Rows ``(n, len(LESION_COLUMNS))`` float64: every reference lesion, then every false positive.

    Args:
        prediction: ``(W, H, D)`` bool, the model's hard mask of the class.
        reference: ``(W, H, D)`` bool, the reference mask.
        probability: ``(W, H, D)`` float, the class's soft map.
        spacing_mm: voxel spacing in mm.
        settings: how lesions are found and matched.
        expected: ``(W, H, D)`` the label distribution of the class where known, else None.
        class_index: the class (a row's ``class``).
    """
    voxel_ml = math.prod(float(s) for s in spacing_mm) / 1000.0
    reference = np.asarray(reference, dtype=bool)
    if settings.match == "overlap":
        lesions, zones, n_ref = reference_lesions(reference, settings, voxel_ml)
    else:  # pairs by IoU: the components as they are
        lesions, n_ref = components(reference, settings, voxel_ml)
        zones = lesions
    predicted, n_pred = components(np.asarray(prediction, dtype=bool), settings, voxel_ml)
    ref_sizes = np.bincount(lesions.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(predicted.ravel(), minlength=n_pred + 1)
    intersections = _intersections(lesions, predicted, n_ref, n_pred)
    matched = _pairs(zones, predicted, intersections, (ref_sizes, pred_sizes), settings)
    false_positives = sorted(set(range(1, n_pred + 1)) - set().union(*matched)) if n_pred else []
    # units: lesion k with its matched components, then each false positive (k = n_ref + i)
    lookup = np.zeros(n_pred + 1, dtype=np.int32)
    for i, j in enumerate(false_positives):
        lookup[j] = n_ref + 1 + i
    for k in range(n_ref, 0, -1):  # a component matched to several lesions goes to the first
        for j in matched[k - 1]:
            lookup[j] = k
    units = np.where(lesions > 0, lesions, lookup[predicted])
    regions = _regions(units, [float(s) for s in spacing_mm], settings.margin_mm)
    count = n_ref + len(false_positives) + 1
    inside = np.nonzero(regions)
    soft = np.bincount(regions[inside], weights=np.asarray(probability)[inside], minlength=count)
    expected_sums = (np.bincount(regions[inside], weights=np.asarray(expected)[inside], minlength=count)
                     if expected is not None else np.full(count, np.nan))
    centres = _centres(units, count - 1)
    # a component matched to n lesions counts 1/n for each, so the rows' components sum to the prediction's
    shares = np.bincount([j for m in matched for j in m], minlength=n_pred + 1).astype(np.float64)
    rows = []
    for k in range(1, n_ref + 1):
        components_k = np.array(sorted(matched[k - 1]), dtype=np.int32)
        hard = int(pred_sizes[components_k].sum())
        dice = 2 * int(intersections[k, components_k].sum()) / (hard + ref_sizes[k])
        volume = ref_sizes[k] * voxel_ml
        rows.append([class_index, k, 1, float(hard > 0), float(np.sum(1.0 / shares[components_k])), dice, volume, hard * voxel_ml,
                     soft[k] * voxel_ml, expected_sums[k] * voxel_ml, settings.size_bin(volume), *centres[k - 1]])
    for i, j in enumerate(false_positives):
        unit = n_ref + 1 + i
        hard = pred_sizes[j] * voxel_ml
        rows.append([class_index, unit, 0, 0.0, 1, 0.0, 0.0, hard, soft[unit] * voxel_ml, expected_sums[unit] * voxel_ml,
                     settings.size_bin(hard), *centres[unit - 1]])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(LESION_COLUMNS))


def lesion_summary(rows: np.ndarray) -> dict[str, float]:
    """One subject's (or class's) lesion-wise scores from its :func:`lesion_rows`: counts,
    sensitivity, F1, count difference, BraTS lesion-wise Dice and mean volume errors (ml,
    over the reference lesions; soft = Σp over the region minus the reference volume)."""
    column = {name: rows[:, i] for i, name in enumerate(LESION_COLUMNS)}
    reference = column["reference"] == 1
    n_ref, n_fp = int(reference.sum()), int((~reference).sum())
    detected = int(column["detected"][reference].sum())
    n_pred_components = round(float(column["components"].sum()))  # shared components count 1/n per lesion
    scored = n_ref + n_fp
    return {
        "lesions_reference": float(n_ref),
        "lesions_detected": float(detected),
        "lesions_false_positive": float(n_fp),
        "lesion_sensitivity": detected / n_ref if n_ref else math.nan,
        "lesion_f1": 2 * detected / (2 * detected + (n_ref - detected) + n_fp) if scored else math.nan,
        "lesion_count_difference": float(abs(n_pred_components - n_ref)),
        "lesion_dice": float(column["dice"].sum() / scored) if scored else math.nan,
        "lesion_volume_bias_ml": float(np.mean(column["volume_pred_soft_ml"][reference] - column["volume_ref_ml"][reference]))
        if n_ref else math.nan,
        "lesion_hard_volume_bias_ml": float(np.mean(column["volume_pred_ml"][reference] - column["volume_ref_ml"][reference]))
        if n_ref else math.nan,
    }
