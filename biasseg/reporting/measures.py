"""Per-subject measures of one run, from its subjects.csv (volumes in ml).

With ``ΔV = predicted − reference`` (``metrics.volume_summary``'s definitions, per subject):
``dice``; ``volume_bias_ml`` ΔV of the argmax volume; ``abs_volume_error_ml`` |ΔV|;
``relative_volume_bias`` ΔV / reference; ``soft_volume_bias_ml`` and
``soft_relative_volume_bias`` the same for the soft volume ``Σ p``; where the expected
volume ``Σ q`` is known, ``relative_expected_volume_bias`` (argmax − expected) / expected and
``relative_soft_expected_volume_bias`` (soft − expected) / expected; the same two for the
soft volume near the predicted structure (``near_soft_relative_volume_bias``,
``relative_near_soft_expected_volume_bias``); ``ece`` (the subject's own); and the post-hoc
remedies where the run has them: ``calibrated_…`` (soft volume after temperature scaling),
``platt_…``, ``isotonic_…`` (after Platt scaling, isotonic regression), ``threshold_…``
(Dice-optimal threshold), ``rankseg_…`` (RankSEG decoding), each as
``…_relative_volume_bias`` and ``…_relative_expected_volume_bias``, plus ``threshold_dice``
and ``rankseg_dice``; ``ged`` where the model gave samples; with several raters
``dice_raters_mean`` and ``within_rater_range``/``soft_within_rater_range`` (1 where the
argmax / soft volume lies within the raters' range; their mean is the share of subjects). A
measure whose columns the run lacks is absent.

``suffix`` picks the columns: ``""`` the class mean, ``"/<class>"`` one class.

:func:`pooled_measures` gives run-level ratios of sums, ``Σ_s predicted / Σ_s reference − 1`` over
the run's subjects: the bias of the total volume. With noisy per-subject references (a rater
mean of a small structure) the per-subject mean of ratios is inflated by Jensen's inequality
(a subject whose reference is small by chance weighs more); the ratio of sums is not.
"""

from __future__ import annotations

import math

REMEDY_VOLUMES = {  # remedy -> (its volume column, its Dice column)
    "calibrated": ("volume_soft_calibrated_ml", None),
    "platt": ("volume_soft_platt_ml", None),
    "isotonic": ("volume_soft_isotonic_ml", None),
    "threshold": ("volume_threshold_ml", "dice_threshold"),
    "rankseg": ("volume_rankseg_ml", "dice_rankseg"),
    "quote": ("volume_quote_ml", None),  # recalibrated, cross-fitted over the validation subjects (metrics.volume_quote)
}

Column = dict[str, float]  # subject -> value

POOLED = {  # run-level ratio of sums -> (predicted volume column, reference volume column)
    "pooled_relative_volume_bias": ("volume_pred_ml", "volume_ref_ml"),
    "pooled_soft_relative_volume_bias": ("volume_pred_soft_ml", "volume_ref_ml"),
    "pooled_relative_expected_volume_bias": ("volume_pred_ml", "volume_expected_ml"),
    "pooled_relative_soft_expected_volume_bias": ("volume_pred_soft_ml", "volume_expected_ml"),
}


def _difference(a: Column, b: Column) -> Column:
    return {s: a[s] - b[s] for s in a if s in b}


def _relative(a: Column, b: Column) -> Column:
    return {s: (a[s] - b[s]) / b[s] if b[s] > 0 else math.nan for s in a if s in b}


def subject_measures(subjects: dict[str, Column], suffix: str = "") -> dict[str, Column]:
    """Each available measure as ``{subject: value}``."""
    def column(name: str) -> Column | None:
        return subjects.get(name + suffix)

    reference, hard, soft = column("volume_ref_ml"), column("volume_pred_ml"), column("volume_pred_soft_ml")
    expected = column("volume_expected_ml")
    if expected is not None and all(math.isnan(v) for v in expected.values()):
        expected = None
    measures: dict[str, Column] = {"dice": column("dice")}
    if reference is not None and hard is not None:
        bias = _difference(hard, reference)
        measures.update(volume_bias_ml=bias, abs_volume_error_ml={s: abs(v) for s, v in bias.items()},
                        relative_volume_bias=_relative(hard, reference))
    if reference is not None and soft is not None:
        measures.update(soft_volume_bias_ml=_difference(soft, reference),
                        soft_relative_volume_bias=_relative(soft, reference))
    near = column("volume_pred_soft_near_ml")
    if reference is not None and near is not None:
        measures["near_soft_relative_volume_bias"] = _relative(near, reference)
    if expected is not None:
        if hard is not None:
            measures["relative_expected_volume_bias"] = _relative(hard, expected)
        if soft is not None:
            measures["relative_soft_expected_volume_bias"] = _relative(soft, expected)
        if near is not None:
            measures["relative_near_soft_expected_volume_bias"] = _relative(near, expected)
    measures["ece"] = column("ece")
    for remedy, (volume_name, dice_name) in REMEDY_VOLUMES.items():
        volume = column(volume_name)
        if dice_name is not None:
            measures[f"{remedy}_dice"] = column(dice_name)
        if volume is not None and reference is not None:
            measures[f"{remedy}_relative_volume_bias"] = _relative(volume, reference)
        if volume is not None and expected is not None:
            measures[f"{remedy}_relative_expected_volume_bias"] = _relative(volume, expected)
    for name in ("ged", "dice_raters_mean", "within_rater_range", "soft_within_rater_range"):  # ensembles, several raters
        measures[name] = column(name)
    return {name: values for name, values in measures.items() if values is not None}


def pooled_measures(subjects: dict[str, Column], suffix: str = "") -> dict[str, float]:
    """Each available :data:`POOLED` ratio of sums over the subjects where both volumes are
    known; NaN where the reference volumes sum to zero."""
    pooled = {}
    for name, (predicted_name, reference_name) in POOLED.items():
        predicted, reference = subjects.get(predicted_name + suffix), subjects.get(reference_name + suffix)
        if predicted is None or reference is None:
            continue
        both = [s for s in predicted if s in reference and not math.isnan(predicted[s]) and not math.isnan(reference[s])]
        if not both:
            continue
        total = sum(reference[s] for s in both)
        pooled[name] = sum(predicted[s] for s in both) / total - 1 if total > 0 else math.nan
    return pooled
