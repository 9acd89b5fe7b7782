"""Statistics over training runs (seeds) and subjects.

The unit of a comparison between losses is the **training run**: two networks trained with
the same loss but another seed differ, and a claim about a loss must hold over that
variation, not only over the validation subjects of one network. So (a two-stage, "summary
statistics" analysis of the nested data, equivalent to a mixed model with a random seed
effect when every run is validated on the same subjects, as here):

1. each run is summarised by the mean of a measure over its subjects;
2. a loss is described by the mean and the sample sd of those run means over its seeds;
3. a loss is compared with cross-entropy by Welch's t-test on the two sets of run means (no
   p-value with fewer than two runs on either side); the subjects' own spread is shown
   beside, but it is not what the test is about;
4. every p-value of a report is corrected for multiple comparisons with Holm's step-down
   method (family: all tests the report makes), and both the raw and the corrected values
   are written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_RUNS = 2  # runs per side needed for a test


def finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if not math.isnan(float(v))]


def nanmean(values: Iterable[float]) -> float:
    kept = finite(values)
    return sum(kept) / len(kept) if kept else math.nan


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (sd NaN below two values)."""
    kept = np.array(finite(values), dtype=float)
    if kept.size == 0:
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std(ddof=1)) if kept.size > 1 else math.nan


def subject_means(per_run: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each subject's value averaged over runs (seeds), NaNs skipped (NaN if all are)."""
    collected: dict[str, list[float]] = {}
    for values in per_run:
        for subject, value in values.items():
            collected.setdefault(subject, []).append(value)
    return {s: nanmean(v) for s, v in collected.items()}


@dataclass(frozen=True)
class RunTest:
    """A loss against the reference over training runs: the number of runs on each side, the
    difference of the means of the run means, Welch's two-sided p-value (NaN with fewer than
    ``MIN_RUNS`` runs on a side or no spread at all) and, once :func:`holm` has seen the
    report's family of tests, the Holm-corrected p-value."""

    runs: int
    reference_runs: int
    difference: float
    p_value: float


def welch_test(run_means: Iterable[float], reference_run_means: Iterable[float]) -> RunTest:
    """Welch's t-test of the run means of a loss against those of the reference."""
    values, reference = finite(run_means), finite(reference_run_means)
    if not values or not reference:
        return RunTest(len(values), len(reference), math.nan, math.nan)
    difference = float(np.mean(values) - np.mean(reference))
    if len(values) < MIN_RUNS or len(reference) < MIN_RUNS or (np.ptp(values) == 0 and np.ptp(reference) == 0):
        return RunTest(len(values), len(reference), difference, math.nan)
    p = float(stats.ttest_ind(values, reference, equal_var=False).pvalue)
    return RunTest(len(values), len(reference), difference, p)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (NaNs stay NaN and are not counted)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[i] = running
    return adjusted


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
