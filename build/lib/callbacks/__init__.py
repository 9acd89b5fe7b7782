"""Lightning callbacks: result files, tables, validation pictures, checkpoint on SIGTERM."""

from callbacks.preemption import CheckpointOnSigterm
from callbacks.results_writer import ResultsWriter
from callbacks.validation_figures import ValidationFigures

__all__ = ["CheckpointOnSigterm", "ResultsWriter", "ValidationFigures"]
