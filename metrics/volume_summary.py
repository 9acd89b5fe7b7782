"""Dataset-level summaries of per-subject Dice and volume errors (the logged ``val/…`` keys).

With ``ΔV = predicted − reference`` per subject and class (ml):

* ``dice``: mean Dice; ``volume_bias_ml``: mean ΔV (hard, argmax);
  ``abs_volume_error_ml``: mean |ΔV|; ``relative_volume_bias``: mean ΔV / reference;
* ``soft_volume_bias_ml``, ``soft_abs_volume_error_ml``, ``soft_relative_volume_bias``:
  the same with the soft volume ``Σ p``;
* where expected volumes are known: ``expected_volume_bias_ml`` (hard − expected),
  ``soft_expected_volume_bias_ml`` (soft − expected) and their relative forms
  ``relative_expected_volume_bias``, ``relative_soft_expected_volume_bias``.

Means skip NaN (an empty reference has no relative error, a subject with both masks empty
no Dice). Each key is given per class (``key/<class name>``, only with more than one
foreground class) and as the mean over classes (``key``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _nanmean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.nanmean(x, dim=dim)


def _relative(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.where(reference > 0, delta / reference.clamp_min(1e-12), torch.nan)


def per_class_summary(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each summary key as a ``(C − 1,)`` tensor of means over subjects."""
    ref, hard, soft = rows["volume_ref_ml"], rows["volume_pred_ml"], rows["volume_pred_soft_ml"]
    summary = {
        "dice": _nanmean(rows["dice"]),
        "volume_bias_ml": _nanmean(hard - ref),
        "abs_volume_error_ml": _nanmean((hard - ref).abs()),
        "relative_volume_bias": _nanmean(_relative(hard - ref, ref)),
        "soft_volume_bias_ml": _nanmean(soft - ref),
        "soft_abs_volume_error_ml": _nanmean((soft - ref).abs()),
        "soft_relative_volume_bias": _nanmean(_relative(soft - ref, ref)),
    }
    expected = rows["volume_expected_ml"]
    if not torch.isnan(expected).all():
        summary.update(
            {
                "expected_volume_bias_ml": _nanmean(hard - expected),
                "soft_expected_volume_bias_ml": _nanmean(soft - expected),
                "relative_expected_volume_bias": _nanmean(_relative(hard - expected, expected)),
                "relative_soft_expected_volume_bias": _nanmean(_relative(soft - expected, expected)),
            }
        )
    return summary


def summarize(rows: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict[str, float]:
    """Flat ``{key: value}`` of class means, plus ``key/<class>`` when there are several classes."""
    flat: dict[str, float] = {}
    for key, values in per_class_summary(rows).items():
        flat[key] = float(_nanmean(values))
        if len(class_names) > 1:
            for name, value in zip(class_names, values.tolist()):
                flat[f"{key}/{name}"] = float(value)
    return flat
