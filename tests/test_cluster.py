"""Cluster behaviour on one machine: SIGTERM + resume, auto-resume, submitit multirun."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY

RUN = [o for o in TINY if not o.startswith(("trainer.max_epochs", "data.samples_per_volume"))] + [
    "trainer.max_epochs=10", "data.samples_per_volume=16", "callbacks.validation_figures=null",
]  # 4 subjects x 16 patches / batch 2 = 32 steps per epoch


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_epochs(run_dir) -> list[int]:
    """Epochs of the rows holding the epoch's training loss in csv/metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [int(r["epoch"]) for r in csv.DictReader(handle) if r.get("train/loss")]


def test_sigterm_saves_last_checkpoint_and_the_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert "SIGTERM: saved" in output, output[-3000:]
    stopped = torch.load(last, weights_only=False)
    assert 32 <= stopped["global_step"] < 320
    # the same command again: auto_resume continues from the run directory's last.ckpt
    again = start(run_dir)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output[-3000:]
    assert "Resuming from" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["global_step"]) == (9, 320)  # as an uninterrupted run: 10 epochs x 32 steps
    assert logged_epochs(run_dir) == list(range(10))  # every epoch logged once: nothing lost, nothing twice


def test_submitit_local_runs_a_two_job_multirun(tmp_path):
    overrides = [o for o in TINY] + ["callbacks.validation_figures=null"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", "loss=ce,softdice", *overrides,
         f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = sorted((tmp_path / "logs").rglob("metrics.json"))
    assert [m.parent.name for m in metrics] == ["0", "1"]
    losses = ["loss=softdice" in (m.parent / ".hydra" / "overrides.yaml").read_text() for m in metrics]
    assert losses == [False, True]


def test_auto_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    """Two runs inside one SLURM job share the job-id run directory: the second must not
    silently continue the first."""
    from conftest import compose_config
    from train import train

    train(compose_config(TINY, tmp_path))
    with pytest.raises(ValueError, match="another configuration.*seed"):
        train(compose_config(TINY + ["seed=7"], tmp_path))
