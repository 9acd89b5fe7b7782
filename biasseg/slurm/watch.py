"""Say what submitted SLURM jobs are doing while a sweep waits for them.

Every ``poll_s`` the jobs' states and pending reasons are read (``squeue -r`` while SLURM
holds a job, submitit's ``sacct`` watcher after); a job whose state or reason changed gets a
line at once, and every job a line at least every ``report_every_s``. A job that fails gets
the tail of its log and its run directory. When every job has ended, one line per job:
state, run directory, ``val/dice``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "UNKNOWN")
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
LOG_TAIL_LINES = 20
UNKNOWN_POLLS = 6  # a job gone from the queue that accounting does not know either has ended after this many polls


@dataclass
class Watched:
    """One submitted job (a submitit ``Job``) and where its run writes."""

    job: Any
    run_dir: Path
    state: str = "SUBMITTED"
    reason: str = ""
    ended: bool = False
    unknown_polls: int = 0  # polls in a row with the job neither queued nor accounted


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of the jobs SLURM still holds (array tasks one by one)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return {}
    states = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], "" if parts[2] in ("None", "(null)") else parts[2])
    return states


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} cannot be read)"


def dice(run_dir: Path) -> str:
    try:
        return f"{float(json.loads((run_dir / 'metrics.json').read_text())['val/dice']):.4f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "—"


def describe(item: Watched) -> str:
    reason = f" ({item.reason})" if item.reason and item.state == "PENDING" else ""
    return f"job {item.job.job_id}: {item.state}{reason}; log {item.job.paths.stdout}; run {item.run_dir}"


def watch(jobs: Sequence[Any], run_dirs: Sequence[Path], poll_s: float = 10.0, report_every_s: float = 60.0,
          say: Callable[[str], None] = log.info) -> list[Watched]:
    """Follow ``jobs`` (submitit jobs, with their ``run_dirs``) until all have ended, saying
    what they do (module docstring); the watched jobs, in order."""
    watched = [Watched(job, Path(run_dir)) for job, run_dir in zip(jobs, run_dirs)]
    say(f"submitted {len(watched)} job(s): {', '.join(w.job.job_id for w in watched)}; their states follow")
    last_report = time.monotonic()
    while True:
        held = queue_states([w.job.job_id for w in watched if not w.ended])
        changed = []
        for item in watched:
            if item.ended:
                continue
            state, reason = held.get(item.job.job_id, (None, ""))
            if state is None:  # SLURM's queue no longer holds it: accounting (sacct, through submitit)
                state = base_state(item.job.watcher.get_state(item.job.job_id, mode="force"))
                item.unknown_polls = item.unknown_polls + 1 if state == "UNKNOWN" else 0
                if state == "UNKNOWN" and (item.job.paths.result_pickle.exists() or item.unknown_polls >= UNKNOWN_POLLS):
                    state = "ENDED"  # no accounting (sacct): left the queue, with or without submitit's result file
                item.ended = state not in ACTIVE_STATES
            if (state, reason) != (item.state, item.reason):
                item.state, item.reason = state, reason
                changed.append(item)
        now = time.monotonic()
        shown = watched if now - last_report >= report_every_s else changed
        for item in shown:
            say(describe(item))
            if item.ended and item.state in FAILED_STATES:
                say(f"job {item.job.job_id} ended {item.state}; run {item.run_dir}; the end of {item.job.paths.stderr}:\n"
                    + log_tail(item.job.paths.stderr))
        if shown is watched:
            last_report = now
        if all(item.ended for item in watched):
            break
        time.sleep(poll_s)
    for item in watched:
        say(f"job {item.job.job_id}: {item.state:<10} {item.run_dir}  val/dice {dice(item.run_dir)}")
    return watched


def base_state(state: str) -> str:
    """``CANCELLED by 0`` → ``CANCELLED``."""
    return re.split(r"\s", state.strip(), maxsplit=1)[0] if state.strip() else state
