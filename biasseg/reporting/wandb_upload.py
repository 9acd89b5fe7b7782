"""Send a report to wandb, beside the runs it compares (``report.py DIR --logger wandb``).

One wandb run (``job_type="report"``) holds ``results`` (results.csv as a ``wandb.Table``,
sortable by task, loss and every measure), ``subjects`` (subjects.csv: every run's per-subject
values) and every figure as an image. ``WANDB_MODE`` is respected (``offline`` writes the run
into ``<output>/wandb/``, to ``wandb sync`` later).
"""

from __future__ import annotations

import math
from pathlib import Path


def _cell(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


def upload_report(rows: list[dict], subject_rows: list[dict], figures: list[tuple[str, str, str]], folder: Path,
                  project: str = "biasseg", group: str | None = None) -> str:
    """Log the report; returns the wandb run's id."""
    import wandb

    run = wandb.init(project=project, job_type="report", group=group or folder.name, name=f"report/{folder.name}",
                     dir=str(folder), config={"report_folder": str(folder)})
    try:
        for key, table in (("results", rows), ("subjects", subject_rows)):
            if table:
                columns = list(table[0])
                run.log({key: wandb.Table(columns=columns, data=[[_cell(r[c]) for c in columns] for r in table])})
        run.log({f"figures/{Path(name).stem}": wandb.Image(str(folder / name), caption=f"{title}: {caption}")
                 for name, title, caption in figures})
        return run.id
    finally:
        run.finish()
