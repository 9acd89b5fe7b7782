"""Lightning's CSV logger, continued rather than wiped when a run resumes in its directory."""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's deletes it) and appends to it, with
    its columns as the starting header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` for runs that resume in the same directory (``auto_resume``, SLURM
    requeue): the rows logged before the interruption stay; a resumed run logs only the steps
    after its checkpoint, so nothing appears twice."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
