"""Experiment loggers beyond Lightning's own, and the run's text log (loggers.run_log)."""

from biasseg.loggers.resumable_csv import ResumableCSVLogger

__all__ = ["ResumableCSVLogger"]
