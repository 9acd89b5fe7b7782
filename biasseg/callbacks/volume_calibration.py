"""Store each validation's volume calibration beside the checkpoints, bound to the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl

from biasseg.run_files import write_atomically
from lightning_modules.calibration_file import FILE_NAME, calibration_record


class VolumeCalibrationWriter(pl.Callback):
    """After every validation (rank zero, not the sanity check) write
    ``<dirpath>/volume_calibration.json``: the recalibration maps and interval scales the
    module fitted on the validation subjects (:mod:`biasseg.metrics.volume_quote`), bound to the
    weights just validated (:mod:`lightning_modules.calibration_file`). ``last.ckpt`` is saved
    after the same validation with the same weights, so the file is that checkpoint's;
    ``evaluate.py`` and ``predict.py`` refuse it for any other."""

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / FILE_NAME

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.volume_calibration is None:
            return
        subjects = list(trainer.datamodule.val_subject_names)
        record = calibration_record(pl_module.volume_calibration, pl_module.net, pl_module.class_names, subjects,
                                    pl_module.calibration_verdict or "")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(record, indent=1))
