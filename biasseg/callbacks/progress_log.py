"""Progress as log lines: for runs nobody watches in a terminal (SLURM, output redirected).

One line per epoch — epoch, step, training loss, validation Dice and soft-volume bias when
the epoch was validated, speed and the time left — into the console and ``train.log``; and,
without a progress bar, a line every ``every_minutes`` within long epochs (step, it/s, ETA).
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN: no step timed yet
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


class ProgressLog(pl.Callback):
    """Log lines of training progress (rank zero)."""

    def __init__(self, every_minutes: float = 5.0) -> None:
        self.every_seconds = float(every_minutes) * 60
        self._started = self._last_line = self._epoch_started = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed in the middle of an epoch gets no on_train_epoch_start for it
        self._started = self._last_line = self._epoch_started = time.monotonic()
        self._first_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def _speed_and_left(self, trainer: pl.Trainer) -> tuple[float, float]:
        done = trainer.global_step - self._first_step
        elapsed = time.monotonic() - self._started
        speed = done / elapsed if elapsed > 0 else 0.0
        left = (trainer.estimated_stepping_batches - trainer.global_step) / speed if speed > 0 else float("nan")
        return speed, left

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero or trainer.progress_bar_callback is not None:
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_seconds:
            self._last_line = now
            speed, left = self._speed_and_left(trainer)
            log.info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, batch {batch_idx + 1}/{trainer.num_training_batches}, "
                     f"step {trainer.global_step}: {speed:.2f} it/s, about {duration(left)} left")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._last_line = time.monotonic()
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", f"step {trainer.global_step}"]
        sums = getattr(pl_module, "epoch_loss", None)  # the module logs train/loss after this hook: its sums (rank 0's under DDP)
        if sums is not None and float(sums[1]) > 0:
            parts.append(f"loss {float(sums[0] / sums[1]):.4f}")
        if pl_module.validation_summary is not None and trainer.current_epoch == pl_module.validated_epoch:
            summary = pl_module.validation_summary
            parts.append(f"val Dice {summary.get('dice', float('nan')):.3f}")
            if "soft_relative_volume_bias" in summary:
                parts.append(f"soft ΔV {summary['soft_relative_volume_bias']:+.1%}")
        speed, left = self._speed_and_left(trainer)
        parts.append(f"{speed:.2f} it/s, epoch {duration(time.monotonic() - self._epoch_started)}, about {duration(left)} left")
        log.info(" · ".join(parts))
