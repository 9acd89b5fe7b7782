"""The theory's prediction for a run's configuration, computed at most once per configuration.

``theory.predicted_volume_bias(config)`` takes a config with ``data`` and ``loss`` sections
and returns ``{"relative_soft": float, "relative_hard": float}`` (bias relative to the
expected volume) or None. ``theory.run_bias_curve(config)``, where it exists, returns
``{"sigma": [...], "relative_soft": [...], "relative_hard": [...]}`` (σ in mm, the config's
uncertainty kind) or None. ``theory.predicted_lesion_rows(config)`` returns the per-lesion rows
of the loss's optimum on each validation case, or None. All are imported lazily: a missing function, a failing call or
an unexpected result means "no prediction", noted once, never a failed report.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from biasseg.reporting.grouping import Group
from biasseg.reporting.runs import Run


def run_config(run: Run) -> DictConfig:
    """The parts of a run's config the theory needs (resolved, plain values)."""
    return OmegaConf.create({"task_name": run.task_name, "seed": run.seed, "data": run.data, "loss": run.loss,
                             "model": run.model, "lesions": run.lesion_config or None,
                             "trainer": {"max_epochs": run.max_epochs}})


class Theory:
    """Cached access to ``theory.predicted_volume_bias``, ``theory.run_bias_curve`` and
    ``theory.predicted_lesion_rows``."""

    def __init__(self, enabled: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.notes: list[str] = []
        self._functions: dict[str, Callable | None] = {"predicted_volume_bias": None, "run_bias_curve": None,
                                                          "predicted_lesion_rows": None}
        self._cache: dict[tuple[str, str], object] = {}
        if not enabled:
            self.notes.append("theory predictions turned off (--no-theory)")
            return
        try:
            from biasseg import theory
        except Exception as error:  # absent, or broken while being written
            self.notes.append(f"no theory predictions: cannot import theory ({type(error).__name__}: {error})")
            return
        for name in self._functions:
            self._functions[name] = getattr(theory, name, None)
        if self._functions["predicted_volume_bias"] is None:
            self.notes.append("no theory predictions: theory.predicted_volume_bias does not exist")

    @property
    def has_curve(self) -> bool:
        return self._functions["run_bias_curve"] is not None

    def prediction(self, group: Group) -> dict[str, float] | None:
        """``{"relative_soft", "relative_hard"}`` for the group's configuration, or None."""
        result = self._call("predicted_volume_bias", group)
        if result is None:
            return None
        try:
            return {key: float(result[key]) for key in ("relative_soft", "relative_hard")}
        except (KeyError, TypeError, ValueError):
            self._note(f"theory.predicted_volume_bias returned {result!r} for {group.task} / {group.loss}")
            return None

    def curve(self, group: Group) -> dict[str, list[float]] | None:
        """``{"sigma", "relative_soft", "relative_hard"}`` lists for the group's configuration, or None."""
        result = self._call("run_bias_curve", group)
        if result is None:
            return None
        try:
            curve = {key: [float(v) for v in result[key]] for key in ("sigma", "relative_soft", "relative_hard")
                     if key in result}
            if "sigma" not in curve or not any(len(curve.get(k, [])) == len(curve["sigma"])
                                                for k in ("relative_soft", "relative_hard")):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            self._note(f"theory.run_bias_curve returned an unexpected value for {group.task} / {group.loss}")
            return None
        return {k: v if len(v) == len(curve["sigma"]) else [math.nan] * len(curve["sigma"]) for k, v in curve.items()}

    def lesions(self, group: Group) -> np.ndarray | None:
        """The theory's per-lesion rows (:data:`biasseg.metrics.lesions.LESION_COLUMNS`) over the
        group's validation cases, or None."""
        result = self._call("predicted_lesion_rows", group)
        if not result:
            return None
        return np.concatenate([np.asarray(rows, dtype=np.float64) for rows in result])

    def _call(self, name: str, group: Group) -> object:
        function = self._functions[name]
        if function is None:
            return None
        run = group.runs[0]
        key = (name, json.dumps({"data": run.data, "loss": run.loss, "model": run.model, "lesions": run.lesion_config},
                                sort_keys=True, default=str))
        if key not in self._cache:
            self.log(f"theory: {name} for {group.task} / {group.loss} …")
            try:
                self._cache[key] = function(run_config(run))
            except Exception as error:
                self._note(f"theory.{name} failed for {group.task} / {group.loss}: {type(error).__name__}: {error}")
                self._cache[key] = None
        return self._cache[key]

    def _note(self, message: str) -> None:
        self.notes.append(message)
        self.log(message)
