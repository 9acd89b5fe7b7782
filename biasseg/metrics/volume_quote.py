"""A volume a user can quote: recalibrated on other subjects, with an interval that holds.

From the per-subject one-vs-rest log-odds histograms of :mod:`biasseg.metrics.posthoc` (``(S, K, 2,
B)``: subjects, foreground classes, not-class/class voxels, log-odds bins) and each subject's
voxel volume (ml):

* **Recalibration** (:data:`METHODS`): ``none``, ``temperature`` (``σ(z / T)``), ``platt``
  (``σ(a·z + b)``) or ``isotonic``, each fitted by :mod:`biasseg.metrics.posthoc` on *calibration
  subjects* and applied to others. The recalibrated soft volume is ``Σ_bins n_b · p(z_b) ×
  voxel volume`` (bin centres, 1/16 log-odds wide; the same reading in training's
  validation, ``evaluate.py`` and ``predict.py``). Probabilities are recalibrated per class,
  one-vs-rest, so with several classes they need not sum to one: each class's volume is
  its own.
* **Cross-fitting**: at validation the subjects are split into ``folds`` (subject ``s`` in
  fold ``s mod folds``); every subject's recalibrated volume comes from maps fitted on the
  other folds only, so the reported effect is held out, not in-sample.
* **Interval**: split conformal (Vovk et al. 2005; Angelopoulos & Bates 2023) on the relative
  residual ``r = |V_ref − V̂| / V̂`` of the held-out volumes, so the half-width scales with the
  volume: ``[V̂ (1 − q), V̂ (1 + q)]`` (the lower end at least 0) with ``q`` the
  ``⌈(n + 1)(1 − α)⌉``-th smallest of ``n`` scores, which covers a new scan's reference
  volume with probability at least ``1 − α`` *if calibration subjects and new scans are
  exchangeable* (same population, scanner, protocol). ``n`` must be at least ``(1 − α)/α``
  (9 for α = 0.1); with fewer but at least 2 the quantile is replaced by the Student-t
  prediction interval of normally distributed residuals (``t_{n−1, 1−α/2} · rms(r) ·
  √(1 + 1/n)``), an assumption, reported as such (``interval_kind``). Each validation
  subject's own interval uses only the other folds' scores.
* **The model's own spread**, for comparison: the Poisson-binomial SD ``√(Σ p(1 − p))`` ×
  voxel volume of the (uncalibrated) soft volume, what the map says if its voxels were
  independent; ``Σ p ± z_{1−α/2} · SD`` is expected to under-cover (neighbouring voxels'
  labels are not independent, and a miscalibrated map is off-centre).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from scipy import stats

from biasseg.errors import InputError
from biasseg.metrics.posthoc import (
    METHODS,
    CalibrationMaps,
    bin_centres,
    log_odds,
    log_odds_histogram,
    soft_volumes,
    uncalibrated_probability,
)

SMALLEST_VOLUME_ML = 1e-6  # the relative residual's denominator at least this (an empty prediction)
CALIBRATED_WITHIN = 0.05  # |T − 1| and |Platt b| up to this count as calibrated (RESULTS.md, "A volume to quote")
SETTLED_WITHIN = 0.05  # the soft-volume bias moved at most this much over the last SETTLED_VALIDATIONS (RESULTS.md)
SETTLED_VALIDATIONS = 3
PINNED_WITHIN = 0.05  # a recalibration whose references fix the total volume only to more than ±this is not trusted (RESULTS.md)


def map_histograms(probabilities: torch.Tensor, regions: bool = False, chunk: int = 1 << 24) -> torch.Tensor:
    """The log-odds histogram ``(1, K, 2, B)`` of one probability map without a reference (every
    voxel counted as not-class): class probabilities ``(C, …)`` (background first; ``K = C − 1``),
    or with ``regions`` one sigmoid map per region ``(R, …)`` (``K = R``)."""
    flat = probabilities.reshape(len(probabilities), -1)
    total = None
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start:start + chunk]
        if regions:  # each region against its own complement
            z = torch.cat([log_odds(torch.stack([1 - p, p])) for p in part])
        else:
            z = log_odds(part)
        counts = log_odds_histogram(z, torch.zeros_like(z, dtype=torch.bool))
        total = counts if total is None else total + counts
    return total[None]


def poisson_binomial_sd(histograms: torch.Tensor, voxel_ml: torch.Tensor) -> torch.Tensor:
    """The uncalibrated map's own SD of its volume, ``√(Σ p (1 − p))`` × voxel volume ``(S, K)`` (ml)."""
    p = torch.sigmoid(bin_centres(histograms.device))
    counts = histograms.double().sum(2)
    return (counts * (p * (1 - p))).sum(-1).sqrt() * voxel_ml.double().view(-1, 1)


