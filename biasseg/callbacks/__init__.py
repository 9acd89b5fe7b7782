"""Lightning callbacks: result files, tables, validation pictures, the volume calibration, checkpoint on SIGTERM."""

from biasseg.callbacks.preemption import CheckpointOnSigterm
from biasseg.callbacks.progress_log import ProgressLog
from biasseg.callbacks.results_writer import ResultsWriter
from biasseg.callbacks.validation_figures import ValidationFigures
from biasseg.callbacks.volume_calibration import VolumeCalibrationWriter
from biasseg.callbacks.wandb_dashboard import WandbDashboard

__all__ = ["CheckpointOnSigterm", "ProgressLog", "ResultsWriter", "ValidationFigures", "VolumeCalibrationWriter", "WandbDashboard"]
