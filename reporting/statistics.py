"""Statistics over runs and subjects: seed averaging, mean ± sd, the paired Wilcoxon test,
and pooling reliability bins."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_PAIRS = 5  # fewer paired subjects give no p-value


def subject_means(per_run: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each subject's value averaged over runs (seeds), NaNs skipped (NaN if all are)."""
    collected: dict[str, list[float]] = {}
    for values in per_run:
        for subject, value in values.items():
            collected.setdefault(subject, []).append(value)
    return {s: _nanmean(v) for s, v in collected.items()}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (sd NaN below two values)."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


@dataclass(frozen=True)
class PairedTest:
    """``values − reference`` over the subjects both have: the number of pairs, the mean
    difference and the two-sided Wilcoxon signed-rank p-value (NaN with fewer than
    ``MIN_PAIRS`` pairs or when every difference is zero)."""

    pairs: int
    mean_difference: float
    p_value: float


def paired_wilcoxon(values: dict[str, float], reference: dict[str, float], min_pairs: int = MIN_PAIRS) -> PairedTest:
    """Pair ``values`` with ``reference`` by subject (finite on both sides) and test them."""
    differences = np.array([values[s] - reference[s] for s in values
                            if s in reference and not math.isnan(values[s]) and not math.isnan(reference[s])])
    if differences.size == 0:
        return PairedTest(0, math.nan, math.nan)
    mean = float(differences.mean())
    if differences.size < min_pairs or not differences.any():
        return PairedTest(int(differences.size), mean, math.nan)
    return PairedTest(int(differences.size), mean, float(stats.wilcoxon(differences).pvalue))


def pooled_reliability(tables: Iterable[list[dict]]) -> list[tuple[float, float, float]]:
    """Reliability bins pooled over runs and classes: ``(count, mean probability, observed
    frequency)`` per bin, ordered by the bin's lower edge; empty bins left out."""
    sums: dict[tuple[float, float], list[float]] = {}
    for table in tables:
        for row in table:
            count = row["count"]
            if not count or math.isnan(count) or math.isnan(row["mean_probability"]) or math.isnan(row["frequency"]):
                continue
            bin_sums = sums.setdefault((round(row["lower"], 6), round(row["upper"], 6)), [0.0, 0.0, 0.0])
            bin_sums[0] += count
            bin_sums[1] += count * row["mean_probability"]
            bin_sums[2] += count * row["frequency"]
    return [(n, p / n, y / n) for _, (n, p, y) in sorted(sums.items())]