TARGETS = ("reference", "raters_mean")  # what a quote is calibrated to: the label, or the raters' mean map and volume
TARGET_CHOICES = ("auto", *TARGETS)  # volume_quote.target; auto: the raters' mean where there are several raters


def quote_target(choice: str, several_raters: bool) -> str:
    """The :data:`TARGETS` entry that ``volume_quote.target`` (:data:`TARGET_CHOICES`) picks."""
    if choice == "raters_mean" and not several_raters:
        raise InputError("volume_quote.target=raters_mean needs several raters per subject; this data has one label each")
    return "raters_mean" if choice == "raters_mean" or (choice == "auto" and several_raters) else "reference"


def recalibration_uncertainty(reference_ml: torch.Tensor, soft_ml: torch.Tensor) -> torch.Tensor:
    """How closely ``S`` calibration subjects fix a recalibrated volume, per class ``(K,)``: the
    relative standard error ``sd_s(V_ref − Σp) · √S / Σ_s Σp`` of their total reference volume
    around the model's own soft volume (``(S, K)`` ml each; NaN below 2 subjects).

    Platt's and the isotonic fit's calibration-in-the-large make the recalibrated total equal
    the references' total (logistic regression's intercept equation; pool-adjacent-violators
    preserves sums), so the references' sampling noise is the recalibration's: labels drawn
    as single coherent boundaries, or one majority vote per subject, fix it to ±8–16 %, where
    voxel-noise labels give ±1–2 % (RESULTS.md, "A volume to quote")."""
    residual = reference_ml.double() - soft_ml.double()
    known = ~torch.isnan(residual)
    count = known.sum(0).double()
    deviation = torch.where(known, residual - torch.nanmean(residual, dim=0), 0.0)
    spread = (deviation.square().sum(0) / (count - 1)).sqrt()  # the sample sd
    total = torch.where(known, soft_ml.double(), 0.0).sum(0)
    relative = spread * count.sqrt() / total.clamp_min(SMALLEST_VOLUME_ML)
    return torch.where(count >= 2, relative, torch.nan)


def relative_residuals(reference_ml: torch.Tensor, volume_ml: torch.Tensor) -> torch.Tensor:
    """The conformal score ``|V_ref − V̂| / V̂`` (NaN where the reference is unknown)."""
    return (reference_ml - volume_ml).abs() / volume_ml.clamp_min(SMALLEST_VOLUME_ML)


def interval_scale(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, str]:
    """The relative half-width ``q`` per class ``(K,)`` from ``(n, K)`` scores (NaN rows are
    ignored), and how it was found: ``split conformal`` or ``student t`` (too few scores for a
    finite conformal quantile; inf below 2 scores)."""
    quantiles, kinds = [], set()
    for column in scores.T:
        values = column[~torch.isnan(column)].double().sort().values
        n = len(values)
        rank = math.ceil((n + 1) * (1 - alpha))
        if n and rank <= n:
            quantiles.append(float(values[rank - 1]))
            kinds.add("split conformal")
        elif n >= 2:
            t = float(stats.t.ppf(1 - alpha / 2, n - 1))
            quantiles.append(t * float(values.square().mean().sqrt()) * math.sqrt(1 + 1 / n))
            kinds.add("student t")
        else:
            quantiles.append(math.inf)
            kinds.add("none (fewer than 2 calibration subjects)")
    return torch.tensor(quantiles, dtype=torch.float64), " + ".join(sorted(kinds))


