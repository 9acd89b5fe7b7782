"""Save the run's state when the job is told to stop (SLURM preemption, time limit, ``kill``)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(pl.Callback):
    """On SIGTERM write ``path`` (by default the run's ``last.ckpt``) before the process exits.

    Lightning turns SIGTERM into a ``SIGTERMException`` after the current training step, on
    every rank at once; the checkpoint written here holds that step, so a run resumed from it
    (``ckpt_path=…/last.ckpt``, or automatically in the same run directory) ends at the same
    epoch and global step as an uninterrupted one.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # After SIGTERM another error may come first: SLURM signals the job's other processes too,
        # and a logger whose service died with them (wandb) raises on its next call. The state
        # is the same; save it all the same.
        if trainer.state.fn == "fit" and (isinstance(exception, SIGTERMException) or trainer.received_sigterm):
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume from
            cause = "" if isinstance(exception, SIGTERMException) else f" (stopped by {type(exception).__name__} after it)"
            rank_zero_info(f"SIGTERM: saved {self.path} at epoch {trainer.current_epoch}, step {trainer.global_step}{cause}")
