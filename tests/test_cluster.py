"""Cluster behaviour on one machine: SIGTERM + resume, auto-resume, submitit multirun."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, TINY

pytestmark = pytest.mark.slow  # every test here trains subprocesses or Trainers for many epochs

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
    stopped = torch.load(last, weights_only=True)
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
    from helpers import compose_config

    from biasseg.pipelines.train import train

    train(compose_config(TINY, tmp_path))
    with pytest.raises(ValueError, match="another configuration.*seed"):
        train(compose_config(TINY + ["seed=7"], tmp_path))


class BatchRecorder(pl.Callback):
    """Records ``(epoch, batch index, global step, hash of the batch)``. After global step
    ``stop_at`` it stops the run as SIGTERM would (Lightning's own flag), having first saved
    ``save_to`` there when set (a checkpoint written at a training batch's end, as
    ``ModelCheckpoint(every_n_train_steps=…)`` writes them)."""

    stop_at: int | None = None
    save_to: str | None = None
    rows: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.sha1(batch["image"]["data"].numpy().tobytes()).hexdigest()[:12]
        BatchRecorder.rows.append((trainer.current_epoch, batch_idx, trainer.global_step, digest))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == BatchRecorder.stop_at:
            if BatchRecorder.save_to:
                trainer.save_checkpoint(BatchRecorder.save_to, weights_only=False)
            trainer._signal_connector.received_sigterm = True


@pytest.mark.parametrize("workers,stop_at,saved_at", [(0, 21, "sigterm"), (2, 21, "sigterm"), (2, 16, "sigterm"),
                                                      (2, 21, "batch_end")])
def test_a_run_stopped_mid_epoch_resumes_with_the_same_batches_and_ends_identically(tmp_path, workers, stop_at, saved_at):
    """The patch stream continues exactly where the checkpoint stopped — also with persistent
    workers, when stopped after an epoch's last batch, and from a checkpoint written at a
    batch's end — so the resumed run trains on the batches an uninterrupted one would have,
    and ends with the same validation."""
    from helpers import compose_config
    from omegaconf import open_dict
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from biasseg.pipelines.train import train

    overrides = [o for o in TINY if not o.startswith(("trainer.max_epochs", "data.samples_per_volume", "data.num_workers"))]
    overrides += ["trainer.max_epochs=3", "data.samples_per_volume=8", f"data.num_workers={workers}", "callbacks.validation_figures=null"]

    def run(directory, stop_at, save_to=None, ckpt_path=None):
        cfg = compose_config(overrides + ([f"ckpt_path={ckpt_path}"] if ckpt_path else []), directory)
        with open_dict(cfg):
            cfg.callbacks.recorder = {"_target_": f"{__name__}.BatchRecorder"}
        BatchRecorder.stop_at, BatchRecorder.save_to, BatchRecorder.rows = stop_at, save_to, []
        try:
            train(cfg)
        except SIGTERMException:
            pass
        return BatchRecorder.rows

    uninterrupted = run(tmp_path / "full", None)
    if saved_at == "sigterm":  # the same command again: auto_resume from the run directory's last.ckpt
        first = run(tmp_path / "cut", stop_at)
        resumed = run(tmp_path / "cut", None)
    else:
        first = run(tmp_path / "cut", stop_at, save_to=str(tmp_path / "batch_end.ckpt"))
        resumed = run(tmp_path / "resumed", None, ckpt_path=tmp_path / "batch_end.ckpt")
    assert len(uninterrupted) == 48 and len(first) == stop_at
    assert first + resumed == uninterrupted  # same batches, same steps, nothing replayed or skipped
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = json.loads((tmp_path / ("cut" if saved_at == "sigterm" else "resumed") / "metrics.json").read_text())
    assert (cut["epoch"], cut["global_step"]) == (full["epoch"], full["global_step"]) == (2, 48)
    assert cut["val/dice"] == full["val/dice"] and cut["val/soft_volume_bias_ml"] == full["val/soft_volume_bias_ml"]
    # every epoch's training loss logged once, the interrupted one's over all its batches
    resumed_losses = epoch_losses(tmp_path / "cut")  # a new folder (batch_end) holds the epochs from the resume on
    resumed_losses.update(epoch_losses(tmp_path / "resumed") if saved_at == "batch_end" else {})
    assert resumed_losses == pytest.approx(epoch_losses(tmp_path / "full"), rel=1e-6)
    assert sorted(epoch_losses(tmp_path / "full")) == [0, 1, 2]


def epoch_losses(run_dir) -> dict[int, float]:
    """``train/loss`` per epoch from a run's metrics.csv."""
    losses = {}
    for path in [run_dir / "csv" / "metrics.csv"]:
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    assert int(row["epoch"]) not in losses, f"epoch {row['epoch']} logged twice in {path}"
                    losses[int(row["epoch"])] = float(row["train/loss"])
    return losses


class StopDuringLastValidation(pl.Callback):
    """Stops the run as SIGTERM would (Lightning's own flag) after the first subject of the last
    epoch's validation: Lightning then saves nothing of that validation."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1 and batch_idx == 0:
            trainer._signal_connector.received_sigterm = True


def test_a_run_stopped_during_its_last_validation_validates_when_resumed(tmp_path):
    """Every batch trained, the final validation cut short: the resumed run must still end with
    the final validation, not with the previous epoch's in metrics.json."""
    from helpers import compose_config
    from omegaconf import open_dict
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from biasseg.pipelines.train import train

    overrides = [o for o in TINY if not o.startswith(("trainer.max_epochs", "data.num_val"))]
    overrides += ["trainer.max_epochs=2", "data.num_val=3", "callbacks.validation_figures=null"]
    train(compose_config(overrides, tmp_path / "full"))
    cfg = compose_config(overrides, tmp_path / "cut")
    with open_dict(cfg):
        cfg.callbacks.stop = {"_target_": f"{__name__}.StopDuringLastValidation"}
    with pytest.raises(SIGTERMException):
        train(cfg)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["epoch"] == 0  # the last validation was lost
    train(compose_config(overrides, tmp_path / "cut"))  # the same command again: auto_resume
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert (cut["epoch"], cut["global_step"]) == (full["epoch"], full["global_step"]) == (1, full["global_step"])
    assert cut["val/dice"] == full["val/dice"] and cut["val/soft_volume_bias_ml"] == full["val/soft_volume_bias_ml"]
    assert epoch_losses(tmp_path / "cut") == pytest.approx(epoch_losses(tmp_path / "full"), rel=1e-6)
