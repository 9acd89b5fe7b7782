"""Lightning callbacks: result files, tables."""

from callbacks.results_writer import ResultsWriter

__all__ = ["ResultsWriter"]
