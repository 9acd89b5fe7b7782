"""Dataset-level summaries of per-subject Dice and volume errors (the logged ``val/…`` keys).

With ``ΔV = predicted − reference`` per subject and class (ml), for every way of reading a
volume off the prediction — ``""`` hard (argmax), ``soft_`` (``Σ p``), ``calibrated_soft_``
(``Σ p`` after temperature scaling), ``platt_soft_``, ``isotonic_soft_`` (after Platt scaling,
isotonic regression), ``threshold_`` (Dice-optimal threshold), ``rankseg_`` (RankSEG
decoding), see :mod:`biasseg.metrics.posthoc`, ``near_soft_`` (``Σ p`` near the predicted
structure, see :mod:`biasseg.metrics.subject_metrics`) and ``quote_`` (the recalibrated soft volume
fitted on other subjects, :mod:`biasseg.metrics.volume_quote`):

* ``<prefix>volume_bias_ml``: mean ΔV; ``<prefix>abs_volume_error_ml``: mean |ΔV|;
  ``<prefix>relative_volume_bias``: mean ΔV / reference;
* where expected volumes are known: ``<prefix>expected_volume_bias_ml`` (predicted −
  expected) and ``relative_<prefix>expected_volume_bias``; with several raters
  ``relative_<prefix>raters_mean_volume_bias`` (against the raters' mean volume);

and ``dice`` (argmax), ``dice_threshold``, ``dice_rankseg`` (mean Dice), ``ged`` (mean
generalised energy distance, where the model gives samples: an ensemble), with several raters
``dice_rater<k>``, ``dice_raters_mean`` and ``within_rater_range``/``soft_within_rater_range``
(the share of subjects whose volume lies within the raters' range), ``ece`` (class-wise,
over all validation voxels), ``ece_top_label`` (top-label, over all voxels and classes),
``ece_calibrated``/``ece_platt``/``ece_isotonic`` (after each recalibration), ``temperature``,
``platt_slope``, ``platt_bias``, ``threshold``; the interval's ``interval_coverage``,
``interval_expected_coverage``, ``interval_raters_mean_coverage``, ``interval_width_ml``, ``interval_relative_width`` and the
Poisson-binomial interval's ``sd_coverage``/``sd_expected_coverage``
(:func:`interval_summary`).

Means skip NaN (an empty reference has no relative error, a subject with both masks empty
no Dice). Each key is given per class (``key/<class name>``, only with more than one
foreground class) and as the mean over classes (``key``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy import stats


def _nanmean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.nanmean(x, dim=dim)


def _relative(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.where(reference > 0, delta / reference.clamp_min(1e-12), torch.nan)


# summary prefix -> per-subject volume column
VOLUME_READINGS = {
    "": "volume_pred_ml",
    "soft_": "volume_pred_soft_ml",
    "near_soft_": "volume_pred_soft_near_ml",
    "calibrated_soft_": "volume_soft_calibrated_ml",
    "platt_soft_": "volume_soft_platt_ml",
    "isotonic_soft_": "volume_soft_isotonic_ml",
    "threshold_": "volume_threshold_ml",
    "rankseg_": "volume_rankseg_ml",
    "quote_": "volume_quote_ml",
}
FITTED_KEYS = ("ece", "ece_calibrated", "ece_platt", "ece_isotonic", "temperature", "platt_slope", "platt_bias", "threshold")
DATASET_KEYS = ("ece_top_label",)  # one value for all classes


def interval_summary(rows: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """Per class ``(K,)``: ``interval_coverage`` (share of subjects whose reference volume lies
    in the interval), ``interval_expected_coverage`` (the expected volume, where known),
    ``interval_raters_mean_coverage`` (the raters' mean volume, with several raters),
    ``interval_width_ml``, ``interval_relative_width`` (width / quoted volume), and, where the
    rows hold the model's SD and ``alpha`` is known, the Poisson-binomial interval's
    ``sd_coverage``/``sd_expected_coverage``."""
    low, high, quote = rows["volume_low_ml"], rows["volume_high_ml"], rows["volume_quote_ml"]

    def share(target: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        inside = ((target >= lower) & (target <= upper)).double()
        return torch.nanmean(torch.where(torch.isnan(target), torch.nan, inside), dim=0)

    width = high - low
    summary = {
        "interval_coverage": share(rows["volume_ref_ml"], low, high),
        "interval_width_ml": torch.nanmean(torch.where(torch.isinf(width), torch.nan, width), dim=0),
        "interval_relative_width": torch.nanmean(torch.where(quote > 0, width / quote.clamp_min(1e-12), torch.nan), dim=0),
    }
    known_expected = not torch.isnan(rows["volume_expected_ml"]).all()
    if known_expected:
        summary["interval_expected_coverage"] = share(rows["volume_expected_ml"], low, high)
    if "volume_raters_mean_ml" in rows:
        summary["interval_raters_mean_coverage"] = share(rows["volume_raters_mean_ml"], low, high)
    if alpha is not None and "volume_sd_ml" in rows:
        z = float(stats.norm.ppf(1 - alpha / 2))
        soft, sd = rows["volume_pred_soft_ml"], rows["volume_sd_ml"]
        summary["sd_coverage"] = share(rows["volume_ref_ml"], soft - z * sd, soft + z * sd)
        if known_expected:
            summary["sd_expected_coverage"] = share(rows["volume_expected_ml"], soft - z * sd, soft + z * sd)
    return summary


def per_class_summary(rows: dict[str, torch.Tensor], fitted: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Each summary key as a ``(C − 1,)`` tensor: means over subjects, and the ``fitted``
    dataset-level values of :func:`biasseg.metrics.per_subject` where given."""
    ref, expected = rows["volume_ref_ml"], rows["volume_expected_ml"]
    has_expected = not torch.isnan(expected).all()
    summary = {key: _nanmean(rows[key]) for key in ("dice", "dice_threshold", "dice_rankseg") if key in rows}
    if "ged" in rows and not torch.isnan(rows["ged"]).all():
        summary["ged"] = _nanmean(rows["ged"])
    for key in rows:  # several raters: Dice against each and their mean, share of volumes within their range
        if key.startswith(("dice_rater", "within_rater_range", "soft_within_rater_range")):
            summary[key] = _nanmean(rows[key])
    for prefix, column in VOLUME_READINGS.items():
        if column not in rows:
            continue
        volume = rows[column]
        summary[f"{prefix}volume_bias_ml"] = _nanmean(volume - ref)
        summary[f"{prefix}abs_volume_error_ml"] = _nanmean((volume - ref).abs())
        summary[f"{prefix}relative_volume_bias"] = _nanmean(_relative(volume - ref, ref))
        if has_expected:
            summary[f"{prefix}expected_volume_bias_ml"] = _nanmean(volume - expected)
            summary[f"relative_{prefix}expected_volume_bias"] = _nanmean(_relative(volume - expected, expected))
        if "volume_raters_mean_ml" in rows:
            mean = rows["volume_raters_mean_ml"]
            summary[f"relative_{prefix}raters_mean_volume_bias"] = _nanmean(_relative(volume - mean, mean))
    if "volume_low_ml" in rows:
        alpha = None if fitted is None or "interval_alpha" not in fitted else float(fitted["interval_alpha"])
        summary.update(interval_summary(rows, alpha))
    for key in FITTED_KEYS:
        if fitted is not None and key in fitted:
            summary[key] = fitted[key]
    return summary


def summarize(
    rows: dict[str, torch.Tensor], class_names: Sequence[str], fitted: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Flat ``{key: value}`` of class means, plus ``key/<class>`` when there are several classes."""
    flat: dict[str, float] = {key: float(fitted[key]) for key in DATASET_KEYS if fitted is not None and key in fitted}
    for key, values in per_class_summary(rows, fitted).items():
        flat[key] = float(_nanmean(values))
        if len(class_names) > 1:
            for name, value in zip(class_names, values.tolist()):
                flat[f"{key}/{name}"] = float(value)
    return flat