def interval(volume_ml: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[V̂ (1 − q), V̂ (1 + q)]``, the lower end at least 0, for volumes ``(S, K)`` and ``q`` ``(K,)``
    (or ``(S, K)``)."""
    scale = torch.as_tensor(scale, dtype=volume_ml.dtype, device=volume_ml.device).expand_as(volume_ml)
    half = torch.where(torch.isinf(scale), torch.inf, volume_ml * scale)  # unbounded, also for an empty prediction
    return (volume_ml - half).clamp_min(0.0), volume_ml + half


@dataclass
class VolumeCalibration:
    """What a trained model's volumes are quoted with: the maps fitted on all calibration
    subjects, the interval's relative half-width per recalibration ``scale[method]`` ``(K,)``
    from the cross-fitted scores, at miscoverage ``alpha``."""

    maps: CalibrationMaps
    scale: dict[str, torch.Tensor]
    alpha: float
    interval_kind: str
    subjects: int
    method: str = "platt"
    uncertainty: torch.Tensor | None = None  # (K,) recalibration_uncertainty of the calibration subjects; None if unknown
    target: str = "reference"  # what it was calibrated to: the label (reference) or the raters' mean map (raters_mean)

    def quote(self, histograms: torch.Tensor, voxel_ml: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft volume recalibrated by :attr:`method` and its interval ``(volume, low, high)``, each ``(S, K)`` ml."""
        volume = soft_volumes(histograms, voxel_ml, self.maps.bin_probability(self.method).to(histograms.device))
        low, high = interval(volume, self.scale[self.method].to(volume.device))
        return volume, low, high


@contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny tensor work on one thread: on (K, B)-sized tensors the thread pool's
    synchronisation costs more than it saves, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cross_fit(histograms: torch.Tensor, voxel_ml: torch.Tensor, reference_ml: torch.Tensor, alpha: float,
              folds: int = 5, method: str = "platt", maps: CalibrationMaps | None = None
              ) -> tuple[VolumeCalibration, dict[str, torch.Tensor]]:
    """Fit a :class:`VolumeCalibration` on ``S`` validation subjects and measure it held out.

    Returns the calibration (maps on all subjects, interval scales from every subject's
    held-out score) and per-subject rows ``(S, K)``: ``volume_quote_ml`` (recalibrated by
    ``method`` with maps fitted on the other folds), ``volume_low_ml``/``volume_high_ml`` (its
    interval from the other folds' scores), ``volume_sd_ml`` (Poisson-binomial). With one
    subject nothing is held out: the quote is the uncalibrated soft volume, the interval
    unbounded. ``maps``: the maps already fitted on all subjects (validation's in-sample
    remedies, :func:`biasseg.metrics.posthoc.posthoc_remedies`), or None to fit them here.
    """
    with one_thread():  # small tensors: on the CPU, one thread; the rows go back to the caller's device
        histograms = histograms.double().cpu()
        maps = CalibrationMaps.fit(histograms) if maps is None else CalibrationMaps(
            *(m.double().cpu() for m in (maps.temperature, maps.platt_slope, maps.platt_bias, maps.isotonic)))
        calibration, rows = _cross_fit(histograms, voxel_ml.double().cpu(), reference_ml.double().cpu(), alpha, folds, method, maps)
    return calibration, {key: value.to(reference_ml.device) for key, value in rows.items()}


def _cross_fit(histograms: torch.Tensor, voxel_ml: torch.Tensor, reference_ml: torch.Tensor, alpha: float, folds: int,
               method: str, maps_on_all: CalibrationMaps) -> tuple[VolumeCalibration, dict[str, torch.Tensor]]:
    count = histograms.shape[0]
    folds = max(1, min(int(folds), count))
    fold_of = torch.arange(count, device=histograms.device) % folds
    held_out = {m: torch.full_like(reference_ml, torch.nan) for m in METHODS}
    if folds > 1:
        for fold in range(folds):
            inside = fold_of == fold
            maps = CalibrationMaps.fit(histograms[~inside])
            for m in METHODS:
                held_out[m][inside] = soft_volumes(histograms[inside], voxel_ml[inside], maps.bin_probability(m))
    else:  # nothing to hold out: the uncalibrated volume for every method
        uncalibrated = soft_volumes(histograms, voxel_ml, uncalibrated_probability(histograms.shape[1]))
        held_out = dict.fromkeys(METHODS, uncalibrated)
    scores = {m: relative_residuals(reference_ml, held_out[m]) for m in METHODS}
    scales, kinds = {}, set()
    for m in METHODS:
        scales[m], kind = interval_scale(scores[m] if folds > 1 else scores[m][:0], alpha)
        kinds.add(kind)
    # each subject's interval from the other folds' scores only
    own_scale = torch.full_like(reference_ml, math.inf)
    if folds > 1:
        for fold in range(folds):
            inside = fold_of == fold
            own_scale[inside] = interval_scale(scores[method][~inside], alpha)[0].to(own_scale)
    low, high = interval(held_out[method], own_scale)
    uncalibrated = soft_volumes(histograms, voxel_ml, uncalibrated_probability(histograms.shape[1]))
    calibration = VolumeCalibration(maps_on_all, scales, float(alpha), " + ".join(sorted(kinds)), count, method,
                                    recalibration_uncertainty(reference_ml, uncalibrated))
    rows = {
        "volume_quote_ml": held_out[method],
        "volume_low_ml": low,
        "volume_high_ml": high,
        "volume_sd_ml": poisson_binomial_sd(histograms, voxel_ml),
    }
    return calibration, rows


def apply_stored(calibration: VolumeCalibration, histograms: torch.Tensor, voxel_ml: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of :func:`cross_fit` for new subjects, from a stored calibration (its own method)."""
    volume, low, high = calibration.quote(histograms.double(), voxel_ml.double())
    return {"volume_quote_ml": volume, "volume_low_ml": low, "volume_high_ml": high,
            "volume_sd_ml": poisson_binomial_sd(histograms, voxel_ml)}


def verdict(temperature: list[float], platt_slope: list[float], platt_bias: list[float],
            soft_bias_history: list[float], method: str, calibration: VolumeCalibration | None = None
            ) -> tuple[str, bool, bool | None]:
    """One line on whether the model's soft volume can be quoted as it is, and what to do if
    not; and the two findings: calibrated (``|T − 1|`` and ``|b|`` ≤ :data:`CALIBRATED_WITHIN`
    for every class), settled (the soft-volume bias moved ≤ :data:`SETTLED_WITHIN` over the last
    :data:`SETTLED_VALIDATIONS` validations; None with fewer validations). ``calibration``: the
    recalibration a user would quote; where its subjects fix the volume only to more than
    ±:data:`PINNED_WITHIN` (:func:`recalibration_uncertainty`), the advice says it is no surer
    than the soft volume as it comes."""
    worst_t = max(abs(t - 1) for t in temperature)
    worst_b = max(abs(b) for b in platt_bias)
    calibrated = worst_t <= CALIBRATED_WITHIN and worst_b <= CALIBRATED_WITHIN
    recent = [v for v in soft_bias_history[-SETTLED_VALIDATIONS:] if math.isfinite(v)]
    moved = max(recent) - min(recent) if len(recent) == SETTLED_VALIDATIONS else None
    settled = None if moved is None else moved <= SETTLED_WITHIN
    fit = "T " + "/".join(f"{t:.3g}" for t in temperature) + ", Platt a " + "/".join(f"{a:.3g}" for a in platt_slope) \
        + " b " + "/".join(f"{b:+.3g}" for b in platt_bias)
    trend = ("not enough validations to tell whether the soft-volume bias has settled" if settled is None else
             f"soft-volume bias {'settled' if settled else 'still moving'} ({100 * moved:.1f} points over the last "
             f"{SETTLED_VALIDATIONS} validations)")
    if calibrated and settled is not False:
        advice = "the soft volume can be quoted as it is"
    elif not calibrated and settled is not False:
        advice = f"NOT CALIBRATED (|T − 1| {worst_t:.3f}, |b| {worst_b:.3f} > {CALIBRATED_WITHIN}): "
        uncertainty = math.nan if calibration is None or calibration.uncertainty is None else float(calibration.uncertainty.max())
        if uncertainty > PINNED_WITHIN:
            advice += (f"but the {calibration.subjects} calibration subjects' references fix a recalibrated volume only to "
                       f"±{100 * uncertainty:.0f} % (> {100 * PINNED_WITHIN:.0f} %), so the recalibration is no surer than Σp: "
                       "add calibration subjects (data.val_fraction) before quoting it, or quote calibration=none if the model "
                       "has trained to convergence")
        else:
            advice += f"quote the recalibrated volume (predict.py applies the stored {method} map) or train longer"
    else:
        advice = ("NOT SETTLED: train longer (trainer.max_epochs, data.steps_per_epoch)" +
                  ("" if calibrated else f"; not calibrated either (|T − 1| {worst_t:.3f}, |b| {worst_b:.3f})"))
    return f"calibration: {fit}; {trend}: {advice}", calibrated, settled

