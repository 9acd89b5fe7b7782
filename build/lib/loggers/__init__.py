"""Experiment loggers beyond Lightning's own."""

from loggers.resumable_csv import ResumableCSVLogger

__all__ = ["ResumableCSVLogger"]
