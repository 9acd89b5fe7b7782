"""The cluster path against a real SLURM scheduler (``.ci/run`` starts a one-node cluster with
``../shared/slurm/start.sh``): a Hydra sweep through hydra/launcher=slurm, a time-limit
preemption requeued by submitit, ``scontrol requeue`` of the sbatch example, DDP over two
``srun`` tasks, and one wandb run across a requeue.

Every job trains the tiny configuration on the CPU with one thread (OMP_NUM_THREADS=1, as the
reference runs in this process), so an interrupted and resumed run can be compared with an
uninterrupted one number for number. Where SLURM is not running these tests are skipped, with
the reason.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, TINY_RUN
from single_process import assert_distributed_run_matches_one_process
from wandb_files import wandb_records

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
QUIET = ["callbacks.validation_figures=null", "data.num_workers=0"]
SMALL_JOB = ["hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


def slurm_problem() -> str | None:
    """Why no SLURM cluster can be used here, or None."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM's commands are not installed (start a cluster with ../shared/slurm/start.sh; .ci/run does)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer: slurmctld is not running (../shared/slurm/start.sh starts it)"
    if states.returncode != 0 or not any(s in states.stdout for s in ("idle", "mixed", "allocated")):
        return f"no usable SLURM node (sinfo: {states.stdout.strip() or states.stderr.strip()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    problem = slurm_problem()
    if problem:
        pytest.skip(problem)


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, **THREADS, **extra}


