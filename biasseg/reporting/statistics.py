"""Statistics over training runs (seeds) and subjects.

The aggregation itself (run means, mean and sd over runs) is pandas' groupby in
:mod:`biasseg.reporting.table`; here are what pandas does not do: Welch's test on run means
with this module's rules for too few runs (scipy), Holm's step-down correction (scipy has
only Benjamini-Hochberg/Yekutieli; statsmodels, which has Holm, is not a dependency), and the
small helpers the figures use.

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
import pandas as pd
from scipy import stats

MIN_RUNS = 2  # runs per side needed for a test


def finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if not math.isnan(float(v))]


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (sd NaN below two values)."""
    kept = np.array(finite(values), dtype=float)
    if kept.size == 0:
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std(ddof=1)) if kept.size > 1 else math.nan


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
    columns = ["lower", "upper", "count", "mean_probability", "frequency"]
    bins = pd.DataFrame([{c: row[c] for c in columns} for table in tables for row in table], columns=columns, dtype=float).dropna()
    bins = bins[bins["count"] > 0].round({"lower": 6, "upper": 6})
    bins = bins.assign(probability=bins["count"] * bins["mean_probability"], observed=bins["count"] * bins["frequency"])
    sums = bins.groupby(["lower", "upper"])[["count", "probability", "observed"]].sum()
    return [(n, p / n, y / n) for n, p, y in sums.itertuples(index=False)]
