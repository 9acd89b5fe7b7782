"""Compare the losses of finished training runs: a table, figures and report.md.

    python report.py logs/high_uncertainty/multiruns/2026-01-01_12-00-00
    python report.py SWEEP_A SWEEP_B --output comparison --no-theory
    python report.py SWEEP logger=wandb          # also to a wandb run beside the training runs

Every folder under the given directories that holds ``.hydra/config.yaml`` is a run. Runs
form one row per task × loss (seeds pooled, see reporting.grouping); incomplete or failed
runs are listed with the reason and left out. Writes into ``--output`` (default
``<DIR>/report``, or ``<common parent>/report`` for several directories): results.csv (per
task × loss: mean and sd over seeds, run-level tests against cross-entropy, Holm-corrected),
subjects.csv (every run's per-subject values, from which every number can be recomputed),
history.csv (every run's validations during training: Dice and volume biases per step),
report.md and PNG figures. Exit status 1 when no run is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from biasseg.reporting.grouping import group_runs
from biasseg.reporting.lesion_report import lesion_section
from biasseg.reporting.markdown import report_markdown
from biasseg.reporting.plots import write_figures
from biasseg.reporting.runs import find_run_dirs, read_run
from biasseg.reporting.table import HISTORY_COLUMNS, SUBJECT_COLUMNS, history_rows, result_rows, subject_rows, write_csv
from biasseg.reporting.theory_link import Theory
from biasseg.reporting.wandb_upload import upload_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # "logger=wandb", as the other entry points spell it, is --logger wandb
    argv = [part for a in (sys.argv[1:] if argv is None else argv)
            for part in (["--logger", a.split("=", 1)[1]] if a.startswith("logger=") else [a])]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep directories, run directories, or folders of them")
    parser.add_argument("--output", type=Path, help="report folder (default: <DIR>/report)")
    parser.add_argument("--no-theory", action="store_true",
                        help="skip the theory's predicted bias (up to ~30 s per task × loss)")
    parser.add_argument("--include-incomplete", action="store_true",
                        help="also tabulate runs stopped before their last epoch (their latest validation)")
    parser.add_argument("--logger", choices=("none", "wandb"), default="none",
                        help="also log the tables and figures to a wandb run (job_type=report; WANDB_MODE is respected)")
    parser.add_argument("--wandb-project", default="biasseg", help="wandb project of the report run")
    return parser.parse_args(argv)


def default_output(dirs: list[Path]) -> Path:
    return Path(os.path.commonpath([d.resolve() for d in dirs])) / "report"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 1
    run_dirs = find_run_dirs(args.dirs)
    if not run_dirs:
        print(f"error: no run directory (one holding .hydra/config.yaml) under {', '.join(map(str, args.dirs))}",
              file=sys.stderr)
        return 1
    runs = [read_run(path) for path in run_dirs]
    usable = [r for r in runs if r.problem is None and (r.complete or args.include_incomplete)]
    excluded = [r for r in runs if r.problem is not None or not (r.complete or args.include_incomplete)]
    for run in excluded:
        print(f"left out {run.path}: {run.exclusion}", file=sys.stderr)
    for run in runs:
        for warning in run.warnings:
            print(f"warning {run.path}: {warning}", file=sys.stderr)
    if not usable:
        print(f"error: none of the {len(runs)} run(s) found is complete; nothing to report", file=sys.stderr)
        return 1
    print(f"{len(usable)} of {len(runs)} run(s) reported", file=sys.stderr)
    output = args.output or default_output(args.dirs)
    output.mkdir(parents=True, exist_ok=True)
    groups = group_runs(usable)
    theory = Theory(enabled=not args.no_theory)
    rows = result_rows(groups, theory)
    write_csv(rows, output / "results.csv")
    per_subject = subject_rows(groups, output)
    write_csv(per_subject, output / "subjects.csv", SUBJECT_COLUMNS)
    write_csv(history_rows(groups, output), output / "history.csv", HISTORY_COLUMNS)
    figures, notes = write_figures(groups, rows, theory, output)
    notes += theory.notes + [f"{run.path}: {w}" for run in runs for w in run.warnings]
    report = output / "report.md"
    report.write_text(report_markdown(rows, groups, excluded, figures, notes, output, lesion_section(groups, theory)))
    if args.logger == "wandb":
        run_id = upload_report(rows, per_subject, figures, output, project=args.wandb_project)
        print(f"wandb report run: {run_id}", file=sys.stderr)
    print(report)
    return 0


def cli() -> None:
    """``python report.py …`` and the console script ``biasseg-report``."""
    sys.exit(main())