def job_state(job_id: str) -> str:
    """The job's state (scontrol while SLURM remembers it, else sacct)."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    match = re.search(r"JobState=(\w+)", shown.stdout)
    if match:
        return match.group(1)
    accounted = subprocess.run(["sacct", "-X", "-n", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return accounted.stdout.split()[0] if accounted.stdout.split() else "UNKNOWN"


def wait_for(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(job_id: str) -> str | None:
    state = job_state(job_id)
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None


def sbatch(run_args: list[str], sbatch_args: list[str], output: Path, **env: str) -> str:
    """Submit scripts/train_ddp.sbatch from the project folder on the CPU; the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20", f"--output={output}",
         *sbatch_args, "scripts/train_ddp.sbatch", *run_args],
        cwd=ROOT, capture_output=True, text=True, env=environment(**env), timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def validated_epoch(run_dir: Path) -> int:
    """The last validated epoch of a running run (-1 before the first)."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


def logged_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [int(r["epoch"]) for r in csv.DictReader(handle) if r.get("train/loss")]


def reference_run(overrides: list[str], run_dir: Path) -> dict:
    """The same configuration uninterrupted, in a local process: its metrics.json."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, capture_output=True, text=True, env=environment(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_final_validation(resumed: dict, uninterrupted: dict) -> None:
    """Same length and the same numbers: the resumed run restores weights, optimiser state and
    the patch stream's position exactly, and both use one CPU thread, so the arithmetic is the
    same; 1e-6 relative only absorbs last-bit differences a library may make between processes."""
    assert (resumed["epoch"], resumed["global_step"]) == (uninterrupted["epoch"], uninterrupted["global_step"])
    for key in ("val/dice", "val/soft_volume_bias_ml", "val/volume_bias_ml", "val/ece"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key


def test_a_sweep_through_the_slurm_launcher_runs_each_point_as_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *SMALL_JOB, "hydra.launcher.timeout_min=15",
         "loss=ce,softdice", *TINY, *QUIET, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, env=environment(), timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["epoch"] == 0 and (sweep / job / "subjects.csv").is_file()
    # submitit submits a sweep as one array job, a task per sweep point
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and tasks[0].split("_")[0] == tasks[1].split("_")[0]
    # submitit returns once a task's result is written; SLURM may still hold the task as RUNNING or
    # COMPLETING for a few seconds (epilog, accounting), so wait for its final state
    assert [wait_for(lambda: finished(task), 120, f"task {task} to end") for task in tasks] == ["COMPLETED"] * 2
    report = subprocess.run([sys.executable, str(ROOT / "report.py"), str(sweep), "--no-theory"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    with open(sweep / "report" / "results.csv") as handle:
        assert sorted(r["loss"] for r in csv.DictReader(handle)) == ["ce", "softdice"]


def sweep_command(sweep: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *overrides, f"hydra.sweep.dir={sweep}"]


def test_a_request_the_partition_cannot_hold_is_refused_before_submitting(tmp_path):
    """The launcher's defaults (8 CPUs, 64 GB per job) on the 2-CPU partition: refused in one
    line naming the key and what fits, within seconds, and nothing is submitted."""
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    started = time.time()
    result = subprocess.run(sweep_command(tmp_path / "sweep", "hydra.launcher.partition=debug", "loss=ce,softdice", *TINY),
                            cwd=tmp_path, capture_output=True, text=True, env=environment(), timeout=120)
    assert time.time() - started < 60
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    cpus = re.search(r"(\d+) CPUs per node", errors[0] if errors else "")
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("error: hydra.launcher.cpus_per_task=8 > ") and " in partition debug; use hydra.launcher." \
        "cpus_per_task=" in errors[0] and cpus, errors[0]
    assert not (tmp_path / "sweep" / ".submitit").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() == queued
    # what the line says fits, fits as far as the CPUs go: the next misfit named is the memory
    fitted = subprocess.run(sweep_command(tmp_path / "sweep", "hydra.launcher.partition=debug",
                                          f"hydra.launcher.cpus_per_task={cpus.group(1)}", "loss=ce", *TINY),
                            cwd=tmp_path, capture_output=True, text=True, env=environment(), timeout=120)
    assert fitted.returncode == 1 and "error: hydra.launcher.mem_gb=64 > " in fitted.stderr, fitted.stderr[-2000:]


def test_a_waiting_sweep_prints_each_jobs_state_and_pending_reason_then_one_line_per_job(tmp_path):
    """A job holding both CPUs keeps the sweep's jobs pending: their reason is printed while
    they wait; once it is cancelled they run, and the sweep ends with one line per job."""
    blocker = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-c", "2", "--time=10", f"--output={tmp_path / 'blocker.out'}",
                              "--wrap", "sleep 300"], capture_output=True, text=True, timeout=60).stdout.strip()
    try:
        wait_for(lambda: job_state(blocker) == "RUNNING", 60, f"the blocking job {blocker} to start")
        sweep = tmp_path / "sweep"
        process = subprocess.Popen(
            sweep_command(sweep, *SMALL_JOB, "hydra.launcher.timeout_min=15", "hydra.launcher.poll_s=1",
                          "hydra.launcher.report_every_s=5", "loss=ce,softdice", *TINY, *QUIET),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment())
        lines = []
        for line in process.stdout:  # the launcher logs to the console as it goes
            lines.append(line)
            if re.search(r"job \d+_\d: PENDING \((Resources|Priority)\); log .*_log\.out; run .*sweep/\d", line):
                break
        subprocess.run(["scancel", blocker], timeout=30)
        lines += process.stdout.readlines()
        assert process.wait(timeout=600) == 0, "".join(lines)[-3000:]
    finally:
        subprocess.run(["scancel", blocker], timeout=30)
    output = "".join(lines)
    assert re.search(r"PENDING \((Resources|Priority)\)", output), output[-3000:]
    assert re.search(r"job \d+_0: RUNNING", output), output[-3000:]
    final = re.findall(r"job (\d+_\d): COMPLETED +(\S+) +val/dice (0\.\d{4})", output)
    assert sorted(Path(run).name for _, run, _ in final) == ["0", "1"], output[-3000:]


def test_a_failing_jobs_error_reaches_the_terminal(tmp_path):
    """A job that fails (its dataset folder does not exist) ends FAILED, and the terminal shows
    its run directory and the end of its log, with the job's own error line."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        sweep_command(sweep, *SMALL_JOB, "hydra.launcher.timeout_min=15", "hydra.launcher.poll_s=1", "data=folder",
                      f"data.root={tmp_path / 'no_such_dataset'}", *TINY_RUN),
        cwd=tmp_path, capture_output=True, text=True, env=environment(), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # one sweep point: submitit submits a plain job (id N), not an array (N_0)
    assert re.search(rf"job \d+(?:_0)? ended FAILED; run {re.escape(str(sweep / '0'))}; the end of \S+_log\.err:", output), output[-3000:]
    assert "no_such_dataset" in output.split("ended FAILED", 1)[1], output[-3000:]
    assert re.search(r"job \d+(?:_0)?: FAILED +\S+ +val/dice —", output), output[-3000:]
    assert re.search(r"error: 1 of 1 job\(s\) failed: \d+", result.stderr) and "Traceback" not in output, output[-3000:]


def test_a_job_past_its_time_limit_is_requeued_by_submitit_and_ends_as_an_uninterrupted_run(tmp_path):
    """timeout_min=3 with the signal 100 s before: SLURM sends USR1 20-80 s into the job,
    submitit requeues it (and exits it), the requeued job continues from the sweep folder's
    last.ckpt (written at every epoch end) through auto_resume."""
    overrides = [o for o in TINY if not o.startswith(("trainer.max_epochs", "data.samples_per_volume"))] + [
        "trainer.max_epochs=30", "data.samples_per_volume=64", *QUIET]  # ~1.5-2 min: longer than the signal's 80 s
    sweep = tmp_path / "sweep"
    started = time.time()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *SMALL_JOB, "hydra.launcher.timeout_min=3",
         "hydra.launcher.signal_delay_s=100", "hydra.launcher.max_num_timeout=5", *overrides, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, env=environment(), timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs or "requeued" in logs.lower(), logs[-3000:]
    assert "Resuming from" in (sweep / "0" / "train.log").read_text()
    assert logged_epochs(sweep / "0") == list(range(30))  # every epoch logged once across the requeues
    resumed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert_same_final_validation(resumed, reference_run(overrides, tmp_path / "reference"))
    print(f"time-limit preemption test: {time.time() - started:.0f} s")


def test_scontrol_requeue_continues_the_sbatch_job_in_its_run_directory_with_one_wandb_run(tmp_path):
    """`scontrol requeue` of the running sbatch example: SLURM sends SIGTERM, the run saves
    last.ckpt at that step and exits; the job starts again with the same id, in the same run
    directory, resumes there, and its offline wandb run keeps one id with every step once."""
    overrides = [o for o in TINY if not o.startswith(("trainer.max_epochs", "data.samples_per_volume"))] + [
        "trainer.max_epochs=30", "data.samples_per_volume=16", *QUIET, "logger=csv_wandb",
        f"paths.log_dir={tmp_path / 'logs'}"]  # 30 epochs: still running when the requeue comes, also on a busy machine
    job = sbatch(overrides, ["--ntasks-per-node=1"], tmp_path / "slurm-%j.out", BIASSEG_TRAINER="cpu", WANDB_MODE="offline")
    run_dir = tmp_path / "logs" / "train" / "runs" / job
    wait_for(lambda: validated_epoch(run_dir) >= 2, 600, "three validated epochs", poll=0.25)
    time.sleep(3)  # wandb writes its records every 2 s (configs/logger/wandb.yaml); SIGTERM kills its service too
    assert job_state(job) == "RUNNING", f"job {job} ended before its requeue: {job_state(job)}"
    requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr
    state = wait_for(lambda: finished(job), 900, f"job {job} to end after its requeue", poll=2)
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", output[-3000:]
    assert "SIGTERM: saved" in output and "Resuming from" in output, output[-3000:]
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
    assert sorted(p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()) == [job]  # no second run folder
    assert logged_epochs(run_dir) == list(range(30))
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert_same_final_validation(resumed, reference_run([o for o in overrides if not o.startswith(("logger=", "paths."))] + [
        "trainer=cpu", "logger=csv"], tmp_path / "reference"))
    assert_one_wandb_run(run_dir, job)


def assert_one_wandb_run(run_dir: Path, run_id: str) -> None:
    """Both starts of the job wrote offline runs with the job id, and together they log each
    validation step once, the second continuing after the first (the first holds what wandb
    had written before the SIGTERM: every validation but those of its last 2 s)."""
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2, segments
    steps = []
    for segment in segments:
        logged = []
        for record in wandb_records(next(segment.glob("run-*.wandb"))):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                if "val/dice" in items:
                    logged.append(int(float(items["trainer/global_step"])))
        steps.append(logged)
    assert len(steps[0]) >= 3 and steps[1] and max(steps[0]) < min(steps[1]), steps
    assert len(set(steps[0] + steps[1])) == len(steps[0] + steps[1])


def test_ddp_over_two_srun_tasks_validates_like_one_process(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("data.num_val", "trainer.max_epochs"))] + [
        "data.num_val=3", "trainer.max_epochs=2", *QUIET, f"paths.log_dir={tmp_path / 'logs'}"]
    job = sbatch(overrides, ["--ntasks-per-node=2"], tmp_path / "slurm-%j.out", BIASSEG_TRAINER="ddp_cpu")
    state = wait_for(lambda: finished(job), 900, f"job {job}", poll=2)
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", output[-3000:]
    run_dir = tmp_path / "logs" / "train" / "runs" / job
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Lightning took the ranks from SLURM: 4 subjects over 2 tasks x 2 patches / batch 2 = 2 steps per epoch
    assert (metrics["epoch"], metrics["global_step"]) == (1, 4)
    assert "GLOBAL_RANK: 1" in output or "global rank 1" in output.lower() or "rank: 1" in output, output[-3000:]
    assert_distributed_run_matches_one_process(run_dir, [o for o in overrides if not o.startswith("paths.")],
                                               tmp_path / "single", ["synthetic_004", "synthetic_005", "synthetic_006"])
