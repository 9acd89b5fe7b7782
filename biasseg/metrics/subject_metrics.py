"""Per-subject Dice and volumes, accumulated on the model's device and DDP-safe.

For each validation subject and foreground class ``c`` (classes ``1..C−1``):

* ``dice``: hard Dice of the argmax prediction, ``2|P∩R| / (|P| + |R|)``; NaN when both
  are empty (nnU-Net's convention; such subjects are skipped by the means);
* ``volume_ref_ml``: reference label volume; ``volume_pred_ml``: argmax volume;
* ``volume_pred_soft_ml``: soft volume ``Σ p_c × voxel volume`` over the whole image;
* ``volume_pred_soft_near_ml``: the soft volume within ``soft_volume_margin_mm`` of the
  predicted structure (the argmax mask of ``c`` grown by the margin along each axis, a box):
  in a large field of view, small background probabilities far from the structure add up
  over millions of voxels and can swamp ``Σ p``; near the structure they cannot;
* ``volume_expected_ml``: ``Σ q_c × voxel volume`` where the label distribution ``q`` is
  known (synthetic and probabilistic data), NaN elsewhere;
* ``ged``: the generalised energy distance D²_GED between the model's segmentations and the
  reference (:mod:`biasseg.metrics.energy_distance`), where the model gives several (an ensemble, a
  hypernetwork's α); NaN otherwise;
* with several raters (``num_raters`` > 0; ``label`` is then their majority vote and the
  expected volume their mean volume): ``dice_rater<k>`` against rater ``k`` (from 1) and
  ``dice_raters_mean``; ``volume_raters_min_ml``/``volume_raters_max_ml``, the raters' range,
  and ``volume_raters_mean_ml``, their mean (what :mod:`biasseg.metrics.volume_quote` can be
  calibrated to instead of the vote);
  ``within_rater_range``/``soft_within_rater_range``, 1 where the argmax / soft volume lies
  within it (inclusive), else 0; ``ged`` against the raters' segmentations;
* ``ece``: the subject's class-wise expected calibration error (:mod:`biasseg.metrics.calibration`;
  the pooled ECEs, class-wise and top-label, are dataset-level values);
* the post-hoc remedies of :mod:`biasseg.metrics.posthoc`: ``volume_soft_calibrated_ml``,
  ``volume_soft_platt_ml``, ``volume_soft_isotonic_ml`` (soft volume after temperature
  scaling, Platt scaling, isotonic regression), ``dice_threshold``/``volume_threshold_ml``
  (decoded at the Dice-optimal threshold), ``dice_rankseg``/``volume_rankseg_ml`` (RankSEG).

The calibration and the remedies come from small per-subject summaries kept on the device
instead of probability maps: reliability bins (class-wise and top-label) and log-odds
histograms.

Volumes are in millilitres: voxel count × ``prod(spacing_mm)`` / 1000. The states are lists
concatenated across processes (``dist_reduce_fx="cat"``); ``compute`` orders the rows by
subject index and keeps each subject once, so padding duplicates never count twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from biasseg.metrics.calibration import RELIABILITY_BINS, expected_calibration_error, reliability_bins
from biasseg.metrics.energy_distance import generalised_energy_distance
from biasseg.metrics.posthoc import LOG_ODDS_BINS, dice_from_counts, log_odds, log_odds_histogram, posthoc_remedies

# voxels per pass of the calibration summaries: their float64/int64 temporaries stay below
# ~0.7 GB on the device whatever the volume (a 512 x 512 x 300 CT would need ~3 GB at once)
CALIBRATION_CHUNK = 1 << 24
MEASURED_KEYS = ("dice", "volume_ref_ml", "volume_pred_ml", "volume_pred_soft_ml", "volume_pred_soft_near_ml", "volume_expected_ml",
                 "ged")
PER_SUBJECT_KEYS = (
    *MEASURED_KEYS,
    "ece",
    "volume_soft_calibrated_ml",
    "volume_soft_platt_ml",
    "volume_soft_isotonic_ml",
    "dice_threshold",
    "volume_threshold_ml",
    "dice_rankseg",
    "volume_rankseg_ml",
)


class SubjectSegmentationMetrics(Metric):
    """Collects one row per subject; see the module docstring for the columns."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, soft_volume_margin_mm: float = 10.0, num_raters: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_raters = int(num_raters)
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        if not soft_volume_margin_mm >= 0:
            raise ValueError(f"the soft-volume margin must be >= 0 mm, got {soft_volume_margin_mm}")
        self.num_classes = num_classes
        self.soft_volume_margin_mm = float(soft_volume_margin_mm)
        for key in ("subject_index", "voxel_ml", "reliability", "top_label", "log_odds", *MEASURED_KEYS, *self.rater_states):
            self.add_state(key, default=[], dist_reduce_fx="cat")

    @property
    def rater_states(self) -> tuple[str, ...]:
        """Per-rater states ``(1, C − 1, R)`` and the log-odds histogram against the raters' mean
        map ``(1, C − 1, 2, LOG_ODDS_BINS)``, only with several raters."""
        return ("rater_dice", "rater_volume_ml", "rater_log_odds") if self.num_raters else ()

    def update(
        self,
        probabilities: torch.Tensor,
        label: torch.Tensor,
        spacing_mm: Sequence[float],
        subject_index: int,
        expected_volume_ml: Sequence[float] | torch.Tensor | None = None,
        samples: torch.Tensor | None = None,
        raters: torch.Tensor | None = None,
    ) -> None:
        """Add one subject.

        Args:
            probabilities: ``(C, W, H, D)`` class probabilities on the device.
            label: ``(W, H, D)`` or ``(1, W, H, D)`` integer reference.
            spacing_mm: voxel spacing in mm.
            subject_index: the subject's unique index.
            expected_volume_ml: ``C − 1`` expected volumes in ml, or None if unknown.
            samples: ``(M, W, H, D)`` segmentations the model gives (ensemble members), or None.
            raters: ``(R, W, H, D)`` the raters' label maps (``num_raters`` of them), or None.
        """
        if (raters is None) != (self.num_raters == 0) or (raters is not None and len(raters) != self.num_raters):
            raise ValueError(f"expected the label maps of {self.num_raters} raters, got {None if raters is None else len(raters)}")
        if probabilities.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class channels, got {probabilities.shape[0]}")
        label = label.reshape(probabilities.shape[1:]).to(probabilities.device)
        device = probabilities.device
        voxel_ml = math.prod(float(s) for s in spacing_mm) / 1000.0
        classes = torch.arange(1, self.num_classes, device=device).view(-1, 1)
        prediction = probabilities.argmax(0).reshape(1, -1) == classes  # (C-1, N)
        reference = label.reshape(1, -1) == classes
        n_pred = prediction.sum(1, dtype=torch.float64)
        n_ref = reference.sum(1, dtype=torch.float64)
        n_both = (prediction & reference).sum(1, dtype=torch.float64)
        dice = dice_from_counts(n_both, n_pred, n_ref)
        foreground = probabilities[1:].reshape(self.num_classes - 1, -1)
        soft = foreground.sum(1, dtype=torch.float64)
        near = near_structure(prediction.view(-1, *probabilities.shape[1:]), spacing_mm, self.soft_volume_margin_mm)
        soft_near = (foreground * near.reshape(self.num_classes - 1, -1)).sum(1, dtype=torch.float64)
        if expected_volume_ml is None:
            expected = torch.full((self.num_classes - 1,), torch.nan, dtype=torch.float64, device=device)
        else:
            expected = torch.as_tensor(expected_volume_ml, dtype=torch.float64, device=device).reshape(-1)
        self.subject_index.append(torch.tensor([subject_index], device=device))
        self.voxel_ml.append(torch.tensor([voxel_ml], dtype=torch.float64, device=device))
        flat = probabilities.reshape(self.num_classes, -1)
        chunks = [slice(start, start + CALIBRATION_CHUNK) for start in range(0, flat.shape[1], CALIBRATION_CHUNK)]
        self.reliability.append(sum(reliability_bins(flat[1:, c], reference[:, c]) for c in chunks)[None])
        confidence, top = flat.max(0)  # top-label: the argmax class's probability, right or wrong
        correct = top == label.reshape(-1)
        self.top_label.append(sum(reliability_bins(confidence[None, c], correct[None, c]) for c in chunks)[None])
        references = label[None] if raters is None else raters.reshape(-1, *label.shape).to(device)
        rater_masks = None if raters is None else references.reshape(len(references), 1, -1) == classes  # (R, C-1, N)
        # against the reference, and with several raters against their mean map (one log-odds pass)
        shares = [reference] if rater_masks is None else [reference, rater_masks.float().mean(0)]
        histograms = log_odds_histograms(flat, shares, chunks)
        self.log_odds.append(histograms[0][None])
        self.dice.append(dice[None])
        self.volume_ref_ml.append((n_ref * voxel_ml)[None])
        self.volume_pred_ml.append((n_pred * voxel_ml)[None])
        self.volume_pred_soft_ml.append((soft * voxel_ml)[None])
        self.volume_pred_soft_near_ml.append((soft_near * voxel_ml)[None])
        self.volume_expected_ml.append(expected[None])
        if samples is not None:
            ged = generalised_energy_distance(samples, references, self.num_classes)
        else:  # one segmentation: no energy distance (as generalised_energy_distance gives for one sample)
            ged = torch.full((self.num_classes - 1,), torch.nan, dtype=torch.float64, device=device)
        self.ged.append(ged[None])
        if rater_masks is not None:
            rater_counts = rater_masks.sum(2, dtype=torch.float64)
            agreement = (rater_masks & prediction[None]).sum(2, dtype=torch.float64)
            self.rater_dice.append(dice_from_counts(agreement, n_pred[None], rater_counts).T[None])
            self.rater_volume_ml.append((rater_counts * voxel_ml).T[None])
            self.rater_log_odds.append(histograms[1][None])

    def compute(self) -> dict[str, torch.Tensor]:
        """Raw per-subject rows ordered by subject: ``subject_index``, ``voxel_ml`` ``(N,)``,
        each measured key ``(N, C − 1)``, ``reliability`` ``(N, C − 1, bins, 3)`` and
        ``log_odds`` ``(N, C − 1, 2, LOG_ODDS_BINS)``; :func:`per_subject` completes them."""
        def cat(state) -> torch.Tensor:  # a list before a distributed sync, a tensor after it
            return torch.cat(state) if isinstance(state, list) else state

        if isinstance(self.subject_index, list) and not self.subject_index:
            raise RuntimeError("no subject was added before compute()")

        index = cat(self.subject_index)
        unique, first = _first_occurrences(index)
        rows = {"subject_index": unique}
        for key in ("voxel_ml", "reliability", "top_label", "log_odds", *MEASURED_KEYS, *self.rater_states):
            rows[key] = cat(getattr(self, key))[first]
        return rows


