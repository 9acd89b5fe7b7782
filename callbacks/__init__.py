"""Lightning callbacks: result files, tables and validation pictures."""

from callbacks.results_writer import ResultsWriter
from callbacks.validation_figures import ValidationFigures

__all__ = ["ResultsWriter", "ValidationFigures"]
