"""Lightning callbacks: result files, tables, validation pictures, the volume calibration, checkpoint on SIGTERM."""

from callbacks.preemption import CheckpointOnSigterm
from callbacks.progress_log import ProgressLog
from callbacks.results_writer import ResultsWriter
from callbacks.validation_figures import ValidationFigures
from callbacks.volume_calibration import VolumeCalibrationWriter
from callbacks.wandb_dashboard import WandbDashboard

__all__ = ["CheckpointOnSigterm", "ProgressLog", "ResultsWriter", "ValidationFigures", "VolumeCalibrationWriter", "WandbDashboard"]
