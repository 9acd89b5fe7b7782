"""The run's text log: everything a run says, in the console and in ``<run dir>/train.log``.

Hydra gives the root logger a console and a file handler (``train.log``); libraries bypass it:
Lightning logs through its own console handler, Python warnings go to stderr. After
:func:`route_library_output` they all go through the root logger, so ``train.log`` holds what
the console showed. Routine library noise — messages that say nothing about this run (tips,
hints for setups we do not use, deprecations inside libraries) — is dropped by
:class:`NoiseFilter`; real warnings pass.
"""

from __future__ import annotations

import logging
import sys

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

LIBRARY_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
# message fragments that are noise in every biasseg run, with why
NOISE = (
    "💡 Tip:",  # Lightning advertising its services
    "LeafSpec",  # a deprecation inside Lightning's own pytree helpers
    "does not have many workers",  # validation loads whole subjects one per step on purpose
    "Your `IterableDataset` has `__len__` defined",  # the patch stream's length is exact per worker
    "overridden `transfer_batch_to_device`",  # deliberate: whole subjects stay where they are
    "smaller than the logging interval",  # epoch-level logging, by design
    "`weights_only` was not set",  # Lightning's note when it writes a full checkpoint
    "Checkpoint directory",  # "exists and is not empty": resuming in a run directory is the point
)


class NoiseFilter(logging.Filter):
    """Drops records whose message contains one of :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in NOISE)


def route_library_output() -> None:
    """Send Lightning's messages and Python warnings through the root logger (so into
    train.log), without library noise. Call once Hydra has configured logging."""
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                library.removeHandler(handler)
        library.propagate = True
    noise = NoiseFilter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, NoiseFilter) for f in handler.filters):
            handler.addFilter(noise)


def interactive() -> bool:
    """Whether a person watches a terminal (progress bars) or the output goes to a file or a
    scheduler's log (lines instead)."""
    return sys.stderr.isatty()


def progress_bar(setting: object) -> bool:
    """``trainer.enable_progress_bar``: ``auto`` shows a bar only in a terminal."""
    return interactive() if setting == "auto" else bool(setting)


def build_trainer(trainer_config: DictConfig, callbacks: list, loggers: list) -> pl.Trainer:
    """The configured Lightning ``Trainer`` (``trainer=…``) with ``callbacks`` and ``loggers``
    (none: no logger) and the progress bar of :func:`progress_bar` — train.py's and evaluate.py's."""
    return instantiate(trainer_config, callbacks=callbacks, logger=loggers or False,
                       enable_progress_bar=progress_bar(trainer_config.get("enable_progress_bar", "auto")))