def log_odds_histograms(flat: torch.Tensor, references: list[torch.Tensor], chunks: list[slice]) -> list[torch.Tensor]:
    """The foreground log-odds histogram ``(C − 1, 2, LOG_ODDS_BINS)`` of ``(C, N)`` class
    probabilities against each ``(C − 1, N)`` reference (boolean, or a share of raters), the
    log-odds computed once per chunk of voxels."""
    totals = [0.0] * len(references)
    for c in chunks:
        z = log_odds(flat[:, c])
        totals = [total + log_odds_histogram(z, target[:, c]) for total, target in zip(totals, references)]
    return totals


def per_subject(metric: SubjectSegmentationMetrics) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The validation results: per-subject ``rows`` and dataset-level ``fitted`` values.

    ``rows``: ``subject_index`` ``(N,)`` and every :data:`PER_SUBJECT_KEYS` entry ``(N, C − 1)``.
    ``fitted`` (per class, ``(C − 1,)``): ``ece`` (class-wise) over all validation voxels, the
    remedies' fitted values (:func:`biasseg.metrics.posthoc.posthoc_remedies`), and ``reliability``
    ``(C − 1, bins, 3)`` pooled over subjects; ``ece_top_label`` ``()`` over all voxels; the
    per-subject ``log_odds`` histograms ``(N, C − 1, 2, LOG_ODDS_BINS)`` and ``voxel_ml`` ``(N,)``
    (for :mod:`biasseg.metrics.volume_quote`). Shapes
    are restored after torchmetrics' squeezing of one-element results (one subject, one class).
    """
    raw = metric.compute()
    index = raw["subject_index"].reshape(-1)
    n, k = len(index), metric.num_classes - 1
    reliability = raw["reliability"].reshape(n, k, RELIABILITY_BINS, 3)
    remedies, fitted = posthoc_remedies(raw["log_odds"].reshape(n, k, 2, LOG_ODDS_BINS), raw["voxel_ml"].reshape(n))
    rows = {"subject_index": index, **{key: raw[key].reshape(n, k) for key in MEASURED_KEYS}}
    rows["ece"] = expected_calibration_error(reliability)
    rows.update(remedies)
    if metric.num_raters:
        rows.update(rater_rows(raw["rater_dice"].reshape(n, k, -1), raw["rater_volume_ml"].reshape(n, k, -1),
                               rows["volume_pred_ml"], rows["volume_pred_soft_ml"]))
        fitted["raters_log_odds"] = raw["rater_log_odds"].reshape(n, k, 2, LOG_ODDS_BINS)
    pooled = reliability.sum(0)
    top_label = expected_calibration_error(raw["top_label"].reshape(n, RELIABILITY_BINS, 3).sum(0))
    return rows, {"ece": expected_calibration_error(pooled), "ece_top_label": top_label, "reliability": pooled, **fitted,
                  "log_odds": raw["log_odds"].reshape(n, k, 2, LOG_ODDS_BINS), "voxel_ml": raw["voxel_ml"].reshape(n)}


def rater_rows(dice: torch.Tensor, volumes: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor) -> dict[str, torch.Tensor]:
    """The multi-rater columns (module docstring) from per-rater Dice and volumes ``(N, C − 1, R)``
    and the predicted hard and soft volumes ``(N, C − 1)``."""
    low, high = volumes.min(2).values, volumes.max(2).values
    rows = {f"dice_rater{r + 1}": dice[..., r] for r in range(dice.shape[2])}
    rows["dice_raters_mean"] = torch.nanmean(dice, dim=2)
    rows["volume_raters_min_ml"], rows["volume_raters_max_ml"] = low, high
    rows["volume_raters_mean_ml"] = volumes.mean(2)
    rows["within_rater_range"] = ((hard >= low) & (hard <= high)).double()
    rows["soft_within_rater_range"] = ((soft >= low) & (soft <= high)).double()
    return rows


def near_structure(masks: torch.Tensor, spacing_mm: Sequence[float], margin_mm: float) -> torch.Tensor:
    """``masks`` ``(K, W, H, D)`` grown by ``margin_mm`` along each axis (a box: separable max
    pooling, cheap on any device), as booleans."""
    grown = masks.float().unsqueeze(1)  # (K, 1, W, H, D)
    for axis, spacing in enumerate(spacing_mm):
        reach = int(margin_mm / float(spacing))
        if reach > 0:
            kernel = [1, 1, 1]
            kernel[axis] = 2 * reach + 1
            padding = [0, 0, 0]
            padding[axis] = reach
            grown = torch.nn.functional.max_pool3d(grown, kernel, stride=1, padding=padding)
    return grown[:, 0] > 0


def _first_occurrences(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of ``index`` and the position of each one's first occurrence."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return sorted_index[keep], order[keep]
