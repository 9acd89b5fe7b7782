"""Lightning callbacks: result files, tables, validation pictures, checkpoint on SIGTERM."""

from callbacks.preemption import CheckpointOnSigterm
from callbacks.progress_log import ProgressLog
from callbacks.results_writer import ResultsWriter
from callbacks.validation_figures import ValidationFigures
from callbacks.wandb_dashboard import WandbDashboard

__all__ = ["CheckpointOnSigterm", "ProgressLog", "ResultsWriter", "ValidationFigures", "WandbDashboard"]
