"""Summarise evaluate.py outputs (ensembles, one folder per seed) as a markdown table, mean ± sd
over the folders of each group.

    python scripts/summarise_evaluations.py results/ensembles

Every folder below the given ones holding ``metrics.json`` and ``subjects.csv`` is one
evaluation; its group is its path relative to the given folder without a trailing
``seed<k>`` (``multi_rater/tversky/seed0`` and ``…/seed1`` are two seeds of
``multi_rater/tversky``). report.py compares training runs (it needs their loss config); an
evaluate.py output has none, so this script reads the same files with the same measures
(``reporting.measures``: ratios of sums, per-subject means) and prints what RESULTS.md quotes.
Columns a group lacks (no raters, no expected volume) are left empty.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from biasseg.reporting.measures import pooled_measures, subject_measures
from biasseg.reporting.runs import read_columns

COLUMNS = (  # (header, source, key, percent): source "metrics" (metrics.json), "subjects" (per-subject mean), "pooled"
    ("Dice", "metrics", "val/dice", False),
    ("mean Dice vs each rater", "metrics", "val/dice_raters_mean", False),
    ("soft vs expected, ratio of sums", "pooled", "pooled_relative_soft_expected_volume_bias", True),
    ("argmax vs expected, ratio of sums", "pooled", "pooled_relative_expected_volume_bias", True),
    ("soft vs expected, mean of ratios", "subjects", "relative_soft_expected_volume_bias", True),
    ("argmax within raters' range", "metrics", "val/within_rater_range", False),
    ("pooled ECE", "metrics", "val/ece", False),
    ("top-label ECE", "metrics", "val/ece_top_label", False),
    ("GED", "metrics", "val/ged", False),
    ("fitted T", "metrics", "val/temperature", False),
    ("Platt-scaled soft vs expected, mean of ratios", "subjects", "platt_relative_expected_volume_bias", True),
)


def evaluation(folder: Path) -> dict[str, float]:
    """One evaluate.py output's values of :data:`COLUMNS` (NaN where absent)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    subjects = read_columns(folder / "subjects.csv")
    pooled, per_subject = pooled_measures(subjects), subject_measures(subjects)
    values = {}
    for header, source, key, _ in COLUMNS:
        if source == "metrics":
            value = metrics.get(key, math.nan)
        elif source == "pooled":
            value = pooled.get(key, math.nan)
        else:
            column = [v for v in per_subject.get(key, {}).values() if not math.isnan(v)]
            value = statistics.fmean(column) if column else math.nan
        values[header] = float(value) if isinstance(value, (int, float)) else math.nan
    return values


def cell(values: list[float], percent: bool) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return ""
    scale, unit = (100, " %") if percent else (1, "")
    mean = statistics.fmean(values) * scale
    text = f"{mean:+.1f}" if percent else f"{mean:.4g}"
    if len(values) > 1:
        sd = statistics.stdev(values) * scale
        text += f" ± {sd:.1f}" if percent else f" ± {sd:.2g}"
    return text + unit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding evaluate.py outputs")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict[str, float]]] = {}
    for root in args.folders:
        for metrics in sorted(root.rglob("metrics.json")):
            folder = metrics.parent
            if not (folder / "subjects.csv").is_file():
                continue
            relative = folder.relative_to(root).as_posix()
            name = re.sub(r"(^|/)seed\d+$", "", relative) or root.name
            try:
                groups.setdefault(name, []).append(evaluation(folder))
            except (OSError, ValueError) as error:
                print(f"error: {folder}: unreadable evaluation ({error})", file=sys.stderr)
                return 1
    if not groups:
        print(f"error: no evaluate.py output (metrics.json with subjects.csv) below {', '.join(map(str, args.folders))}",
              file=sys.stderr)
        return 1
    print("| evaluation | n | " + " | ".join(header for header, *_ in COLUMNS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |")
    for name, rows in groups.items():
        cells = [cell([r[header] for r in rows], percent) for header, _, _, percent in COLUMNS]
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
